//! Lifecycle calls for a VM another host of the fleet holds, forwarded to that host.
//!
//! The call goes over the peer's own API (Connect), with mTLS: this host presents its own
//! certificate, which the peer lists as a trusted service, and names the verified caller's
//! customer in `metald-customer`. The peer checks ownership again, as for any caller. It sees
//! `metald-forwarded-by` and never forwards the call further, so hosts that disagree about a
//! URL cannot bounce a call between them. What the peer answers is cut to what the caller may
//! see here: a customer learns neither host details nor which host answered.

use std::time::Duration;

use connectrpc::client::{CallOptions, ClientBody, ClientConfig, ServiceTransport};
use connectrpc::ConnectError;
use metald_proto::metald::v1 as pb;

use super::auth::{Identity, CUSTOMER_HEADER, FORWARDED_HEADER};
use crate::config::TlsSettings;
use crate::domain::VmId;
use crate::fleet::{HostId, HostRecord};
use crate::peer_client::{PeerClient, PeerClientError, PeerHttp};

/// The longest a forwarded call may take: a boot waits for the guest.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(300);

/// A lifecycle call, as forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// BootVm.
    Boot,
    /// ShutdownVm.
    Shutdown {
        /// Kill at once.
        force: bool,
        /// Seconds the guest may take.
        timeout_seconds: u32,
    },
    /// PauseVm.
    Pause,
    /// ResumeVm.
    Resume,
    /// SuspendVm.
    Suspend,
    /// RebootVm.
    Reboot {
        /// Kill and start again rather than ask the guest.
        force: bool,
    },
    /// DeleteVm.
    Delete {
        /// Kill at once.
        force: bool,
    },
}

/// The forwarding client, as connectrpc wants it.
type PeerTransport = ServiceTransport<PeerHttp<ClientBody>>;

/// How this host calls its peers for the VMs they hold.
pub struct Peers {
    me: HostId,
    http: PeerClient<ClientBody>,
}

impl Peers {
    /// Peers of `me`, called with the host's own TLS files (none: forwarding is refused).
    pub fn new(me: HostId, tls: Option<TlsSettings>) -> Self {
        Self {
            me,
            http: PeerClient::new(tls),
        }
    }

    fn http(&self) -> Result<PeerTransport, ConnectError> {
        match self.http.get() {
            Ok(client) => Ok(ServiceTransport::new(client)),
            Err(PeerClientError::NoTls) => Err(ConnectError::unavailable(
                "the VM's host is another host of the fleet, and this host has no TLS \
                 certificate to call it with (UNKEY_METALD_TLS_*)",
            )),
            Err(e) => {
                tracing::error!(error = %crate::report::Chain(&e), "cannot build the client that calls fleet peers");
                Err(ConnectError::unavailable(
                    "this host cannot call its fleet peers (see its log)",
                ))
            }
        }
    }

    /// Creates the VM `req` asks for on `host`, the host placement chose: the host creates it
    /// there (it does not place it again); the VM as it answers.
    pub async fn create(
        &self,
        host: &HostRecord,
        who: &Identity,
        req: pb::CreateVmRequest,
    ) -> Result<pb::VmInfo, ConnectError> {
        let client = self.client(host)?;
        let opts = self.options(who);
        let reg = &host.registration;
        let r = client
            .create_vm_with_options(req, opts)
            .await
            .map_err(|e| peer_error(e, reg))?
            .into_owned();
        let info =
            r.vm.into_option()
                .ok_or_else(|| ConnectError::internal("the chosen host answered without the VM"))?;
        Ok(for_caller(info, who))
    }

    /// CreateSnapshot on the VM's host (the snapshot's files are written there).
    pub async fn create_snapshot(
        &self,
        host: &HostRecord,
        who: &Identity,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::CreateSnapshotResponse, ConnectError> {
        let client = self.client(host)?;
        Ok(client
            .create_snapshot_with_options(req, self.options(who))
            .await
            .map_err(|e| peer_error(e, &host.registration))?
            .into_owned())
    }

    /// DeleteSnapshot on the host holding the snapshot's files.
    pub async fn delete_snapshot(
        &self,
        host: &HostRecord,
        who: &Identity,
        req: pb::DeleteSnapshotRequest,
    ) -> Result<(), ConnectError> {
        let client = self.client(host)?;
        client
            .delete_snapshot_with_options(req, self.options(who))
            .await
            .map_err(|e| peer_error(e, &host.registration))?;
        Ok(())
    }

    /// ListCustomerUsage of the caller's VMs on `host` (its meter's live samples).
    pub async fn customer_usage(
        &self,
        host: &HostRecord,
        who: &Identity,
        req: pb::ListCustomerUsageRequest,
    ) -> Result<pb::ListCustomerUsageResponse, ConnectError> {
        let client = self.client(host)?;
        Ok(client
            .list_customer_usage_with_options(req, self.options(who))
            .await
            .map_err(|e| peer_error(e, &host.registration))?
            .into_owned())
    }

    /// GetVmConsole on the VM's host (its console log is a file there).
    pub async fn console(
        &self,
        host: &HostRecord,
        who: &Identity,
        req: pb::GetVmConsoleRequest,
    ) -> Result<pb::GetVmConsoleResponse, ConnectError> {
        let client = self.client(host)?;
        Ok(client
            .get_vm_console_with_options(req, self.options(who))
            .await
            .map_err(|e| peer_error(e, &host.registration))?
            .into_owned())
    }

    /// GetVmUsage on the VM's host (its meter keeps the live samples).
    pub async fn usage(
        &self,
        host: &HostRecord,
        who: &Identity,
        req: pb::GetVmUsageRequest,
    ) -> Result<pb::GetVmUsageResponse, ConnectError> {
        let client = self.client(host)?;
        Ok(client
            .get_vm_usage_with_options(req, self.options(who))
            .await
            .map_err(|e| peer_error(e, &host.registration))?
            .into_owned())
    }

    fn client(
        &self,
        host: &HostRecord,
    ) -> Result<pb::VmServiceClient<PeerTransport>, ConnectError> {
        let reg = &host.registration;
        let uri = reg.advertise_url.parse().map_err(|_| {
            tracing::error!(host = %reg.id, url = %reg.advertise_url, "a fleet peer advertises a URL that does not parse");
            ConnectError::unavailable("the VM's host cannot be reached")
        })?;
        Ok(pb::VmServiceClient::new(
            self.http()?,
            ClientConfig::new(uri),
        ))
    }

    fn options(&self, who: &Identity) -> CallOptions {
        CallOptions::default()
            .with_timeout(FORWARD_TIMEOUT)
            .with_header(CUSTOMER_HEADER, who.customer.as_str())
            .with_header(FORWARDED_HEADER, self.me.as_str())
    }

    /// Runs `call` on the VM's host; the VM as it answers (`None` for a delete).
    pub async fn forward(
        &self,
        host: &HostRecord,
        who: &Identity,
        id: &VmId,
        call: Call,
    ) -> Result<Option<pb::VmInfo>, ConnectError> {
        if who.forwarded {
            // The forwarding host thought this host holds the VM, and this host's store says
            // another: refuse rather than pass it on.
            return Err(ConnectError::unavailable(
                "the VM's host could not be reached (forwarded call not for this host)",
            ));
        }
        let reg = &host.registration;
        let client = self.client(host)?;
        let opts = self.options(who);
        let vm_id = id.to_string();
        tracing::debug!(host = %reg.id, vm_id = %id, ?call, "forwarding to the VM's host");
        let info = call_peer(&client, opts, vm_id, call)
            .await
            .map_err(|e| peer_error(e, reg))?;
        Ok(info.map(|i| for_caller(i, who)))
    }
}

/// A peer's error as the caller sees it: the peer's own answer about the VM (not found, a
/// wrong state, a quota) passes; a peer that did not answer (or whose answer is about itself)
/// is only "cannot be reached now", naming no host.
fn peer_error(e: ConnectError, reg: &crate::fleet::HostRegistration) -> ConnectError {
    use connectrpc::ErrorCode as C;
    match e.code {
        C::Unavailable | C::Unknown | C::DeadlineExceeded | C::Internal => {
            tracing::warn!(host = %reg.id, error = %e, "forwarded call failed");
            ConnectError::unavailable("the VM's host cannot be reached now")
        }
        _ => e,
    }
}

/// Sends `call` for `vm_id` to the peer behind `client`.
async fn call_peer(
    client: &pb::VmServiceClient<PeerTransport>,
    opts: CallOptions,
    vm_id: String,
    call: Call,
) -> Result<Option<pb::VmInfo>, ConnectError> {
    Ok(match call {
        Call::Boot => {
            let req = pb::BootVmRequest {
                vm_id,
                ..Default::default()
            };
            let r = client.boot_vm_with_options(req, opts).await?.into_owned();
            r.vm.into_option()
        }
        Call::Shutdown {
            force,
            timeout_seconds,
        } => {
            let req = pb::ShutdownVmRequest {
                vm_id,
                force,
                timeout_seconds,
                ..Default::default()
            };
            let r = client
                .shutdown_vm_with_options(req, opts)
                .await?
                .into_owned();
            r.vm.into_option()
        }
        Call::Pause => {
            let req = pb::PauseVmRequest {
                vm_id,
                ..Default::default()
            };
            let r = client.pause_vm_with_options(req, opts).await?.into_owned();
            r.vm.into_option()
        }
        Call::Resume => {
            let req = pb::ResumeVmRequest {
                vm_id,
                ..Default::default()
            };
            let r = client.resume_vm_with_options(req, opts).await?.into_owned();
            r.vm.into_option()
        }
        Call::Suspend => {
            let req = pb::SuspendVmRequest {
                vm_id,
                ..Default::default()
            };
            let r = client
                .suspend_vm_with_options(req, opts)
                .await?
                .into_owned();
            r.vm.into_option()
        }
        Call::Reboot { force } => {
            let req = pb::RebootVmRequest {
                vm_id,
                force,
                ..Default::default()
            };
            let r = client.reboot_vm_with_options(req, opts).await?.into_owned();
            r.vm.into_option()
        }
        Call::Delete { force } => {
            let req = pb::DeleteVmRequest {
                vm_id,
                force,
                ..Default::default()
            };
            client.delete_vm_with_options(req, opts).await?;
            None
        }
    })
}

/// The peer answered a trusted service (every scope): cut host details for a caller who is
/// not an operator, as a local answer would.
fn for_caller(mut info: pb::VmInfo, who: &Identity) -> pb::VmInfo {
    if !who.operator {
        info.vmm_pid = 0;
        if let Some(net) = info.network.as_option_mut() {
            net.tap_device.clear();
            net.network_namespace.clear();
            net.host_interface.clear();
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(operator: bool) -> Identity {
        Identity {
            customer: "acme".parse().unwrap(),
            subject: None,
            service: None,
            peer: None,
            operator,
            forwarded: false,
        }
    }

    fn answered() -> pb::VmInfo {
        pb::VmInfo {
            vm_id: "vm-x".into(),
            vmm_pid: 42,
            network: pb::VmNetworkInfo {
                ipv6_address: "fd00::2".into(),
                tap_device: "tap0".into(),
                network_namespace: "/run/metald/netns/vm-x".into(),
                host_interface: "mw1".into(),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_peers_answer_keeps_host_details_for_operators_only() {
        let customer = for_caller(answered(), &identity(false));
        assert_eq!(customer.vmm_pid, 0);
        let net = customer.network.as_option().unwrap();
        assert_eq!(net.ipv6_address, "fd00::2");
        assert!(net.tap_device.is_empty() && net.network_namespace.is_empty());
        assert!(net.host_interface.is_empty());
        assert_eq!(for_caller(answered(), &identity(true)), answered());
    }

    #[tokio::test]
    async fn a_forwarded_call_is_not_forwarded_again() {
        let peers = Peers::new("a".parse().unwrap(), None);
        let mut who = identity(false);
        who.forwarded = true;
        let host = HostRecord {
            registration: crate::fleet::HostRegistration {
                id: "b".parse().unwrap(),
                advertise_url: "https://b:8443".into(),
                capacity: Default::default(),
                labels: Default::default(),
            },
            index: 1,
            lease_expires_ms: 0,
            status: crate::fleet::HostStatus::Up,
            vms: 0,
        };
        let e = peers
            .forward(&host, &who, &VmId::generate(), Call::Boot)
            .await
            .unwrap_err();
        assert_eq!(e.code, connectrpc::ErrorCode::Unavailable);
        // Without TLS files there is no client to call a peer with: refused, naming no host.
        who.forwarded = false;
        let e = peers
            .forward(&host, &who, &VmId::generate(), Call::Boot)
            .await
            .unwrap_err();
        assert_eq!(e.code, connectrpc::ErrorCode::Unavailable);
        assert!(!e.to_string().contains("https://b"), "{e}");
    }
}
