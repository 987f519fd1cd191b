//! Usage counters: what a VM used, cumulative since it was created.

/// Cumulative usage counters (and the latest memory reading).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// CPU time in nanoseconds.
    pub cpu_ns: u64,
    /// Memory the VMM holds now, in bytes (a gauge, not summed).
    pub memory_bytes: u64,
    /// Bytes read from disk.
    pub disk_read_bytes: u64,
    /// Bytes written to disk.
    pub disk_write_bytes: u64,
    /// Disk read operations.
    pub disk_read_ops: u64,
    /// Disk write operations.
    pub disk_write_ops: u64,
    /// Bytes the guest received.
    pub net_rx_bytes: u64,
    /// Bytes the guest sent.
    pub net_tx_bytes: u64,
    /// Packets the guest received.
    pub net_rx_packets: u64,
    /// Packets the guest sent.
    pub net_tx_packets: u64,
}

impl Counters {
    /// Each cumulative counter of `a` and `b` combined by `f`; memory is `memory`.
    fn zip(a: &Counters, b: &Counters, memory: u64, f: impl Fn(u64, u64) -> u64) -> Counters {
        Counters {
            cpu_ns: f(a.cpu_ns, b.cpu_ns),
            memory_bytes: memory,
            disk_read_bytes: f(a.disk_read_bytes, b.disk_read_bytes),
            disk_write_bytes: f(a.disk_write_bytes, b.disk_write_bytes),
            disk_read_ops: f(a.disk_read_ops, b.disk_read_ops),
            disk_write_ops: f(a.disk_write_ops, b.disk_write_ops),
            net_rx_bytes: f(a.net_rx_bytes, b.net_rx_bytes),
            net_tx_bytes: f(a.net_tx_bytes, b.net_tx_bytes),
            net_rx_packets: f(a.net_rx_packets, b.net_rx_packets),
            net_tx_packets: f(a.net_tx_packets, b.net_tx_packets),
        }
    }

    /// `self + (now - base)` for every counter; memory is `now`'s reading. A counter that went
    /// backwards adds nothing, and sums saturate: some counters are read from files a hostile
    /// VMM writes.
    pub fn advanced(&self, base: &Counters, now: &Counters) -> Counters {
        self.plus(&now.since(base))
    }

    /// What was used between `earlier` and `self` (memory: `self`'s reading).
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters::zip(self, earlier, self.memory_bytes, u64::saturating_sub)
    }

    /// Both usages added up, counter by counter (memory: `more`'s reading).
    pub fn plus(&self, more: &Counters) -> Counters {
        Counters::zip(self, more, more.memory_bytes, u64::saturating_add)
    }

    /// What `self` lacks of `floor`, counter by counter (memory, a gauge, is never lacking):
    /// added to `self`, no counter is below `floor`'s.
    pub fn shortfall(&self, floor: &Counters) -> Counters {
        Counters::zip(floor, self, 0, u64::saturating_sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortfall_raises_every_counter_to_the_floor_and_leaves_the_rest() {
        let have = Counters {
            cpu_ns: 100,
            disk_read_bytes: 50,
            memory_bytes: 7,
            ..Counters::default()
        };
        let floor = Counters {
            cpu_ns: 80,
            disk_read_bytes: 90,
            memory_bytes: 1000,
            ..Counters::default()
        };
        let short = have.shortfall(&floor);
        assert_eq!(
            (short.cpu_ns, short.disk_read_bytes, short.memory_bytes),
            (0, 40, 0)
        );
        let raised = Counters {
            memory_bytes: have.memory_bytes,
            ..have.plus(&short)
        };
        assert_eq!(
            (raised.cpu_ns, raised.disk_read_bytes, raised.memory_bytes),
            (100, 90, 7)
        );
        assert_eq!(
            Counters {
                cpu_ns: u64::MAX,
                ..have
            }
            .plus(&have)
            .cpu_ns,
            u64::MAX,
            "sums saturate"
        );
    }
}
