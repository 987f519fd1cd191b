//! The one mapping from service errors to Connect codes (and through them, HTTP statuses).

use connectrpc::{ConnectError, ErrorCode};

use crate::assets::AssetError;
use crate::backend::BackendError;
use crate::service::ServiceError;

/// Maps a service error to what the caller sees. An internal error's details (host paths, OS
/// errors) are logged with a request id, and the caller gets only that id.
pub fn to_connect(err: &ServiceError) -> ConnectError {
    let code = code_for(err);
    let message = match code {
        ErrorCode::Internal => {
            let id = crate::telemetry::request_id();
            tracing::error!(request_id = %id, error = %crate::report::Chain(err), "internal error");
            format!("internal error (request id {id}); the details are in metald's log")
        }
        _ => crate::report::chain(err),
    };
    ConnectError::new(code, message)
}

/// The Connect code for each error.
pub fn code_for(err: &ServiceError) -> ErrorCode {
    match err {
        ServiceError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
        ServiceError::NotFound(_) | ServiceError::SnapshotNotFound(_) => ErrorCode::NotFound,
        ServiceError::FailedPrecondition(_) | ServiceError::Precondition(_) => {
            ErrorCode::FailedPrecondition
        }
        ServiceError::Unimplemented(_) => ErrorCode::Unimplemented,
        // The VM's host missed its lease: the caller may retry once it is back.
        ServiceError::HostDown => ErrorCode::Unavailable,
        ServiceError::Backend { source, .. } => match source {
            // The VMM is gone under us: the caller may retry after checking the state.
            BackendError::NotRunning(_) => ErrorCode::FailedPrecondition,
            BackendError::Unsupported(_) => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        },
        // Every address or jail slot is taken: the host is full, not broken.
        ServiceError::Store(crate::store::StoreError::Exhausted(_)) => ErrorCode::ResourceExhausted,
        // A customer at a quota: HTTP 429, with the quota, its use and its limit.
        ServiceError::Store(crate::store::StoreError::QuotaExceeded { .. }) => {
            ErrorCode::ResourceExhausted
        }
        // The host has no room (memory, vCPUs, disk): HTTP 429 naming the resource.
        ServiceError::HostExhausted(_)
        | ServiceError::Store(crate::store::StoreError::HostExhausted(_)) => {
            ErrorCode::ResourceExhausted
        }
        // The image is on no source this host can reach now: retry later, or on another host.
        ServiceError::Asset(
            AssetError::Missing(_) | AssetError::TimedOut { .. } | AssetError::Source { .. },
        ) => ErrorCode::Unavailable,
        ServiceError::Asset(_)
        | ServiceError::Store(_)
        | ServiceError::Io { .. }
        | ServiceError::Sandbox { .. }
        | ServiceError::CloneMap { .. }
        | ServiceError::Probe(_)
        | ServiceError::Sweep(_) => ErrorCode::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::VmId;
    use crate::state::{transition, Operation, VmState};

    #[test]
    fn each_error_maps_to_one_code_and_status() {
        let vm = VmId::generate();
        let cases: Vec<(ServiceError, ErrorCode, u16)> = vec![
            (
                ServiceError::InvalidArgument {
                    field: "config.cpu.vcpu_count".into(),
                    reason: "x".into(),
                },
                ErrorCode::InvalidArgument,
                400,
            ),
            (ServiceError::NotFound(vm.clone()), ErrorCode::NotFound, 404),
            (
                ServiceError::SnapshotNotFound("snap-x".into()),
                ErrorCode::NotFound,
                404,
            ),
            (
                ServiceError::Precondition("x".into()),
                ErrorCode::FailedPrecondition,
                400,
            ),
            (
                ServiceError::Unimplemented("x".into()),
                ErrorCode::Unimplemented,
                501,
            ),
            (
                transition(VmState::Shutdown, Operation::Pause)
                    .unwrap_err()
                    .into(),
                ErrorCode::FailedPrecondition,
                400,
            ),
            (
                ServiceError::Backend {
                    op: "pause",
                    vm: vm.clone(),
                    source: BackendError::NotRunning(vm.clone()),
                },
                ErrorCode::FailedPrecondition,
                400,
            ),
            (
                ServiceError::Backend {
                    op: "boot",
                    vm: vm.clone(),
                    source: BackendError::Api {
                        request: "x".into(),
                        reason: "y".into(),
                    },
                },
                ErrorCode::Internal,
                500,
            ),
            (
                ServiceError::HostExhausted(crate::store::Shortage {
                    resource: "disk",
                    unit: "MiB",
                    used: 1,
                    asked: 2,
                    capacity: 2,
                }),
                ErrorCode::ResourceExhausted,
                429,
            ),
            (
                ServiceError::Store(crate::store::StoreError::HostExhausted(
                    crate::store::Shortage {
                        resource: "memory",
                        unit: "MiB",
                        used: 1,
                        asked: 2,
                        capacity: 2,
                    },
                )),
                ErrorCode::ResourceExhausted,
                429,
            ),
            (
                ServiceError::Probe(crate::probe::ProbeError::Missing {
                    path: "/proc/meminfo".into(),
                    what: "MemTotal",
                }),
                ErrorCode::Internal,
                500,
            ),
            (
                ServiceError::Asset(AssetError::Missing("r".into())),
                ErrorCode::Unavailable,
                503,
            ),
            (
                ServiceError::Asset(AssetError::Corrupt {
                    id: "r".into(),
                    from: "peer host-2".into(),
                    recorded: "a".into(),
                    got: "b".into(),
                }),
                ErrorCode::Internal,
                500,
            ),
        ];
        for (err, code, status) in cases {
            let c = to_connect(&err);
            assert_eq!(c.code, code, "{err}");
            assert_eq!(c.http_status().as_u16(), status, "{err}");
        }
    }

    #[test]
    fn internal_errors_reach_the_caller_as_a_request_id_without_details() {
        let e = to_connect(&ServiceError::Io {
            op: "open",
            path: "/var/lib/metald/vms/vm-1/console.log".into(),
            source: std::io::Error::other("permission denied"),
        });
        assert_eq!(e.code, ErrorCode::Internal);
        let message = e.message.unwrap();
        assert!(
            message.starts_with("internal error (request id "),
            "{message}"
        );
        for detail in ["/var/lib", "console.log", "permission denied", "open"] {
            assert!(!message.contains(detail), "{message} shows {detail}");
        }
    }

    #[test]
    fn messages_name_field_and_state() {
        let e = to_connect(&ServiceError::InvalidArgument {
            field: "config.memory.size_bytes".into(),
            reason: "too small".into(),
        });
        assert_eq!(
            e.message.as_deref(),
            Some("config.memory.size_bytes: too small")
        );
        let e = to_connect(
            &transition(VmState::Shutdown, Operation::Pause)
                .unwrap_err()
                .into(),
        );
        assert_eq!(
            e.message.as_deref(),
            Some("cannot pause a VM in state SHUTDOWN; boot it first")
        );
    }
}
