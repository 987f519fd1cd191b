//! Firecracker's own metrics: a FIFO in the VM's directory that Firecracker writes one JSON
//! line to per `FlushMetrics`. Counters in it are deltas since the previous flush, grouped in
//! objects keyed `block_<drive id>` and `net_<interface id>` (plus aggregates `block`, `net`).

use serde_json::Value;

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

/// Parses one flush line. Only per-device objects count (`block_<id>`, `net_<id>`), so the
/// aggregates are not added twice.
pub fn parse_flush(line: &str) -> Option<DeviceDeltas> {
    let v: Value = serde_json::from_str(line).ok()?;
    let obj = v.as_object()?;
    let n = |o: &Value, k: &str| o.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut d = DeviceDeltas::default();
    for (key, o) in obj {
        if key.starts_with("block_") {
            d.block_read_bytes += n(o, "read_bytes");
            d.block_write_bytes += n(o, "write_bytes");
            d.block_read_ops += n(o, "read_count");
            d.block_write_ops += n(o, "write_count");
        } else if key.starts_with("net_") {
            d.net_rx_bytes += n(o, "rx_bytes_count");
            d.net_tx_bytes += n(o, "tx_bytes_count");
        }
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_device_objects_are_summed_and_aggregates_ignored() {
        let line = r#"{"utc_timestamp_ms":1,"block":{"read_bytes":999},"block_rootfs":{"read_bytes":4096,"write_bytes":512,"read_count":2,"write_count":1},"block_data":{"read_bytes":100,"write_count":3},"net":{"rx_bytes_count":999},"net_eth0":{"rx_bytes_count":1500,"tx_bytes_count":60}}"#;
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
}
