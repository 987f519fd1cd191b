//! Checks run by the fuzz targets in `fuzz/` and, on the seed corpus, by `make test` (not an API
//! for metald's own code). Each one takes arbitrary bytes, must not panic on any of them, and
//! asserts what the code it calls promises; a failed assertion is a finding.

use serde_json::Value;

use crate::firecracker::metrics::{parse_flush, DeviceDeltas};
use crate::qemu::block_ops;
use crate::qemu::qmp::{self, Message};

/// One Firecracker metrics flush line: `parse_flush` accepts only well-formed JSON objects, and
/// its sums (streamed, every duplicate key counted) are at least those of the parsed tree (which
/// keeps the last of duplicate keys).
pub fn firecracker_metrics(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let Some(streamed) = parse_flush(line) else {
        return;
    };
    assert!(
        line.trim_start().starts_with('{'),
        "not an object: {line:?}"
    );
    // Well-formed by serde_json's grammar. The skipped objects are not parsed into values, so a
    // number there out of f64's range (1e400) is accepted, unlike by `Value`, which refuses it:
    // such a line has no tree to compare with.
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(line) {
        panic!("parse_flush accepted malformed JSON {line:?}: {e}");
    }
    let Ok(Value::Object(tree)) = serde_json::from_str::<Value>(line) else {
        return;
    };
    let mut sums = DeviceDeltas::default();
    let n = |o: &Value, k: &str| o[k].as_u64().unwrap_or(0);
    for (key, o) in &tree {
        if key.starts_with("block_") {
            sums.block_read_bytes = sums.block_read_bytes.saturating_add(n(o, "read_bytes"));
            sums.block_write_bytes = sums.block_write_bytes.saturating_add(n(o, "write_bytes"));
            sums.block_read_ops = sums.block_read_ops.saturating_add(n(o, "read_count"));
            sums.block_write_ops = sums.block_write_ops.saturating_add(n(o, "write_count"));
        } else if key.starts_with("net_") {
            sums.net_rx_bytes = sums.net_rx_bytes.saturating_add(n(o, "rx_bytes_count"));
            sums.net_tx_bytes = sums.net_tx_bytes.saturating_add(n(o, "tx_bytes_count"));
        }
    }
    let pairs = [
        (streamed.block_read_bytes, sums.block_read_bytes),
        (streamed.block_write_bytes, sums.block_write_bytes),
        (streamed.block_read_ops, sums.block_read_ops),
        (streamed.block_write_ops, sums.block_write_ops),
        (streamed.net_rx_bytes, sums.net_rx_bytes),
        (streamed.net_tx_bytes, sums.net_tx_bytes),
    ];
    assert!(
        pairs.iter().all(|(s, t)| s >= t),
        "streamed {streamed:?} below the tree's {sums:?}"
    );
}

/// Lines a QEMU QMP socket could send, read as `Qmp::execute` reads them: every line is bad
/// JSON, an event, the command's error, or a reply; a reply's `query-status` and
/// `query-blockstats` readings never panic, and the block operation sums are at least each
/// drive's own count.
pub fn qmp_reader(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    const COMMAND: &str = "query-blockstats";
    for line in text.lines() {
        let msg = match qmp::parse(COMMAND, line) {
            Ok(msg) => msg,
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.starts_with("VMM API QMP query-blockstats: bad JSON"),
                    "{e}"
                );
                continue;
            }
        };
        let event = msg.get("event").is_some();
        let error = msg.get("error").is_some();
        match qmp::read_message(COMMAND, msg) {
            Ok(Message::Event) => assert!(event),
            Err(e) => {
                assert!(!event && error);
                assert!(e.to_string().starts_with("VMM API QMP query-blockstats: "));
            }
            Ok(Message::Return(ret)) => {
                assert!(!event && !error);
                let _ = qmp::status_of(&ret);
                let (reads, writes) = block_ops(&ret);
                for drive in ret.as_array().into_iter().flatten() {
                    let stats = &drive["stats"];
                    assert!(reads >= stats["rd_operations"].as_u64().unwrap_or(0));
                    assert!(writes >= stats["wr_operations"].as_u64().unwrap_or(0));
                }
            }
        }
    }
}
