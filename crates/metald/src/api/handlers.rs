//! The API's operations on owned protobuf messages, shared by the Connect service and the REST
//! routes: decode into domain types, call the service, encode the result.

use std::sync::Arc;

use connectrpc::ConnectError;
use metald_proto::metald::v1 as pb;

use super::audit::effect;
use super::auth::Identity;
use super::error::to_connect;
use super::forward::{Call, Peers};
use crate::domain::{
    rfc3339, CustomerId, DriveConfig, NetworkSettings, RateLimit, VmConfig, VmId, VmRecord,
};
use crate::fleet::HostStatus;
use crate::metering::Counters;
use crate::service::{Amount, HeldBy, ServiceError, ShutdownRequest, VmService, Whereabouts};
use crate::state::VmState;

/// Parses a VM id field.
pub fn vm_id(field: &str, raw: &str) -> Result<VmId, ConnectError> {
    raw.parse()
        .map_err(|e| ConnectError::invalid_argument(format!("{field}: {e}")))
}

/// Domain state from the protobuf enum; `None` for UNSPECIFIED.
pub fn state_from_proto(
    v: &buffa::EnumValue<pb::VmState>,
) -> Result<Option<VmState>, ConnectError> {
    Ok(match v.as_known() {
        Some(pb::VmState::VM_STATE_UNSPECIFIED) => None,
        Some(pb::VmState::VM_STATE_CREATED) => Some(VmState::Created),
        Some(pb::VmState::VM_STATE_RUNNING) => Some(VmState::Running),
        Some(pb::VmState::VM_STATE_PAUSED) => Some(VmState::Paused),
        Some(pb::VmState::VM_STATE_SHUTDOWN) => Some(VmState::Shutdown),
        Some(pb::VmState::VM_STATE_FAILED) => Some(VmState::Failed),
        Some(pb::VmState::VM_STATE_SUSPENDED) => Some(VmState::Suspended),
        None => {
            return Err(ConnectError::invalid_argument(format!(
                "state_filter: unknown state {}",
                v.to_i32()
            )))
        }
    })
}

/// The protobuf enum for a domain state.
pub fn state_to_proto(s: VmState) -> pb::VmState {
    match s {
        VmState::Created => pb::VmState::VM_STATE_CREATED,
        VmState::Running => pb::VmState::VM_STATE_RUNNING,
        VmState::Paused => pb::VmState::VM_STATE_PAUSED,
        VmState::Shutdown => pb::VmState::VM_STATE_SHUTDOWN,
        VmState::Failed => pb::VmState::VM_STATE_FAILED,
        VmState::Suspended => pb::VmState::VM_STATE_SUSPENDED,
    }
}

/// Domain config from the protobuf message (the service validates values).
pub fn config_from_proto(c: &pb::VmConfig) -> VmConfig {
    VmConfig {
        vcpu_count: c.cpu.vcpu_count,
        memory_bytes: c.memory.size_bytes,
        kernel_image_id: c.kernel.image_id.clone(),
        rootfs_image_id: c.rootfs.image_id.clone(),
        drives: c
            .drives
            .iter()
            .map(|d| DriveConfig {
                drive_id: d.drive_id.clone(),
                image_id: d.image_id.clone(),
                read_only: d.read_only,
            })
            .collect(),
        kernel_args: c.kernel_args.clone(),
        metadata: c
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        network: NetworkSettings {
            rx_rate_limit: c
                .network
                .as_option()
                .and_then(|n| n.rx_rate_limit.as_option())
                .map(rate_from_proto),
            tx_rate_limit: c
                .network
                .as_option()
                .and_then(|n| n.tx_rate_limit.as_option())
                .map(rate_from_proto),
        },
    }
}

fn rate_from_proto(r: &pb::RateLimit) -> RateLimit {
    RateLimit {
        bandwidth_bytes_per_sec: r.bandwidth_bytes_per_sec,
        burst_bytes: r.burst_bytes,
    }
}

fn rate_to_proto(r: &RateLimit) -> pb::RateLimit {
    pb::RateLimit {
        bandwidth_bytes_per_sec: r.bandwidth_bytes_per_sec,
        burst_bytes: r.burst_bytes,
        ..Default::default()
    }
}

/// The protobuf message for a domain config.
pub fn config_to_proto(c: &VmConfig) -> pb::VmConfig {
    pb::VmConfig {
        cpu: pb::CpuConfig {
            vcpu_count: c.vcpu_count,
            ..Default::default()
        }
        .into(),
        memory: pb::MemoryConfig {
            size_bytes: c.memory_bytes,
            ..Default::default()
        }
        .into(),
        kernel: pb::KernelConfig {
            image_id: c.kernel_image_id.clone(),
            ..Default::default()
        }
        .into(),
        rootfs: pb::RootfsConfig {
            image_id: c.rootfs_image_id.clone(),
            ..Default::default()
        }
        .into(),
        drives: c
            .drives
            .iter()
            .map(|d| pb::DriveConfig {
                drive_id: d.drive_id.clone(),
                image_id: d.image_id.clone(),
                read_only: d.read_only,
                ..Default::default()
            })
            .collect(),
        kernel_args: c.kernel_args.clone(),
        metadata: c
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        network: if c.network == NetworkSettings::default() {
            Default::default()
        } else {
            pb::NetworkConfig {
                rx_rate_limit: c.network.rx_rate_limit.as_ref().map(rate_to_proto).into(),
                tx_rate_limit: c.network.tx_rate_limit.as_ref().map(rate_to_proto).into(),
                ..Default::default()
            }
            .into()
        },
        ..Default::default()
    }
}

/// The protobuf message for a VM.
pub fn vm_to_proto(vm: &VmRecord) -> pb::VmInfo {
    pb::VmInfo {
        vm_id: vm.id.to_string(),
        state: state_to_proto(vm.state()).into(),
        config: config_to_proto(&vm.config).into(),
        created_at: rfc3339(vm.created_at_ms),
        updated_at: rfc3339(vm.updated_at_ms),
        backend: vm.backend.clone(),
        vmm_pid: vm.life.vmm_pid().unwrap_or(0),
        failure: vm.life.failure().unwrap_or_default().to_string(),
        guest_ready: vm.life.guest_ready(),
        ..Default::default()
    }
}

/// The API view of a VM, with its network identity. Host details (the VMM's pid, the TAP,
/// the namespace file, the host-side interface) are for operators (callers holding
/// `host:read`); a customer sees its VM's addresses only.
fn vm_info(svc: &VmService, vm: &VmRecord, who: &Identity) -> pb::VmInfo {
    let mut info = vm_to_proto(vm);
    // Answered by the host that holds it (reads of other hosts' VMs say otherwise).
    info.host_status = pb::HostStatus::HOST_STATUS_UP.into();
    if !who.operator {
        info.vmm_pid = 0;
    }
    if let Some(n) = svc.network_of(vm) {
        let mut net = pb::VmNetworkInfo {
            ipv6_address: n.ipv6.to_string(),
            ipv4_address: n.ipv4.map(|a| a.to_string()).unwrap_or_default(),
            mac_address: n.mac,
            gateway_ipv6: n.gateway6.to_string(),
            gateway_ipv4: n.gateway4.map(|a| a.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        if who.operator {
            net.tap_device = n.tap;
            net.network_namespace = n.netns.display().to_string();
            net.host_interface = n.host_if;
        }
        info.network = net.into();
    }
    info
}

fn err(e: crate::service::ServiceError) -> ConnectError {
    to_connect(&e)
}

/// CreateVm. In a fleet the VM is placed first ([`VmService::placement`]): on this host it
/// is created here, on another the call goes there; a host found full when its insert checks
/// again (another create took the room) passes the VM on to the next.
pub async fn create_vm(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    req: pb::CreateVmRequest,
) -> Result<pb::CreateVmResponse, ConnectError> {
    if who.forwarded {
        // A peer placed it here.
        return create_here(svc, who, req).await;
    }
    if !req.from_snapshot.is_empty() {
        // A clone is made where its snapshot's files are.
        let snapshot = snapshot_id("from_snapshot", &req.from_snapshot)?;
        return match svc
            .snapshot_whereabouts(&who.customer, &snapshot)
            .map_err(err)?
        {
            Whereabouts::Here => create_here(svc, who, req).await,
            Whereabouts::Peer(host) => {
                peers
                    .create(&host, who, req)
                    .await
                    .map(|vm| pb::CreateVmResponse {
                        vm: vm.into(),
                        ..Default::default()
                    })
            }
        };
    }
    let Some(config) = req.config.as_option().map(config_from_proto) else {
        return create_here(svc, who, req).await;
    };
    let mut last = None;
    for place in svc.placement(&who.customer, &config).map_err(err)? {
        let result = match &place {
            Whereabouts::Here => create_here(svc, who, req.clone()).await,
            Whereabouts::Peer(host) => {
                peers
                    .create(host, who, req.clone())
                    .await
                    .map(|vm| pb::CreateVmResponse {
                        vm: vm.into(),
                        ..Default::default()
                    })
            }
        };
        match result {
            // Full after all, or gone: the next host may have room.
            Err(e)
                if matches!(
                    e.code,
                    connectrpc::ErrorCode::ResourceExhausted | connectrpc::ErrorCode::Unavailable
                ) =>
            {
                last = Some(e)
            }
            other => return other,
        }
    }
    Err(last.unwrap_or_else(|| {
        ConnectError::resource_exhausted("no host of the fleet has room for this VM")
    }))
}

/// CreateVm on this host.
async fn create_here(
    svc: &Arc<VmService>,
    who: &Arc<Identity>,
    req: pb::CreateVmRequest,
) -> Result<pb::CreateVmResponse, ConnectError> {
    let (s, customer) = (Arc::clone(svc), who.customer.clone());
    let vm = if req.from_snapshot.is_empty() {
        let Some(config) = req.config.as_option() else {
            return Err(ConnectError::invalid_argument("config: required"));
        };
        let config = config_from_proto(config);
        effect(who, "CreateVm", None, async move {
            s.create(&customer, config).await
        })
        .await?
    } else {
        let snapshot = snapshot_id("from_snapshot", &req.from_snapshot)?;
        let metadata = match req.config.as_option() {
            None => Default::default(),
            Some(c) => metadata_only(c)?,
        };
        effect(who, "CreateVm", None, async move {
            s.create_from_snapshot(&customer, &snapshot, metadata).await
        })
        .await?
    };
    Ok(pb::CreateVmResponse {
        vm: vm_info(svc, &vm, who).into(),
        ..Default::default()
    })
}

/// A snapshot id field: bounded; whether it names one of the caller's snapshots is the
/// service's answer (the same for another customer's as for a made-up one).
pub fn snapshot_id(field: &str, raw: &str) -> Result<String, ConnectError> {
    if raw.is_empty() || raw.len() > crate::service::MAX_SNAPSHOT_ID {
        return Err(ConnectError::invalid_argument(format!(
            "{field}: a snapshot id of 1-{} bytes",
            crate::service::MAX_SNAPSHOT_ID
        )));
    }
    Ok(raw.to_string())
}

/// A VM created from a snapshot has the snapshot's configuration: only its labels may be
/// given.
fn metadata_only(
    c: &pb::VmConfig,
) -> Result<std::collections::BTreeMap<String, String>, ConnectError> {
    let only_metadata = c.cpu.as_option().is_none()
        && c.memory.as_option().is_none()
        && c.kernel.as_option().is_none()
        && c.rootfs.as_option().is_none()
        && c.drives.is_empty()
        && c.kernel_args.is_empty()
        && c.network.as_option().is_none();
    if !only_metadata {
        return Err(ConnectError::invalid_argument(
            "config: with from_snapshot, only config.metadata may be set (the VM gets the snapshot's configuration)",
        ));
    }
    Ok(c.metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// The protobuf message for a snapshot.
pub fn snapshot_to_proto(s: &crate::store::SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        snapshot_id: s.id.clone(),
        source_vm_id: s.source_vm.to_string(),
        state: match s.state {
            crate::store::SnapshotState::Creating => pb::SnapshotState::SNAPSHOT_STATE_CREATING,
            crate::store::SnapshotState::Ready => pb::SnapshotState::SNAPSHOT_STATE_READY,
        }
        .into(),
        backend: s.backend.clone(),
        config: config_to_proto(&s.config).into(),
        size_bytes: s.bytes,
        created_at: rfc3339(s.created_at_ms),
        ..Default::default()
    }
}

/// CreateSnapshot.
pub async fn create_snapshot(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    id: &str,
) -> Result<pb::CreateSnapshotResponse, ConnectError> {
    let id = vm_id("vm_id", id)?;
    // The snapshot's files are written on the VM's host.
    if let Whereabouts::Peer(host) = svc.whereabouts(&who.customer, &id).await.map_err(err)? {
        let req = pb::CreateSnapshotRequest {
            vm_id: id.to_string(),
            ..Default::default()
        };
        return peers.create_snapshot(&host, who, req).await;
    }
    let (s, c, vm) = (Arc::clone(svc), who.customer.clone(), id.clone());
    let work = async move { s.create_snapshot(&c, &vm).await };
    let snap = effect(who, "CreateSnapshot", Some(id), work).await?;
    Ok(pb::CreateSnapshotResponse {
        snapshot: snapshot_to_proto(&snap).into(),
        ..Default::default()
    })
}

/// ListSnapshots.
pub async fn list_snapshots(
    svc: &Arc<VmService>,
    who: &Identity,
) -> Result<pb::ListSnapshotsResponse, ConnectError> {
    let snaps = svc.list_snapshots(&who.customer).await.map_err(err)?;
    Ok(pb::ListSnapshotsResponse {
        snapshots: snaps.iter().map(snapshot_to_proto).collect(),
        ..Default::default()
    })
}

/// DeleteSnapshot.
pub async fn delete_snapshot(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    id: &str,
) -> Result<(), ConnectError> {
    let id = snapshot_id("snapshot_id", id)?;
    // Its files go with it, on the host that holds them.
    if let Whereabouts::Peer(host) = svc.snapshot_whereabouts(&who.customer, &id).map_err(err)? {
        let req = pb::DeleteSnapshotRequest {
            snapshot_id: id,
            ..Default::default()
        };
        return peers.delete_snapshot(&host, who, req).await;
    }
    let (s, customer) = (Arc::clone(svc), who.customer.clone());
    effect(who, "DeleteSnapshot", None, async move {
        s.delete_snapshot(&customer, &id).await
    })
    .await
}

/// A lifecycle call on the caller's VM `raw_id`: the id is parsed; on this host `op` (given the
/// service, the customer and the VM) runs in a task of its own and is audited as the call's
/// method, and on an UP peer the call is forwarded (and audited there). The VM as it is after.
async fn on_vm<F, Fut>(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    (method, call): (&'static str, Call),
    raw_id: &str,
    op: F,
) -> Result<pb::VmInfo, ConnectError>
where
    F: FnOnce(Arc<VmService>, CustomerId, VmId) -> Fut,
    Fut: std::future::Future<Output = Result<VmRecord, ServiceError>> + Send + 'static,
{
    let id = vm_id("vm_id", raw_id)?;
    match svc.whereabouts(&who.customer, &id).await.map_err(err)? {
        Whereabouts::Peer(host) => peers
            .forward(&host, who, &id, call)
            .await?
            .ok_or_else(|| ConnectError::internal("the VM's host answered without the VM")),
        Whereabouts::Here => {
            let work = op(Arc::clone(svc), who.customer.clone(), id.clone());
            let vm = effect(who, method, Some(id), work).await?;
            Ok(vm_info(svc, &vm, who))
        }
    }
}

/// BootVm.
pub async fn boot_vm(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    id: &str,
) -> Result<pb::VmInfo, ConnectError> {
    on_vm(
        svc,
        peers,
        who,
        ("BootVm", Call::Boot),
        id,
        |s, c, vm| async move { s.boot(&c, &vm).await },
    )
    .await
}

/// ShutdownVm.
pub async fn shutdown_vm(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    id: &str,
    force: bool,
    timeout_seconds: u32,
) -> Result<pb::VmInfo, ConnectError> {
    let request = ShutdownRequest {
        force,
        timeout_seconds,
    };
    let call = Call::Shutdown {
        force,
        timeout_seconds,
    };
    on_vm(
        svc,
        peers,
        who,
        ("ShutdownVm", call),
        id,
        |s, c, vm| async move { s.shutdown(&c, &vm, request).await },
    )
    .await
}

/// PauseVm.
pub async fn pause_vm(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    id: &str,
) -> Result<pb::VmInfo, ConnectError> {
    on_vm(
        svc,
        peers,
        who,
        ("PauseVm", Call::Pause),
        id,
        |s, c, vm| async move { s.pause(&c, &vm).await },
    )
    .await
}

/// ResumeVm.
pub async fn resume_vm(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    id: &str,
) -> Result<pb::VmInfo, ConnectError> {
    on_vm(
        svc,
        peers,
        who,
        ("ResumeVm", Call::Resume),
        id,
        |s, c, vm| async move { s.resume(&c, &vm).await },
    )
    .await
}

/// SuspendVm.
pub async fn suspend_vm(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    id: &str,
) -> Result<pb::VmInfo, ConnectError> {
    on_vm(
        svc,
        peers,
        who,
        ("SuspendVm", Call::Suspend),
        id,
        |s, c, vm| async move { s.suspend(&c, &vm).await },
    )
    .await
}

/// RebootVm.
pub async fn reboot_vm(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    id: &str,
    force: bool,
) -> Result<pb::VmInfo, ConnectError> {
    on_vm(
        svc,
        peers,
        who,
        ("RebootVm", Call::Reboot { force }),
        id,
        |s, c, vm| async move { s.reboot(&c, &vm, force).await },
    )
    .await
}

/// DeleteVm.
pub async fn delete_vm(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Arc<Identity>,
    id: &str,
    force: bool,
) -> Result<(), ConnectError> {
    let id = vm_id("vm_id", id)?;
    match svc.whereabouts(&who.customer, &id).await.map_err(err)? {
        Whereabouts::Peer(host) => {
            let call = Call::Delete { force };
            peers.forward(&host, who, &id, call).await.map(drop)
        }
        Whereabouts::Here => {
            let (s, c, vm) = (Arc::clone(svc), who.customer.clone(), id.clone());
            let work = async move { s.delete(&c, &vm, force).await };
            effect(who, "DeleteVm", Some(id), work).await
        }
    }
}

/// GetVmInfo.
pub async fn get_vm(
    svc: &Arc<VmService>,
    who: &Identity,
    id: &str,
) -> Result<pb::VmInfo, ConnectError> {
    let vm = svc
        .get(&who.customer, &vm_id("vm_id", id)?)
        .await
        .map_err(err)?;
    let held = svc.held_by(std::slice::from_ref(&vm)).map_err(err)?;
    Ok(read_info(svc, &vm, who, &held[0]))
}

/// A VM as a read from the shared store shows it: another host's VM has that host's status
/// and its gateways from that host's blocks; its host-side names are that host's, not known
/// here (an operator asks that host).
fn read_info(svc: &VmService, vm: &VmRecord, who: &Identity, held: &HeldBy) -> pb::VmInfo {
    let mut info = vm_info(svc, vm, who);
    let host = match held {
        HeldBy::Here => return info,
        HeldBy::Gone => None,
        HeldBy::Peer(h) => Some(h),
    };
    info.host_status = host_status_to_proto(host.map_or(HostStatus::Down, |h| h.status)).into();
    info.vmm_pid = 0;
    if let Some(net) = info.network.as_option_mut() {
        net.tap_device.clear();
        net.network_namespace.clear();
        net.host_interface.clear();
        if let Some((v6, v4)) = host.and_then(|h| svc.blocks_of(h.index)) {
            net.gateway_ipv6 = v6.gateway().to_string();
            net.gateway_ipv4 = v4.map(|s| s.gateway().to_string()).unwrap_or_default();
        }
    }
    info
}

fn host_status_to_proto(s: HostStatus) -> pb::HostStatus {
    match s {
        HostStatus::Up => pb::HostStatus::HOST_STATUS_UP,
        HostStatus::Down => pb::HostStatus::HOST_STATUS_DOWN,
    }
}

/// ListVms.
pub async fn list_vms(
    svc: &Arc<VmService>,
    who: &Identity,
    state: Option<VmState>,
    page_size: u32,
    page_token: &str,
) -> Result<pb::ListVmsResponse, ConnectError> {
    let page = svc
        .list(&who.customer, state, page_size, page_token)
        .await
        .map_err(err)?;
    let held = svc.held_by(&page.vms).map_err(err)?;
    Ok(pb::ListVmsResponse {
        vms: page
            .vms
            .iter()
            .zip(&held)
            .map(|(vm, held)| read_info(svc, vm, who, held))
            .collect(),
        next_page_token: page.next_page_token,
        ..Default::default()
    })
}

/// GetVmConsole.
pub async fn get_console(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Identity,
    id: &str,
    tail_bytes: u32,
) -> Result<pb::GetVmConsoleResponse, ConnectError> {
    let id = vm_id("vm_id", id)?;
    // The console log is a file on the VM's host.
    if let Whereabouts::Peer(host) = svc.whereabouts(&who.customer, &id).await.map_err(err)? {
        let req = pb::GetVmConsoleRequest {
            vm_id: id.to_string(),
            tail_bytes,
            ..Default::default()
        };
        return peers.console(&host, who, req).await;
    }
    let tail = svc
        .console(&who.customer, &id, tail_bytes)
        .await
        .map_err(err)?;
    Ok(pb::GetVmConsoleResponse {
        output: tail.output,
        total_bytes: tail.total_bytes,
        truncated: tail.truncated,
        dropped_bytes: tail.dropped_bytes,
        ..Default::default()
    })
}

/// An RFC 3339 request field as Unix milliseconds; empty gives `default`.
fn time_ms(field: &str, raw: &str, default: i64) -> Result<i64, ConnectError> {
    if raw.is_empty() {
        return Ok(default);
    }
    time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
        .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
        .map_err(|e| {
            ConnectError::invalid_argument(format!(
                "{field}: '{}' is not an RFC 3339 time ({e})",
                crate::domain::truncate_for_message(raw)
            ))
        })
}

fn usage_to_proto(c: &Counters, memory_configured: u64) -> pb::Usage {
    pb::Usage {
        cpu_time_nanos: c.cpu_ns,
        memory_usage_bytes: c.memory_bytes,
        memory_configured_bytes: memory_configured,
        disk_read_bytes: c.disk_read_bytes,
        disk_write_bytes: c.disk_write_bytes,
        disk_read_ops: c.disk_read_ops,
        disk_write_ops: c.disk_write_ops,
        network_rx_bytes: c.net_rx_bytes,
        network_tx_bytes: c.net_tx_bytes,
        network_rx_packets: c.net_rx_packets,
        network_tx_packets: c.net_tx_packets,
        ..Default::default()
    }
}

/// GetVmUsage.
pub async fn get_usage(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Identity,
    id: &str,
    since: &str,
) -> Result<pb::GetVmUsageResponse, ConnectError> {
    let id = vm_id("vm_id", id)?;
    let since_ms = time_ms("since", since, i64::MIN)?;
    // Live samples are kept by the meter of the VM's host.
    if let Whereabouts::Peer(host) = svc.whereabouts(&who.customer, &id).await.map_err(err)? {
        let req = pb::GetVmUsageRequest {
            vm_id: id.to_string(),
            since: since.to_string(),
            ..Default::default()
        };
        return peers.usage(&host, who, req).await;
    }
    let u = svc.usage(&who.customer, &id, since_ms).await.map_err(err)?;
    Ok(pb::GetVmUsageResponse {
        vm_id: id.to_string(),
        total: usage_to_proto(&u.total, u.memory_configured).into(),
        samples: u
            .samples
            .iter()
            .map(|p| pb::UsageSample {
                timestamp: rfc3339(p.wall_ms),
                monotonic_nanos: p.mono_ns,
                usage: usage_to_proto(&p.total, u.memory_configured).into(),
                ..Default::default()
            })
            .collect(),
        interval_millis: u32::try_from(svc.metering_interval().as_millis()).unwrap_or(u32::MAX),
        vmm_metrics_raw: u.vmm_metrics_raw.unwrap_or_default(),
        current_run: u
            .run
            .map(|r| usage_to_proto(&r, u.memory_configured))
            .into(),
        ..Default::default()
    })
}

/// ListCustomerUsage.
pub async fn list_customer_usage(
    svc: &Arc<VmService>,
    peers: &Peers,
    who: &Identity,
    start: &str,
    end: &str,
) -> Result<pb::ListCustomerUsageResponse, ConnectError> {
    let (start_raw, end_raw) = (start, end);
    let start = time_ms("start", start, i64::MIN)?;
    let end = time_ms("end", end, i64::MAX)?;
    let vms = svc
        .customer_usage(&who.customer, start, end)
        .await
        .map_err(err)?;
    let mut answer = pb::ListCustomerUsageResponse {
        vms: vms
            .iter()
            .map(|w| pb::VmUsage {
                vm_id: w.vm.to_string(),
                usage: usage_to_proto(&w.usage, 0).into(),
                covered_start: w
                    .covered_from_ms
                    .map(crate::domain::rfc3339)
                    .unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    // Live usage is each host's meter's: the other UP hosts add their VMs' (a call a peer
    // forwarded answers for this host alone). A DOWN host's VMs are left out until it is back.
    if !who.forwarded {
        let me = svc.membership().host_id();
        let req = pb::ListCustomerUsageRequest {
            start: start_raw.to_string(),
            end: end_raw.to_string(),
            ..Default::default()
        };
        for host in svc
            .membership()
            .hosts()
            .map_err(|e| err(ServiceError::Store(e)))?
        {
            if host.registration.id == me || host.status != HostStatus::Up {
                continue;
            }
            let theirs = peers.customer_usage(&host, who, req.clone()).await?;
            answer.vms.extend(theirs.vms);
        }
        answer.vms.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    }
    Ok(answer)
}

/// The fleet's hosts (an operator call, like [`host_capacity`]).
pub async fn fleet(svc: &Arc<VmService>) -> Result<pb::GetFleetResponse, ConnectError> {
    let m = Arc::clone(svc.membership());
    let hosts = tokio::task::spawn_blocking({
        let m = Arc::clone(&m);
        move || m.hosts()
    })
    .await
    .map_err(|e| ConnectError::internal(format!("listing hosts: {e}")))?
    .map_err(|e| err(ServiceError::Store(e)))?;
    let hosts = hosts
        .into_iter()
        .map(|h| {
            let blocks = m.blocks(h.index);
            pb::FleetHost {
                host_id: h.registration.id.to_string(),
                status: host_status_to_proto(h.status).into(),
                advertise_url: h.registration.advertise_url,
                memory_bytes: h.registration.capacity.memory_bytes.unwrap_or(0),
                vcpus: h.registration.capacity.vcpus.unwrap_or(0),
                labels: h.registration.labels.into_iter().collect(),
                vm_count: h.vms,
                index: h.index,
                ipv6_prefix: blocks.map(|b| b.0.to_string()).unwrap_or_default(),
                ipv4_subnet: blocks
                    .and_then(|b| b.1)
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                lease_expires_unix_ms: h.lease_expires_ms,
                ..Default::default()
            }
        })
        .collect();
    Ok(pb::GetFleetResponse {
        hosts,
        this_host: m.host_id().to_string(),
        ..Default::default()
    })
}

/// The host's capacity and use, over every customer (the caller is authenticated by the
/// route; which callers may ask is the auth layer's decision).
pub async fn host_capacity(
    svc: &Arc<VmService>,
) -> Result<pb::GetHostCapacityResponse, ConnectError> {
    let c = svc.host_capacity().map_err(err)?;
    let resource = |a: Amount| pb::HostResource {
        total: a.total,
        used: a.used,
        free: a.free,
        ..Default::default()
    };
    Ok(pb::GetHostCapacityResponse {
        memory_bytes: resource(c.memory_bytes).into(),
        vcpus: resource(c.vcpus).into(),
        disk_bytes: resource(c.disk_bytes).into(),
        vms: resource(c.vms).into(),
        memory_overcommit: c.memory_overcommit,
        cpu_overcommit: c.cpu_overcommit,
        ..Default::default()
    })
}
