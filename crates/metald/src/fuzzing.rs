//! Checks run by the fuzz targets in `fuzz/` (one function per target, named like it) and, on
//! the seed corpus `fuzz/corpus/<target>/`, by the `fuzz_corpus` test that `make test` runs on
//! stable. Not an API for metald's own code. Each one takes arbitrary bytes, must not panic on
//! any of them, and asserts what the code it calls promises; a failed assertion is a finding.

use metald_proto::metald::v1 as pb;

use crate::api::handlers::{config_from_proto, config_to_proto};
use crate::api::strict;
use crate::metering::sources::{read_stats, NetTable};
use crate::service::{validate_kernel_args, MAX_KERNEL_ARGS};

pub use metald_vmm::fuzzing::{firecracker_metrics, qmp_reader};

/// A target's check: panics when its input breaks a promise.
pub type Check = fn(&[u8]);

/// Every target, by name: the replay test looks each one up here, and checks that `fuzz/` has
/// the same targets.
pub const TARGETS: &[(&str, Check)] = &[
    ("strict_json", strict_json),
    ("firecracker_metrics", firecracker_metrics),
    ("qmp_reader", qmp_reader),
    ("ids_and_kernel_args", ids_and_kernel_args),
    ("netlink_stats", netlink_stats),
];

/// A REST CreateVm body, decoded as `rest::create` does: the strict field check, then the
/// protobuf JSON decoding. What passes both re-encodes into a body that passes both again and
/// decodes to the same request (so every field the encoder writes is one the strict table
/// knows), and its domain config survives the trip to protobuf and back.
pub fn strict_json(data: &[u8]) {
    let checked = strict::check(data, strict::CREATE_VM_REQUEST);
    if checked.is_ok() {
        assert!(serde_json::from_slice::<serde_json::Value>(data).is_ok());
    }
    if checked.is_err() {
        return;
    }
    let Ok(req) = serde_json::from_slice::<pb::CreateVmRequest>(data) else {
        return;
    };
    let body = match serde_json::to_vec(&req) {
        Ok(body) => body,
        Err(e) => panic!("a decoded request does not encode: {e}"),
    };
    let text = String::from_utf8_lossy(&body);
    if let Err(e) = strict::check(&body, strict::CREATE_VM_REQUEST) {
        panic!("metald refuses its own encoding {text}: {e}");
    }
    match serde_json::from_slice::<pb::CreateVmRequest>(&body) {
        Ok(again) => assert!(again == req, "{text} decodes to another request"),
        Err(e) => panic!("metald cannot decode its own encoding {text}: {e}"),
    }
    let config = config_from_proto(&req.config);
    assert_eq!(config_from_proto(&config_to_proto(&config)), config);
}

/// Id and state names (see [`metald_domain::fuzzing::ids`]), then the kernel-argument check
/// of `config.kernel_args`: it accepts exactly what the guest contract allows: at most
/// [`MAX_KERNEL_ARGS`] bytes, no control characters, balanced double quotes (so metald's own
/// arguments, which come last, are never swallowed), and none of the address arguments metald
/// sets ([`crate::network::RESERVED_KERNEL_ARGS`]) in any spelling of their name's case.
pub fn ids_and_kernel_args(data: &[u8]) {
    metald_domain::fuzzing::ids(data);
    let text = String::from_utf8_lossy(data);
    let names_reserved = text.split_ascii_whitespace().any(|w| {
        let name = w.trim_start_matches('"').split('=').next().unwrap_or("");
        crate::network::RESERVED_KERNEL_ARGS
            .iter()
            .any(|r| r.eq_ignore_ascii_case(name))
    });
    let allowed = text.len() <= MAX_KERNEL_ARGS
        && !text.chars().any(char::is_control)
        && text.matches('"').count().is_multiple_of(2)
        && !names_reserved;
    match validate_kernel_args(&text) {
        Ok(()) => assert!(allowed, "accepted {text:?}"),
        Err(e) => {
            assert!(!allowed, "refused {text:?}: {e}");
            assert!(e.to_string().contains("config.kernel_args"), "{e}");
        }
    }
}

/// The sequence number the `netlink_stats` seeds carry: the fuzzer keeps it from them.
pub const NETLINK_SEQ: u32 = 1;

/// One buffer of an `RTM_GETSTATS` answer, read as `NetStats::refresh` reads it. The first
/// byte picks a dump (even) or a one-interface request (odd); the rest is the buffer. At most
/// one interface is read per message, and a message is at least its two headers long.
pub fn netlink_stats(data: &[u8]) {
    let Some((&mode, buf)) = data.split_first() else {
        return;
    };
    let only = (mode % 2 == 1).then_some(1);
    let mut table = NetTable::new();
    let _ = read_stats(&mut table, buf, NETLINK_SEQ, only);
    // nlmsghdr (16 bytes) and if_stats_msg (12 bytes).
    assert!(table.len() <= buf.len() / 28, "{} interfaces", table.len());
}
