//! Per-VM networking: every running VM gets its own network namespace, holding a bridge that
//! joins the VM's TAP (made by the jailer) to one end of a veth pair; the other end stays in
//! metald's namespace, where it is routed.
//!
//! ```text
//!  guest eth0 ── tap0 ┐                      metald's namespace
//!  (P::n/128,         ├ br0 ─ veth ══ veth ─ mvXXXX  (P::1/128 and S.1/32: the gateway;
//!   S.n/32)  VM netns ┘                               routes P::n/128, S.n/32 → mvXXXX)
//! ```
//!
//! IPv6 first: every VM has an address from `UNKEY_METALD_IPV6_PREFIX`; IPv4 only when
//! `UNKEY_METALD_IPV4_SUBNET` is set. The guest learns them from its kernel command line
//! (`metald.ip6=`, `metald.gw6=`, `metald.ip4=`, `metald.gw4=`), so no DHCP server runs. The
//! guest's addresses are host routes (/128, /32), so every packet goes through the host, where
//! metald's nftables table keeps customers apart (see [`nft`]). These arguments are part of the
//! guest contract, written down in `guest/README.md`, which the default guest's scripts follow.

pub use metald_domain::ipam;
pub mod netns;
pub mod nft;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::sync::Mutex;

use self::ipam::{Ipv4Subnet, Ipv6Prefix};
use self::nft::{Firewall, FirewallVm, HOST_IF_PREFIX};
use crate::domain::{RateLimit, VmId, VmRecord};
use crate::report::Chain;

/// Name of the VM's TAP inside its namespace.
pub const TAP_NAME: &str = "tap0";
/// Name of the bridge inside the VM's namespace.
pub const BRIDGE_NAME: &str = "br0";
/// Prefix of the namespace-side veth end's name (while it is still in metald's namespace).
pub const PEER_IF_PREFIX: &str = "mp";

/// Network settings of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Where VM IPv6 addresses come from.
    pub ipv6_prefix: Ipv6Prefix,
    /// Where VM IPv4 addresses come from; IPv4 is off without it.
    pub ipv4_subnet: Option<Ipv4Subnet>,
    /// Interface VMs may reach the outside world through; none by default.
    pub outbound_interface: Option<String>,
    /// Where namespace files are pinned.
    pub netns_dir: PathBuf,
    /// The `nft` binary.
    pub nft_bin: PathBuf,
}

/// The network of one VM run, as the jailer and the backends need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNetworkPlan {
    /// The VM's namespace file.
    pub netns: PathBuf,
    /// The TAP the VMM attaches to, inside the namespace.
    pub tap: String,
    /// The bridge inside the namespace.
    pub bridge: String,
    /// The veth end inside the namespace.
    pub peer_if: String,
    /// The veth end in metald's namespace.
    pub host_if: String,
    /// The guest's MAC.
    pub mac: String,
    /// The guest's IPv6 address.
    pub ipv6: Ipv6Addr,
    /// The guest's IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// The IPv6 gateway (on the host side).
    pub gateway6: Ipv6Addr,
    /// The IPv4 gateway (on the host side).
    pub gateway4: Option<Ipv4Addr>,
    /// Limit on traffic to the guest.
    pub rx_rate_limit: Option<RateLimit>,
    /// Limit on traffic from the guest.
    pub tx_rate_limit: Option<RateLimit>,
}

impl VmNetworkPlan {
    /// Kernel arguments telling the guest its addresses (the guest contract: `guest/README.md`).
    pub fn kernel_args(&self) -> String {
        let mut a = format!("metald.ip6={} metald.gw6={}", self.ipv6, self.gateway6);
        if let (Some(ip), Some(gw)) = (self.ipv4, self.gateway4) {
            a.push_str(&format!(" metald.ip4={ip} metald.gw4={gw}"));
        }
        a
    }
}

/// Errors setting up or tearing down VM networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A netlink request failed.
    #[error("{op}")]
    Netlink {
        /// What was being done.
        op: String,
        /// rtnetlink's error.
        #[source]
        source: rtnetlink::Error,
    },
    /// A file or namespace operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The firewall rules could not be applied.
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    /// An interface was expected and is not there.
    #[error("interface {0} not found")]
    NoInterface(String),
    /// The VM has no allocated addresses (created before networking existed).
    #[error("VM {0} has no network allocation")]
    NotAllocated(VmId),
}

/// One transmit and one receive queue for a veth end. The kernel's default is one of each per
/// possible CPU, and reading a veth's counters (the sampler does, every tick, for every VM)
/// visits each receive queue of both ends; the queues only matter for XDP, which metald does
/// not use.
fn single_queue<T>(b: LinkMessageBuilder<T>) -> LinkMessageBuilder<T> {
    b.append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let op = op.into();
    move |source| NetworkError::Netlink { op, source }
}

/// Host-side interface names of a VM: `mv`/`mp` plus 12 hex digits of its UUID (IFNAMSIZ is 16).
pub fn interface_names(vm: &VmId) -> (String, String) {
    let hex: String = vm
        .as_str()
        .trim_start_matches("vm-")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(12)
        .collect();
    (
        format!("{HOST_IF_PREFIX}{hex}"),
        format!("{PEER_IF_PREFIX}{hex}"),
    )
}

/// Sets up and tears down VM networks in metald's own namespace.
pub struct Network {
    cfg: NetworkConfig,
    handle: rtnetlink::Handle,
    firewall: Mutex<Firewall>,
}

impl Network {
    /// Connects to rtnetlink, turns on forwarding in metald's namespace and prepares the
    /// namespace directory.
    pub fn new(cfg: NetworkConfig) -> Result<Self, NetworkError> {
        std::fs::create_dir_all(&cfg.netns_dir).map_err(|source| NetworkError::Io {
            op: "create",
            path: cfg.netns_dir.clone(),
            source,
        })?;
        // Routing between VMs (and to the gateway) happens in this namespace.
        for knob in [
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "/proc/sys/net/ipv4/ip_forward",
        ] {
            std::fs::write(knob, "1").map_err(|source| NetworkError::Io {
                op: "enable forwarding",
                path: knob.into(),
                source,
            })?;
        }
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetworkError::Io {
            op: "open netlink socket",
            path: PathBuf::new(),
            source,
        })?;
        tokio::spawn(conn);
        let firewall = Firewall {
            outbound_interface: cfg.outbound_interface.clone(),
            ipv4_subnet: cfg.ipv4_subnet.map(|s| s.to_string()),
            ..Firewall::default()
        };
        Ok(Self {
            cfg,
            handle,
            firewall: Mutex::new(firewall),
        })
    }

    /// The VM's namespace file.
    pub fn netns_path(&self, vm: &VmId) -> PathBuf {
        self.cfg.netns_dir.join(vm.as_str())
    }

    /// The network a VM runs with (its allocation plus derived names).
    pub fn plan(&self, vm: &VmRecord) -> Result<VmNetworkPlan, NetworkError> {
        let net = vm
            .net
            .as_ref()
            .ok_or_else(|| NetworkError::NotAllocated(vm.id.clone()))?;
        let (host_if, peer_if) = interface_names(&vm.id);
        Ok(VmNetworkPlan {
            netns: self.netns_path(&vm.id),
            tap: TAP_NAME.into(),
            bridge: BRIDGE_NAME.into(),
            peer_if,
            host_if,
            mac: net.mac.clone(),
            ipv6: net.ipv6,
            ipv4: net.ipv4,
            gateway6: self.cfg.ipv6_prefix.gateway(),
            gateway4: self.cfg.ipv4_subnet.map(|s| s.gateway()),
            rx_rate_limit: vm.config.network.rx_rate_limit,
            tx_rate_limit: vm.config.network.tx_rate_limit,
        })
    }

    /// Makes the VM's namespace and veth pair, routes its addresses, and lets it through the
    /// firewall. On failure everything made so far is removed again.
    pub async fn setup(&self, vm: &VmRecord) -> Result<VmNetworkPlan, NetworkError> {
        let plan = self.plan(vm)?;
        // Leftovers of an earlier run of this VM (metald killed mid-way) are replaced.
        self.remove_plumbing(&vm.id).await;
        let made = match self.make_plumbing(&plan).await {
            Ok(()) => self.allow(vm, &plan).await,
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            self.remove_plumbing(&vm.id).await;
            return Err(e);
        }
        Ok(plan)
    }

    async fn make_plumbing(&self, plan: &VmNetworkPlan) -> Result<(), NetworkError> {
        netns::create(&plan.netns).map_err(|source| NetworkError::Io {
            op: "create network namespace",
            path: plan.netns.clone(),
            source,
        })?;
        let ns = std::fs::File::open(&plan.netns).map_err(|source| NetworkError::Io {
            op: "open network namespace",
            path: plan.netns.clone(),
            source,
        })?;
        // The peer is born inside the VM's namespace: moving an interface between namespaces
        // afterwards costs 30-50 ms of RCU synchronisation, creating it there about 3 ms.
        let peer = {
            use std::os::fd::AsRawFd;
            single_queue(LinkMessageBuilder::<LinkUnspec>::new())
                .name(plan.peer_if.clone())
                .setns_by_fd(ns.as_raw_fd())
                .build()
        };
        let links = self.handle.link();
        links
            .add(
                single_queue(LinkMessageBuilder::<LinkVeth>::new_with_info_kind(
                    InfoKind::Veth,
                ))
                .name(plan.host_if.clone())
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("create veth {}", plan.host_if)))?;
        drop(ns);
        let host = self.index_of(&plan.host_if).await?;
        self.add_address(host, IpAddr::V6(plan.gateway6), 128)
            .await?;
        if let Some(gw4) = plan.gateway4 {
            self.add_address(host, IpAddr::V4(gw4), 32).await?;
        }
        links
            .set(LinkUnspec::new_with_index(host).up().build())
            .execute()
            .await
            .map_err(nl(format!("set {} up", plan.host_if)))?;
        let routes = self.handle.route();
        routes
            .add(
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(plan.ipv6, 128)
                    .output_interface(host)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("route {}", plan.ipv6)))?;
        if let Some(v4) = plan.ipv4 {
            routes
                .add(
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(v4, 32)
                        .output_interface(host)
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("route {v4}")))?;
        }
        Ok(())
    }

    async fn add_address(&self, index: u32, addr: IpAddr, len: u8) -> Result<(), NetworkError> {
        let mut req = self.handle.address().add(index, addr, len);
        // The gateway address sits on every VM's veth; duplicate detection would only delay it.
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        req.execute()
            .await
            .map_err(nl(format!("add address {addr}/{len}")))
    }

    async fn index_of(&self, name: &str) -> Result<u32, NetworkError> {
        self.find(name)
            .await?
            .ok_or_else(|| NetworkError::NoInterface(name.to_string()))
    }

    async fn find(&self, name: &str) -> Result<Option<u32>, NetworkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(msg.header.index)),
            Ok(None) => Ok(None),
            // ENODEV: no such interface.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.map(|c| c.get()) == Some(-libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(source) => Err(NetworkError::Netlink {
                op: format!("look up {name}"),
                source,
            }),
        }
    }

    /// Removes the veth pair (its routes and addresses go with it) and the namespace file.
    async fn remove_plumbing(&self, vm: &VmId) {
        let (host_if, peer_if) = interface_names(vm);
        for name in [&host_if, &peer_if] {
            match self.find(name).await {
                Ok(Some(index)) => {
                    if let Err(e) = self.handle.link().del(index).execute().await {
                        tracing::warn!(interface = %name, error = %Chain(&e), "removing veth failed");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(interface = %name, error = %Chain(&e), "looking up veth failed")
                }
            }
        }
        let ns = self.netns_path(vm);
        if let Err(e) = netns::remove(&ns) {
            tracing::warn!(path = %ns.display(), error = %Chain(&e), "removing network namespace failed");
        }
    }

    async fn allow(&self, vm: &VmRecord, plan: &VmNetworkPlan) -> Result<(), NetworkError> {
        let mut fw = self.firewall.lock().await;
        let mut next = fw.clone();
        next.vms.insert(
            vm.id.to_string(),
            FirewallVm {
                customer: vm.customer.to_string(),
                host_if: plan.host_if.clone(),
                ipv6: plan.ipv6,
                ipv4: plan.ipv4,
            },
        );
        nft::apply(&self.cfg.nft_bin, &next.render()).await?;
        *fw = next;
        Ok(())
    }

    /// Removes everything the VM's run had: firewall entries, veth pair, namespace.
    pub async fn teardown(&self, vm: &VmRecord) -> Result<(), NetworkError> {
        {
            let mut fw = self.firewall.lock().await;
            if fw.vms.contains_key(vm.id.as_str()) {
                let mut next = fw.clone();
                next.vms.remove(vm.id.as_str());
                nft::apply(&self.cfg.nft_bin, &next.render()).await?;
                *fw = next;
            }
        }
        self.remove_plumbing(&vm.id).await;
        Ok(())
    }

    /// Records a VM whose VMM outlived a metald restart (its plumbing is still in place).
    pub async fn adopt(&self, vm: &VmRecord) -> Result<(), NetworkError> {
        let plan = self.plan(vm)?;
        self.firewall.lock().await.vms.insert(
            vm.id.to_string(),
            FirewallVm {
                customer: vm.customer.to_string(),
                host_if: plan.host_if,
                ipv6: plan.ipv6,
                ipv4: plan.ipv4,
            },
        );
        Ok(())
    }

    /// At start: removes namespaces and veths of VMs not in `keep` (logging each), and writes
    /// the firewall for the VMs that are.
    pub async fn sweep(&self, keep: &HashSet<VmId>) -> Result<(), NetworkError> {
        for path in netns::list(&self.cfg.netns_dir) {
            let known = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<VmId>().ok())
                .is_some_and(|id| keep.contains(&id));
            if !known {
                tracing::warn!(path = %path.display(), "removing leftover network namespace");
                if let Err(e) = netns::remove(&path) {
                    tracing::warn!(path = %path.display(), error = %Chain(&e), "removing leftover network namespace failed");
                }
            }
        }
        let keep_ifs: HashSet<String> = keep
            .iter()
            .flat_map(|id| {
                let (h, p) = interface_names(id);
                [h, p]
            })
            .collect();
        let mut links = self.handle.link().get().execute();
        let mut stale = Vec::new();
        while let Some(msg) = links.try_next().await.map_err(nl("list interfaces"))? {
            let name = msg.attributes.iter().find_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let Some(name) = name {
                if is_vm_interface(&name) && !keep_ifs.contains(&name) {
                    stale.push((msg.header.index, name));
                }
            }
        }
        for (index, name) in stale {
            tracing::warn!(interface = %name, "removing leftover VM interface");
            if let Err(e) = self.handle.link().del(index).execute().await {
                tracing::warn!(interface = %name, error = %Chain(&e), "removing leftover VM interface failed");
            }
        }
        let fw = self.firewall.lock().await;
        nft::apply(&self.cfg.nft_bin, &fw.render()).await?;
        Ok(())
    }
}

/// True for names metald gives VM interfaces (`mv`/`mp` + 12 hex digits).
pub fn is_vm_interface(name: &str) -> bool {
    let hex = name
        .strip_prefix(HOST_IF_PREFIX)
        .or_else(|| name.strip_prefix(PEER_IF_PREFIX));
    hex.is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_fit_ifnamsiz_and_are_recognised() {
        let id: VmId = "vm-6f1c7f0e-8d4b-4a53-9b5e-7f2b6f0c1d2e".parse().unwrap();
        let (h, p) = interface_names(&id);
        assert_eq!(h, "mv6f1c7f0e8d4b");
        assert_eq!(p, "mp6f1c7f0e8d4b");
        assert!(h.len() <= 15);
        assert!(is_vm_interface(&h) && is_vm_interface(&p));
        assert!(!is_vm_interface("eth0") && !is_vm_interface("mvx"));
    }
}
