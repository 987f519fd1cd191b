//! Firecracker's own metrics: a FIFO in the VM's directory that Firecracker writes one JSON
//! line to per `FlushMetrics`. Counters in it are deltas since the previous flush, grouped in
//! objects keyed `block_<drive id>` and `net_<interface id>` (plus aggregates `block`, `net`).

/// The FIFO's file name in the VM's directory.
pub const FIFO: &str = "metrics.fifo";

/// Device counters from one flush (deltas since the previous one), summed over devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceDeltas {
    /// Bytes read by the guest's block devices.
    pub block_read_bytes: u64,
    /// Bytes written by the guest's block devices.
    pub block_write_bytes: u64,
    /// Block read requests.
    pub block_read_ops: u64,
    /// Block write requests.
    pub block_write_ops: u64,
    /// Bytes the guest received.
    pub net_rx_bytes: u64,
    /// Bytes the guest sent.
    pub net_tx_bytes: u64,
}

/// One device object's counters that metald uses; the rest are skipped.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Device {
    read_bytes: u64,
    write_bytes: u64,
    read_count: u64,
    write_count: u64,
    rx_bytes_count: u64,
    tx_bytes_count: u64,
}

/// Sums the per-device objects of a flush while parsing it, without building a JSON tree of the
/// whole 5 KB record (every other object is skipped unparsed).
struct FlushVisitor;

impl<'de> serde::de::Visitor<'de> for FlushVisitor {
    type Value = DeviceDeltas;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Firecracker metrics object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<DeviceDeltas, A::Error> {
        let mut d = DeviceDeltas::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            // Saturating: the line comes from the VMM, which a hostile guest may have taken
            // over; a sum past u64 must neither panic (overflow checks) nor wrap to a small
            // usage.
            if key.starts_with("block_") {
                let o: Device = map.next_value()?;
                d.block_read_bytes = d.block_read_bytes.saturating_add(o.read_bytes);
                d.block_write_bytes = d.block_write_bytes.saturating_add(o.write_bytes);
                d.block_read_ops = d.block_read_ops.saturating_add(o.read_count);
                d.block_write_ops = d.block_write_ops.saturating_add(o.write_count);
            } else if key.starts_with("net_") {
                let o: Device = map.next_value()?;
                d.net_rx_bytes = d.net_rx_bytes.saturating_add(o.rx_bytes_count);
                d.net_tx_bytes = d.net_tx_bytes.saturating_add(o.tx_bytes_count);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(d)
    }
}

/// Longest metrics line kept (Firecracker v1.16 writes about 5.4 KB per flush).
pub const MAX_LINE_BYTES: usize = 256 * 1024;

/// Parses one flush line. Only per-device objects count (`block_<id>`, `net_<id>`), so the
/// aggregates are not added twice.
pub fn parse_flush(line: &str) -> Option<DeviceDeltas> {
    let mut de = serde_json::Deserializer::from_str(line);
    let d = serde::Deserializer::deserialize_map(&mut de, FlushVisitor).ok()?;
    de.end().ok()?;
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_device_objects_are_summed_and_aggregates_ignored() {
        let line = r#"{"utc_timestamp_ms":1,"block":{"read_bytes":999},"block_rootfs":{"read_bytes":4096,"read_agg":{"min_us":0,"max_us":9},"write_bytes":512,"read_count":2,"write_count":1},"block_data":{"read_bytes":100,"write_count":3},"net":{"rx_bytes_count":999},"net_eth0":{"rx_bytes_count":1500,"tx_bytes_count":60},"vcpu":{"exit_io_in":[1,2]},"signals":{}}"#;
        let d = parse_flush(line).unwrap();
        assert_eq!(
            d,
            DeviceDeltas {
                block_read_bytes: 4196,
                block_write_bytes: 512,
                block_read_ops: 2,
                block_write_ops: 4,
                net_rx_bytes: 1500,
                net_tx_bytes: 60,
            }
        );
        assert!(parse_flush("not json").is_none());
    }

    #[test]
    fn sums_past_u64_saturate() {
        let line = r#"{"block_a":{"read_bytes":18446744073709551615},"block_b":{"read_bytes":2},"net_a":{"tx_bytes_count":18446744073709551615},"net_b":{"tx_bytes_count":1}}"#;
        let d = parse_flush(line).unwrap();
        assert_eq!((d.block_read_bytes, d.net_tx_bytes), (u64::MAX, u64::MAX));
    }
}
