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
    /// `self + (now - base)` for every counter; memory is `now`'s reading.
    pub fn advanced(&self, base: &Counters, now: &Counters) -> Counters {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Counters {
            cpu_ns: self.cpu_ns + d(now.cpu_ns, base.cpu_ns),
            memory_bytes: now.memory_bytes,
            disk_read_bytes: self.disk_read_bytes + d(now.disk_read_bytes, base.disk_read_bytes),
            disk_write_bytes: self.disk_write_bytes
                + d(now.disk_write_bytes, base.disk_write_bytes),
            disk_read_ops: self.disk_read_ops + d(now.disk_read_ops, base.disk_read_ops),
            disk_write_ops: self.disk_write_ops + d(now.disk_write_ops, base.disk_write_ops),
            net_rx_bytes: self.net_rx_bytes + d(now.net_rx_bytes, base.net_rx_bytes),
            net_tx_bytes: self.net_tx_bytes + d(now.net_tx_bytes, base.net_tx_bytes),
            net_rx_packets: self.net_rx_packets + d(now.net_rx_packets, base.net_rx_packets),
            net_tx_packets: self.net_tx_packets + d(now.net_tx_packets, base.net_tx_packets),
        }
    }

    /// What was used between `earlier` and `self` (memory: `self`'s reading).
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters::default().advanced(earlier, self)
    }
}
