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
pub mod clone_map;
pub mod kernel;
pub mod netns;
pub mod nfnetlink;
pub mod nft;
pub mod pool;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Mutex;

use self::ipam::{Ipv4Subnet, Ipv6Prefix};
use self::kernel::{Links, Namespaces, Rules};
use self::nft::{Firewall, FirewallVm, HOST_IF_PREFIX};
use self::pool::{Pool, Spare};
use crate::domain::{RateLimit, VmId, VmRecord};
use crate::report::Chain;

/// Name of the VM's TAP inside its namespace.
pub const TAP_NAME: &str = "tap0";
/// Name of the bridge inside the VM's namespace.
pub const BRIDGE_NAME: &str = "br0";
/// Prefix of the namespace-side veth end's name given by metald before the warm pool, kept
/// so the start-up sweep still knows them.
pub const PEER_IF_PREFIX: &str = "mp";
/// Name of the veth end inside a VM's namespace: born there, so it needs no unique name.
pub const PEER_IF: &str = "veth0";

/// How long a removal waits for a veth to go with its unpinned namespace before deleting it.
const LINK_GONE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a removal looks whether those veths are gone.
const LINK_GONE_POLL: std::time::Duration = std::time::Duration::from_millis(5);

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
    /// procfs (for the forwarding switches).
    pub proc_root: PathBuf,
    /// How many networks to keep made ahead of boots ([`pool`]); 0: each boot makes its own.
    pub warm_pool: usize,
    /// Runs `nft` (see [`crate::spawner`]); without it metald runs `nft` itself.
    pub spawner: Option<std::sync::Arc<crate::spawner::Spawner>>,
    /// The VM starts in flight, which the warm pool's refills wait out.
    pub starts: std::sync::Arc<crate::starts::Starts>,
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

/// The kernel arguments metald sets for every VM ([`VmNetworkPlan::kernel_args`]): a
/// customer's `kernel_args` may not name them.
pub const RESERVED_KERNEL_ARGS: &[&str] = &["metald.ip6", "metald.gw6", "metald.ip4", "metald.gw4"];

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
    links: Box<dyn Links>,
    rules: Box<dyn Rules>,
    namespaces: Box<dyn Namespaces>,
    firewall: Mutex<Firewall>,
    /// Firewall changes waiting to be loaded together ([`Network::firewall_change`]).
    waiting: std::sync::Mutex<Vec<WaitingChange>>,
    pool: Pool,
    /// Held while a spare is made and put: closing the pool waits for it, so a clean stop
    /// never leaves a spare half made (its task would end with the runtime).
    filling: Mutex<()>,
    /// VMs whose setup took a spare and left its host end (the spare's veth name here) to be
    /// renamed, set up and routed by [`Network::open`], beside the VMM's start.
    unfinished: std::sync::Mutex<HashMap<VmId, String>>,
}

/// A VM's firewall change, before it is made against the model.
#[derive(Debug, Clone)]
enum FirewallOp {
    /// Add the VM's elements (replacing any it has).
    Start(String, FirewallVm),
    /// Delete the VM's elements, if it has any.
    Stop(String),
}

/// A change waiting in a batch, and where its outcome goes.
type WaitingChange = (FirewallOp, tokio::sync::oneshot::Sender<Result<(), String>>);

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
            "sys/net/ipv6/conf/all/forwarding",
            "sys/net/ipv4/ip_forward",
        ] {
            let path = cfg.proc_root.join(knob);
            std::fs::write(&path, "1").map_err(|source| NetworkError::Io {
                op: "enable forwarding",
                path,
                source,
            })?;
        }
        let links = Box::new(kernel::Rtnetlink::connect()?);
        let netlink = nfnetlink::Nfnetlink::connect()
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no nfnetlink socket: firewall changes go through nft");
            })
            .ok();
        let rules = Box::new(kernel::Nft {
            binary: cfg.nft_bin.clone(),
            spawner: cfg.spawner.clone(),
            netlink,
        });
        Ok(Self::with_kernel(
            cfg,
            links,
            rules,
            Box::new(kernel::PinnedNamespaces),
        ))
    }

    /// A network over the given kernel interfaces (fakes in tests); touches nothing itself.
    pub fn with_kernel(
        cfg: NetworkConfig,
        links: Box<dyn Links>,
        rules: Box<dyn Rules>,
        namespaces: Box<dyn Namespaces>,
    ) -> Self {
        let firewall = Firewall::new(
            cfg.outbound_interface.clone(),
            cfg.ipv4_subnet.map(|s| s.to_string()),
        );
        Self {
            pool: Pool::new(cfg.warm_pool),
            filling: Mutex::new(()),
            cfg,
            links,
            rules,
            namespaces,
            firewall: Mutex::new(firewall),
            waiting: std::sync::Mutex::new(Vec::new()),
            unfinished: std::sync::Mutex::new(HashMap::new()),
        }
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
        let (host_if, _) = interface_names(&vm.id);
        Ok(VmNetworkPlan {
            netns: self.netns_path(&vm.id),
            tap: TAP_NAME.into(),
            bridge: BRIDGE_NAME.into(),
            peer_if: PEER_IF.into(),
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

    /// Makes the VM's namespace and veth pair and routes its addresses. On failure everything
    /// made so far is removed again. Its traffic stays dropped until [`Network::open`].
    ///
    /// With a spare from the warm pool, only its namespace is moved to the VM's name here (what
    /// the VMM's jail joins); its host end is renamed, set up and routed by [`Network::open`],
    /// which runs beside the VMM's start: those steps wait for the kernel's network lock and
    /// grow with the VMs on the host, and the VMM needs none of them until its guest runs.
    /// [`Network::finish`] does them at once for a caller that needs the host end before.
    pub async fn setup(&self, vm: &VmRecord) -> Result<VmNetworkPlan, NetworkError> {
        let plan = self.plan(vm)?;
        let t0 = std::time::Instant::now();
        // Leftovers of an earlier run of this VM (metald killed mid-way) are replaced. Its pin
        // is made first and removed last, so without it there is nothing to remove; looking
        // costs a stat, where asking the kernel for the interfaces waits for the RTNL lock,
        // held for tens of milliseconds while an old namespace is being destroyed.
        if plan.netns.exists() {
            self.remove_plumbing(&vm.id).await;
        }
        let t1 = std::time::Instant::now();
        let spare = self.pool.take();
        let pooled = spare.is_some();
        let made = match &spare {
            Some(spare) => self
                .namespaces
                .repin(&spare.netns, &plan.netns)
                .map_err(|source| NetworkError::Io {
                    op: "move a spare network namespace to",
                    path: plan.netns.clone(),
                    source,
                }),
            None => self.make_plumbing(&plan).await,
        };
        if let Err(e) = made {
            self.remove_plumbing(&vm.id).await;
            if let Some(spare) = spare {
                self.remove_spare(&spare).await;
            }
            return Err(e);
        }
        if let Some(spare) = spare {
            self.unfinished_map().insert(vm.id.clone(), spare.host_if);
        }
        tracing::debug!(vm_id = %vm.id, leftovers_ms = ms(t1 - t0), plumbing_ms = ms(t1.elapsed()), pooled, "network made");
        Ok(plan)
    }

    fn unfinished_map(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, String>> {
        self.unfinished
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Finishes the host end of a spare [`Network::setup`] gave the VM, if it left one: its
    /// veth end (which has the gateway addresses already) renamed to the VM's, up, with the
    /// VM's routes. On failure that veth is removed (the VM's namespace stays, for
    /// [`Network::teardown`]).
    pub async fn finish(&self, vm: &VmRecord) -> Result<(), NetworkError> {
        let Some(spare_if) = self.unfinished_map().remove(&vm.id) else {
            return Ok(());
        };
        let plan = self.plan(vm)?;
        let t0 = std::time::Instant::now();
        let renamed = async {
            let index = self
                .links
                .index_of(&spare_if)
                .await?
                .ok_or_else(|| NetworkError::NoInterface(spare_if.clone()))?;
            // Spares wait up: setting a link up walks every IPv6 route of the namespace (one
            // per VM), which is the pool's time, not the boot's. Linux before 6.2 renames only
            // a link that is down.
            if self.links.rename(index, &plan.host_if).await.is_err() {
                self.links.set_down(index).await?;
                self.links.rename(index, &plan.host_if).await?;
            }
            Ok::<_, NetworkError>(index)
        }
        .await;
        let t1 = std::time::Instant::now();
        let routed = match renamed {
            Ok(index) => self.up_and_route(index, &plan).await,
            Err(e) => Err(e),
        };
        if let Err(e) = routed {
            self.remove_link(&spare_if).await;
            self.remove_link(&plan.host_if).await;
            return Err(e);
        }
        tracing::debug!(vm_id = %vm.id, host_if = %plan.host_if, rename_ms = ms(t1 - t0), up_ms = ms(t1.elapsed()), "spare taken");
        Ok(())
    }

    /// Makes one spare network: namespace, veth pair with the gateway addresses on the host
    /// end, TAP and bridge inside.
    async fn make_spare(&self) -> Result<Spare, NetworkError> {
        let spare = self.pool.next_names(&self.cfg.netns_dir);
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| NetworkError::Io { op, path, source }
        };
        let t0 = std::time::Instant::now();
        self.namespaces
            .create(&spare.netns)
            .map_err(io("create network namespace", &spare.netns))?;
        let t1 = std::time::Instant::now();
        let made = async {
            self.links
                .add_veth(&spare.host_if, PEER_IF, &spare.netns)
                .await?;
            let host = self
                .links
                .index_of(&spare.host_if)
                .await?
                .ok_or_else(|| NetworkError::NoInterface(spare.host_if.clone()))?;
            let t2 = std::time::Instant::now();
            self.add_gateways(host).await?;
            self.links.set_up(host).await?;
            let t3 = std::time::Instant::now();
            self.namespaces
                .wire(&spare.netns, TAP_NAME, BRIDGE_NAME, PEER_IF)
                .map_err(io("make the TAP and bridge in", &spare.netns))?;
            Ok((t2, t3))
        }
        .await;
        match made {
            Ok((t2, t3)) => {
                tracing::debug!(host_if = %spare.host_if, netns_ms = ms(t1 - t0), veth_ms = ms(t2 - t1), gateways_up_ms = ms(t3 - t2), tap_bridge_ms = ms(t3.elapsed()), "spare made");
                Ok(spare)
            }
            Err(e) => {
                self.remove_spare(&spare).await;
                Err(e)
            }
        }
    }

    /// Removes a spare: its namespace, and with it its veth pair. Logs what fails.
    async fn remove_spare(&self, spare: &Spare) {
        self.remove_spares(std::slice::from_ref(spare)).await;
    }

    /// Removes spares: unpins all their namespaces, then waits for their veths to go with
    /// them (see [`Network::remove_links`]). Logs what fails.
    async fn remove_spares(&self, spares: &[Spare]) {
        for spare in spares {
            if let Err(e) = self.namespaces.remove(&spare.netns) {
                tracing::warn!(path = %spare.netns.display(), error = %Chain(&e), "removing a spare network namespace failed");
            }
        }
        let names: Vec<String> = spares.iter().map(|s| s.host_if.clone()).collect();
        self.remove_links(&names).await;
    }

    /// Makes spares until the pool holds its target (or is closed). Stops at the first
    /// failure, logged; the next wake-up tries again.
    async fn fill_pool(&self) {
        while self.pool.wants_more() {
            // Not beside a boot: a namespace, veth and TAP take the RTNL lock its own
            // interface work and its VMM's TAP need too.
            self.cfg
                .starts
                .before_refill_async(|| {
                    crate::starts::Stock::of(self.pool.len(), self.pool.target())
                })
                .await;
            let _filling = self.filling.lock().await;
            match self.make_spare().await {
                Ok(spare) => {
                    if let Err(late) = self.pool.put(spare) {
                        self.remove_spare(&late).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), "making a spare network for the warm pool failed");
                    return;
                }
            }
        }
    }

    /// Fills the warm pool now and refills it whenever a boot takes a spare, in a task of its
    /// own, until [`Network::close_pool`]. Called once, after the start-up sweep.
    pub fn start_pool(self: &Arc<Self>) {
        if self.pool.target() == 0 {
            return;
        }
        let net = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                net.fill_pool().await;
                if net.pool.is_closed() {
                    return;
                }
                // A failed refill is tried again after a while even if no boot wakes it.
                let _either = tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    net.pool.wake.notified(),
                )
                .await;
            }
        });
    }

    /// Stops refilling the warm pool and removes every spare (at shutdown).
    pub async fn close_pool(&self) {
        let spares = self.pool.close();
        // A spare being made now is refused by the closed pool and removed by its maker.
        let _made = self.filling.lock().await;
        self.remove_spares(&spares).await;
    }

    /// How many spares the warm pool holds now.
    pub fn spares(&self) -> usize {
        self.pool.len()
    }

    /// Lets the VM's traffic through the firewall: until then every packet from or to its
    /// interface is dropped (the table's default for `mv*` interfaces), so this may run while
    /// its VMM starts. A failure changes nothing; [`Network::teardown`] removes the rest.
    pub async fn open(&self, vm: &VmRecord) -> Result<(), NetworkError> {
        let t0 = std::time::Instant::now();
        let plan = self.plan(vm)?;
        // The firewall's elements name the VM's interface, not its index: they may come first.
        let (finished, allowed) = tokio::join!(self.finish(vm), self.allow(vm, &plan));
        finished?;
        allowed?;
        // `firewall_ms`: the host end (if left to this) and the firewall, side by side.
        tracing::debug!(vm_id = %vm.id, firewall_ms = ms(t0.elapsed()), "network opened");
        Ok(())
    }

    async fn make_plumbing(&self, plan: &VmNetworkPlan) -> Result<(), NetworkError> {
        self.namespaces
            .create(&plan.netns)
            .map_err(|source| NetworkError::Io {
                op: "create network namespace",
                path: plan.netns.clone(),
                source,
            })?;
        self.links
            .add_veth(&plan.host_if, &plan.peer_if, &plan.netns)
            .await?;
        let host = self
            .links
            .index_of(&plan.host_if)
            .await?
            .ok_or_else(|| NetworkError::NoInterface(plan.host_if.clone()))?;
        self.route_host_end(host, plan).await
    }

    /// The host end of the VM's veth: the gateway addresses, up, and the routes to the guest.
    async fn route_host_end(&self, host: u32, plan: &VmNetworkPlan) -> Result<(), NetworkError> {
        self.add_gateways(host).await?;
        self.up_and_route(host, plan).await
    }

    /// The gateway addresses every VM's host end carries (the same on all of them).
    async fn add_gateways(&self, host: u32) -> Result<(), NetworkError> {
        self.links
            .add_address(host, IpAddr::V6(self.cfg.ipv6_prefix.gateway()), 128)
            .await?;
        if let Some(subnet) = self.cfg.ipv4_subnet {
            self.links
                .add_address(host, IpAddr::V4(subnet.gateway()), 32)
                .await?;
        }
        Ok(())
    }

    /// Sets a VM's host end up and routes the guest's addresses to it.
    async fn up_and_route(&self, host: u32, plan: &VmNetworkPlan) -> Result<(), NetworkError> {
        self.links.set_up(host).await?;
        self.links
            .add_route(IpAddr::V6(plan.ipv6), 128, host)
            .await?;
        if let Some(v4) = plan.ipv4 {
            self.links.add_route(IpAddr::V4(v4), 32, host).await?;
        }
        Ok(())
    }

    /// Removes the veth pair (its routes and addresses go with it) and the namespace file;
    /// a spare's veth the VM never finished taking too.
    ///
    /// One delete each, not [`Network::remove_links`]: the kernel's batch holds its network
    /// lock for all the namespaces let go of together, and in a run of 1000 deletes, the
    /// deletes whose last usage reading waited for it took 100 ms and more (all 1000: 8.3 s,
    /// against 3.2-5.4 s deleting each veth).
    async fn remove_plumbing(&self, vm: &VmId) {
        let (host_if, peer_if) = interface_names(vm);
        let spare_if = self.unfinished_map().remove(vm);
        for name in [Some(host_if), Some(peer_if), spare_if]
            .into_iter()
            .flatten()
        {
            self.remove_link(&name).await;
        }
        let ns = self.netns_path(vm);
        if let Err(e) = self.namespaces.remove(&ns) {
            tracing::warn!(path = %ns.display(), error = %Chain(&e), "removing network namespace failed");
        }
    }

    /// Waits until the interfaces `names` are gone, then removes any still there one by one.
    ///
    /// A veth whose peer is in an unpinned namespace goes when the kernel destroys that
    /// namespace, which it does for all namespaces let go of at about the same time in one
    /// batch. Deleting each veth instead waits for an RCU grace period under the kernel's
    /// network lock: 21.7 ms a veth here beside 1000 others, against 207 ms for 100 unpinned
    /// namespaces all together. What is still there after [`LINK_GONE_WAIT`] (a namespace a
    /// process still holds, a name in metald's own namespace) is deleted as before.
    async fn remove_links(&self, names: &[String]) {
        let deadline = tokio::time::Instant::now() + LINK_GONE_WAIT;
        let mut left: Vec<&str> = names.iter().map(String::as_str).collect();
        loop {
            left = self.still_there(left).await;
            if left.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(LINK_GONE_POLL).await;
        }
        for name in left {
            self.remove_link(name).await;
        }
    }

    /// Those of the interfaces `names` that are there (or could not be looked up).
    async fn still_there<'a>(&self, names: Vec<&'a str>) -> Vec<&'a str> {
        // Many at once (the pool at shutdown, the start-up sweep): one listing, not a request
        // each.
        if names.len() > 16 {
            match self.links.list().await {
                Ok(all) => {
                    let there: HashSet<String> = all.into_iter().map(|(_, n)| n).collect();
                    return names.into_iter().filter(|n| there.contains(*n)).collect();
                }
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), "listing interfaces failed");
                    return names;
                }
            }
        }
        let mut there = Vec::with_capacity(names.len());
        for name in names {
            match self.links.index_of(name).await {
                Ok(None) => {}
                Ok(Some(_)) => there.push(name),
                Err(e) => {
                    tracing::warn!(interface = %name, error = %Chain(&e), "looking up veth failed");
                    there.push(name);
                }
            }
        }
        there
    }

    /// Removes the interface `name` if it is there, logging what fails.
    async fn remove_link(&self, name: &str) {
        match self.links.index_of(name).await {
            Ok(Some(index)) => {
                if let Err(e) = self.links.delete(index).await {
                    tracing::warn!(interface = %name, error = %Chain(&e), "removing veth failed");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(interface = %name, error = %Chain(&e), "looking up veth failed")
            }
        }
    }

    fn firewall_vm(vm: &VmRecord, plan: &VmNetworkPlan) -> FirewallVm {
        FirewallVm {
            customer: vm.customer.clone(),
            host_if: plan.host_if.clone(),
            ipv6: plan.ipv6,
            ipv4: plan.ipv4,
        }
    }

    /// Adds the VM's elements to the firewall (one small transaction, whatever else runs).
    async fn allow(&self, vm: &VmRecord, plan: &VmNetworkPlan) -> Result<(), NetworkError> {
        self.firewall_change(FirewallOp::Start(
            vm.id.as_str().to_string(),
            Self::firewall_vm(vm, plan),
        ))
        .await
    }

    /// Applies `op` to the firewall together with every other change waiting: whoever holds
    /// the firewall's lock loads all that waits in one nft transaction, so starts and stops
    /// that come together (a burst of boots, the removals after many deletes) cost one `nft`
    /// run instead of one each. Returns once `op` is loaded or refused.
    async fn firewall_change(&self, op: FirewallOp) -> Result<(), NetworkError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.waiting_changes().push((op, done));
        {
            let mut fw = self.firewall.lock().await;
            let batch = std::mem::take(&mut *self.waiting_changes());
            if !batch.is_empty() {
                self.load_batch(&mut fw, batch).await;
            }
        }
        // Sent by whoever loaded the batch holding `op` (this call, or one before it).
        result
            .await
            .unwrap_or_else(|_| Err("the firewall batch was dropped".into()))
            .map_err(|e| NetworkError::Nft(nft::NftError::Batch(e)))
    }

    fn waiting_changes(&self) -> std::sync::MutexGuard<'_, Vec<WaitingChange>> {
        // Pushes and takes cannot leave it inconsistent.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads a batch of changes as one transaction, each made on the model as the ones before
    /// it leave it (a customer's first two VMs in one batch share one new tag). If nft refuses
    /// it (the table was flushed or lost an element), the whole table is rewritten as it will
    /// be after the batch, so the rules heal instead of drifting. The model follows only what
    /// was loaded; every waiter gets the outcome.
    async fn load_batch(&self, fw: &mut Firewall, batch: Vec<WaitingChange>) {
        let mut after = fw.clone();
        let mut ops = Vec::new();
        for (op, _) in &batch {
            let change = match op {
                FirewallOp::Start(id, vm) => Some(after.start(id, vm.clone())),
                FirewallOp::Stop(id) => after.stop(id),
            };
            if let Some(change) = change {
                ops.extend_from_slice(change.ops());
                after.commit(change);
            }
        }
        let loaded = if ops.is_empty() {
            Ok(())
        } else {
            match self.rules.change(&ops).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), changes = batch.len(), "firewall change refused; rewriting metald's whole table");
                    self.rules.load(&after.render()).await
                }
            }
        };
        let outcome = match loaded {
            Ok(()) => {
                *fw = after;
                Ok(())
            }
            Err(e) => Err(Chain(&e).to_string()),
        };
        for (_, done) in batch {
            // A waiter that gave up (its task was dropped) needs no answer.
            let _gone = done.send(outcome.clone());
        }
    }

    /// Removes everything the VM's run had: firewall entries, veth pair, namespace.
    pub async fn teardown(&self, vm: &VmRecord) -> Result<(), NetworkError> {
        let t0 = std::time::Instant::now();
        self.firewall_change(FirewallOp::Stop(vm.id.as_str().to_string()))
            .await?;
        let firewall_ms = t0.elapsed().as_secs_f64() * 1000.0;
        self.remove_plumbing(&vm.id).await;
        tracing::debug!(vm_id = %vm.id, firewall_ms, plumbing_ms = t0.elapsed().as_secs_f64() * 1000.0 - firewall_ms, "network removed");
        Ok(())
    }

    /// Records a VM whose VMM outlived a metald restart (its plumbing is still in place).
    pub async fn adopt(&self, vm: &VmRecord) -> Result<(), NetworkError> {
        let plan = self.plan(vm)?;
        let mut fw = self.firewall.lock().await;
        // Only the model: the sweep that follows at start writes the whole table.
        let change = fw.start(vm.id.as_str(), Self::firewall_vm(vm, &plan));
        fw.commit(change);
        Ok(())
    }

    /// At start: removes namespaces and veths of VMs not in `keep` (logging each), and writes
    /// the whole firewall table for the VMs that are (the one full write; every later change is
    /// incremental).
    pub async fn sweep(&self, keep: &HashSet<VmId>) -> Result<(), NetworkError> {
        for path in self.namespaces.list(&self.cfg.netns_dir) {
            let known = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<VmId>().ok())
                .is_some_and(|id| keep.contains(&id));
            if !known {
                tracing::warn!(path = %path.display(), "removing leftover network namespace");
                if let Err(e) = self.namespaces.remove(&path) {
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
        let stale: Vec<String> = self
            .links
            .list()
            .await?
            .into_iter()
            .map(|(_, name)| name)
            .filter(|name| is_vm_interface(name) && !keep_ifs.contains(name))
            .collect();
        for name in &stale {
            tracing::warn!(interface = %name, "removing leftover VM interface");
        }
        // Most go with the namespaces unpinned above.
        self.remove_links(&stale).await;
        let fw = self.firewall.lock().await;
        self.rules.load(&fw.render()).await?;
        Ok(())
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// True for names metald gives VM interfaces in its namespace (`mv`/`mp` + 12 hex digits) and
/// the warm pool's spares (`mw` + 12 hex digits).
pub fn is_vm_interface(name: &str) -> bool {
    let hex = name
        .strip_prefix(HOST_IF_PREFIX)
        .or_else(|| name.strip_prefix(PEER_IF_PREFIX));
    hex.is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        || pool::is_pool_interface(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;
    use std::sync::{Arc, Mutex as StdMutex};

    use crate::domain::{VmConfig, VmNet};
    use metald_domain::state::VmLife;

    /// A kernel double: interfaces and namespaces live in maps, every call is recorded, and a
    /// call whose record starts with `fail_on` fails.
    #[derive(Default)]
    struct FakeKernel {
        calls: StdMutex<Vec<String>>,
        links: StdMutex<BTreeMap<String, u32>>,
        /// The namespace pin each veth's peer is in, by the host end's index: a veth goes
        /// with its namespace once that is unpinned, as in the kernel.
        peer_ns: StdMutex<HashMap<u32, PathBuf>>,
        namespaces: StdMutex<Vec<PathBuf>>,
        fail_on: StdMutex<Option<String>>,
        next_index: StdMutex<u32>,
        /// Every nft script loaded (or refused), in order.
        scripts: StdMutex<Vec<String>>,
        /// How long each nft load takes (none by default).
        load_delay: StdMutex<Option<std::time::Duration>>,
    }

    impl FakeKernel {
        fn record(&self, call: String) -> Result<(), NetworkError> {
            let fail = self
                .fail_on
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|f| call.starts_with(f.as_str()));
            self.calls.lock().unwrap().push(call.clone());
            if fail {
                return Err(NetworkError::NoInterface(format!("injected: {call}")));
            }
            Ok(())
        }
        fn name_of(&self, index: u32) -> String {
            let links = self.links.lock().unwrap();
            links
                .iter()
                .find(|(_, i)| **i == index)
                .map(|(n, _)| n.clone())
                .unwrap_or_else(|| format!("#{index}"))
        }
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    /// The fake shared three ways, as the network owns its three kernel parts.
    struct Shared(Arc<FakeKernel>);

    #[async_trait::async_trait]
    impl Links for Shared {
        async fn add_veth(&self, host: &str, peer: &str, ns: &Path) -> Result<(), NetworkError> {
            self.0
                .record(format!("veth {host} {peer} in {}", ns.display()))?;
            // The peer is born in the VM's namespace: only the host end is seen here.
            let mut next = self.0.next_index.lock().unwrap();
            *next += 1;
            self.0.links.lock().unwrap().insert(host.to_string(), *next);
            self.0
                .peer_ns
                .lock()
                .unwrap()
                .insert(*next, ns.to_path_buf());
            Ok(())
        }
        async fn index_of(&self, name: &str) -> Result<Option<u32>, NetworkError> {
            Ok(self.0.links.lock().unwrap().get(name).copied())
        }
        async fn add_address(&self, i: u32, addr: IpAddr, len: u8) -> Result<(), NetworkError> {
            self.0
                .record(format!("address {addr}/{len} on {}", self.0.name_of(i)))
        }
        async fn set_up(&self, i: u32) -> Result<(), NetworkError> {
            self.0.record(format!("up {}", self.0.name_of(i)))
        }
        async fn set_down(&self, i: u32) -> Result<(), NetworkError> {
            self.0.record(format!("down {}", self.0.name_of(i)))
        }
        async fn rename(&self, i: u32, name: &str) -> Result<(), NetworkError> {
            let old = self.0.name_of(i);
            self.0.record(format!("rename {old} to {name}"))?;
            let mut links = self.0.links.lock().unwrap();
            links.remove(&old);
            links.insert(name.to_string(), i);
            Ok(())
        }
        async fn add_route(&self, dest: IpAddr, len: u8, i: u32) -> Result<(), NetworkError> {
            self.0
                .record(format!("route {dest}/{len} to {}", self.0.name_of(i)))
        }
        async fn delete(&self, i: u32) -> Result<(), NetworkError> {
            let name = self.0.name_of(i);
            self.0.record(format!("delete {name}"))?;
            self.0.links.lock().unwrap().remove(&name);
            Ok(())
        }
        async fn list(&self) -> Result<Vec<(u32, String)>, NetworkError> {
            let links = self.0.links.lock().unwrap();
            Ok(links.iter().map(|(n, i)| (*i, n.clone())).collect())
        }
    }

    #[async_trait::async_trait]
    impl Rules for Shared {
        /// Records `nft table [...]` for a whole table, `nft change [...]` for an incremental
        /// change, with the VM interfaces the script names.
        async fn load(&self, script: &str) -> Result<(), nft::NftError> {
            let delay = *self.0.load_delay.lock().unwrap();
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let hosts: Vec<&str> = script
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter(|w| w.starts_with("mv") && is_vm_interface(w))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let kind = if script.starts_with("table inet metald\ndelete table") {
                "table"
            } else {
                "change"
            };
            self.0.scripts.lock().unwrap().push(script.to_string());
            self.0
                .record(format!("nft {kind} [{}]", hosts.join(",")))
                .map_err(|e| nft::NftError::Refused(e.to_string()))
        }
    }

    impl Namespaces for Shared {
        fn create(&self, path: &Path) -> std::io::Result<()> {
            self.0
                .record(format!("netns create {}", path.display()))
                .map_err(std::io::Error::other)?;
            self.0.namespaces.lock().unwrap().push(path.to_path_buf());
            Ok(())
        }
        fn repin(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            self.0
                .record(format!(
                    "netns repin {} to {}",
                    from.display(),
                    to.display()
                ))
                .map_err(std::io::Error::other)?;
            let mut ns = self.0.namespaces.lock().unwrap();
            ns.retain(|p| p != from);
            ns.push(to.to_path_buf());
            for pin in self.0.peer_ns.lock().unwrap().values_mut() {
                if pin == from {
                    *pin = to.to_path_buf();
                }
            }
            Ok(())
        }
        fn wire(&self, path: &Path, tap: &str, bridge: &str, peer: &str) -> std::io::Result<()> {
            self.0
                .record(format!("wire {tap} {bridge} {peer} in {}", path.display()))
                .map_err(std::io::Error::other)
        }
        fn remove(&self, path: &Path) -> std::io::Result<()> {
            let mut ns = self.0.namespaces.lock().unwrap();
            if ns.iter().any(|p| p == path) {
                ns.retain(|p| p != path);
                drop(ns);
                self.0
                    .record(format!("netns remove {}", path.display()))
                    .map_err(std::io::Error::other)?;
                let gone: Vec<u32> = {
                    let mut peers = self.0.peer_ns.lock().unwrap();
                    let gone = peers
                        .iter()
                        .filter(|(_, pin)| *pin == path)
                        .map(|(i, _)| *i)
                        .collect();
                    peers.retain(|_, pin| pin != path);
                    gone
                };
                self.0
                    .links
                    .lock()
                    .unwrap()
                    .retain(|_, i| !gone.contains(i));
            }
            Ok(())
        }
        fn list(&self, _: &Path) -> Vec<PathBuf> {
            self.0.namespaces.lock().unwrap().clone()
        }
    }

    /// A VM start's network steps: plumbing, then the firewall (undone if that fails).
    async fn start(net: &Network, vm: &VmRecord) -> Result<VmNetworkPlan, NetworkError> {
        let plan = net.setup(vm).await?;
        if let Err(e) = net.open(vm).await {
            net.teardown(vm).await.unwrap();
            return Err(e);
        }
        Ok(plan)
    }

    fn network(kernel: &Arc<FakeKernel>) -> Network {
        pooled_network(kernel, 0)
    }

    fn pooled_network(kernel: &Arc<FakeKernel>, warm_pool: usize) -> Network {
        Network::with_kernel(
            NetworkConfig {
                warm_pool,
                ipv6_prefix: "fd00:1::/64".parse().unwrap(),
                ipv4_subnet: Some("10.9.0.0/24".parse().unwrap()),
                outbound_interface: None,
                netns_dir: "/run/test-netns".into(),
                nft_bin: "/nonexistent/nft".into(),
                proc_root: "/nonexistent/proc".into(),
                spawner: None,
                starts: Default::default(),
            },
            Box::new(Shared(Arc::clone(kernel))),
            Box::new(Shared(Arc::clone(kernel))),
            Box::new(Shared(Arc::clone(kernel))),
        )
    }

    fn vm(n: u8) -> VmRecord {
        VmRecord {
            id: format!("vm-0000000{n}-0000-4000-8000-000000000000")
                .parse()
                .unwrap(),
            customer: "acme".parse().unwrap(),
            config: VmConfig {
                vcpu_count: 1,
                memory_bytes: 128 << 20,
                kernel_image_id: "k".into(),
                rootfs_image_id: "r".into(),
                drives: vec![],
                kernel_args: String::new(),
                metadata: Default::default(),
                network: Default::default(),
            },
            backend: "qemu".into(),
            created_at_ms: 0,
            updated_at_ms: 0,
            seq: n.into(),
            life: VmLife::created(),
            net: Some(VmNet {
                slot: n.into(),
                ipv6: format!("fd00:1::{n}").parse().unwrap(),
                ipv4: Some(format!("10.9.0.{n}").parse().unwrap()),
                mac: format!("02:00:00:00:00:0{n}"),
            }),
        }
    }

    #[tokio::test]
    async fn setup_makes_namespace_veth_gateway_routes_and_firewall_in_order() {
        let k = Arc::new(FakeKernel::default());
        let net = network(&k);
        let a = vm(1);
        let plan = start(&net, &a).await.unwrap();
        let (host, _) = interface_names(&a.id);
        let ns = format!("/run/test-netns/{}", a.id);
        assert_eq!(plan.netns, Path::new(&ns));
        assert_eq!(
            k.calls(),
            [
                format!("netns create {ns}"),
                format!("veth {host} veth0 in {ns}"),
                format!("address fd00:1::1/128 on {host}"),
                format!("address 10.9.0.1/32 on {host}"),
                format!("up {host}"),
                format!("route fd00:1::1/128 to {host}"),
                format!("route 10.9.0.1/32 to {host}"),
                format!("nft change [{host}]"),
            ]
        );
    }

    #[tokio::test]
    async fn a_failure_half_way_removes_what_was_made_and_keeps_the_firewall() {
        let k = Arc::new(FakeKernel::default());
        let net = network(&k);
        let (a, b) = (vm(1), vm(2));
        start(&net, &a).await.unwrap();
        k.calls();
        *k.fail_on.lock().unwrap() = Some("route 10.9.0.2".into());
        assert!(start(&net, &b).await.is_err());
        let (host_b, _) = interface_names(&b.id);
        let calls = k.calls();
        assert!(!calls.iter().any(|c| c.starts_with("nft")), "{calls:?}");
        assert_eq!(
            &calls[calls.len() - 2..],
            [
                format!("delete {host_b}"),
                format!("netns remove /run/test-netns/{}", b.id)
            ]
        );
        assert_eq!(k.links.lock().unwrap().len(), 1, "only a's veth is left");
        // The firewall still holds a alone.
        *k.fail_on.lock().unwrap() = None;
        net.teardown(&a).await.unwrap();
        let (host_a, _) = interface_names(&a.id);
        assert_eq!(
            k.calls(),
            [
                format!("nft change [{host_a}]"),
                format!("delete {host_a}"),
                format!("netns remove /run/test-netns/{}", a.id)
            ]
        );
        assert!(k.links.lock().unwrap().is_empty());
        assert!(k.namespaces.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_start_up_sweep_keeps_adopted_vms_and_removes_every_other_leftover() {
        let k = Arc::new(FakeKernel::default());
        let net = network(&k);
        let (kept, gone) = (vm(1), vm(2));
        start(&net, &kept).await.unwrap();
        start(&net, &gone).await.unwrap();
        // A restarted metald: a new network over the same kernel state.
        let net = network(&k);
        net.adopt(&kept).await.unwrap();
        k.calls();
        net.sweep(&HashSet::from([kept.id.clone()])).await.unwrap();
        let (host_kept, _) = interface_names(&kept.id);
        let (host_gone, _) = interface_names(&gone.id);
        assert_eq!(
            k.calls(),
            [
                format!("netns remove /run/test-netns/{}", gone.id),
                format!("nft table [{host_kept}]"),
            ]
        );
        assert!(!k.links.lock().unwrap().contains_key(&host_gone));
    }

    #[tokio::test(start_paused = true)]
    async fn a_veth_that_does_not_go_with_its_namespace_is_deleted_after_a_wait() {
        let k = Arc::new(FakeKernel::default());
        let net = network(&k);
        let spare = net.make_spare().await.unwrap();
        // Its namespace held by a process that has not exited yet: the veth stays.
        k.peer_ns.lock().unwrap().clear();
        k.calls();
        let t0 = tokio::time::Instant::now();
        net.remove_spare(&spare).await;
        assert!(t0.elapsed() >= LINK_GONE_WAIT, "{:?}", t0.elapsed());
        assert_eq!(
            k.calls(),
            [
                format!("netns remove {}", spare.netns.display()),
                format!("delete {}", spare.host_if),
            ]
        );
        assert!(k.links.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_spare_goes_with_its_namespace_and_a_veth_that_goes_at_once_is_not_waited_for() {
        let k = Arc::new(FakeKernel::default());
        let net = network(&k);
        let spare = net.make_spare().await.unwrap();
        assert!(k.links.lock().unwrap().contains_key(&spare.host_if));
        k.calls();
        let t0 = std::time::Instant::now();
        net.remove_spare(&spare).await;
        assert!(t0.elapsed() < LINK_GONE_WAIT, "{:?}", t0.elapsed());
        assert_eq!(
            k.calls(),
            [format!("netns remove {}", spare.netns.display())]
        );
        assert!(k.links.lock().unwrap().is_empty());
    }

    fn vm_of(n: u8, customer: &str) -> VmRecord {
        VmRecord {
            customer: customer.parse().unwrap(),
            ..vm(n)
        }
    }

    /// The VM interfaces a script names.
    fn named(script: &str) -> BTreeSet<String> {
        script
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| w.starts_with("mv") && is_vm_interface(w))
            .map(str::to_string)
            .collect()
    }

    fn last_script(k: &FakeKernel) -> String {
        k.scripts.lock().unwrap().last().cloned().unwrap()
    }

    #[tokio::test]
    async fn a_boot_adds_and_a_stop_deletes_only_that_vms_elements() {
        let k = Arc::new(FakeKernel::default());
        let net = network(&k);
        for (n, c) in [(1, "acme"), (2, "acme"), (3, "bolt")] {
            start(&net, &vm_of(n, c)).await.unwrap();
        }
        let d = vm_of(4, "acme");
        let (host_d, _) = interface_names(&d.id);
        start(&net, &d).await.unwrap();
        let s = last_script(&k);
        assert!(s.lines().all(|l| l.starts_with("add element ")), "{s}");
        assert_eq!(named(&s), BTreeSet::from([host_d.clone()]));
        assert_eq!(s.lines().count(), 4, "{s}");

        net.teardown(&d).await.unwrap();
        let s = last_script(&k);
        assert!(s.lines().all(|l| l.starts_with("delete element ")), "{s}");
        assert_eq!(named(&s), BTreeSet::from([host_d]));
        assert_eq!(k.scripts.lock().unwrap().len(), 5, "one nft run per change");
    }

    #[tokio::test]
    async fn a_refused_change_rewrites_the_table_and_a_refused_rewrite_changes_nothing() {
        let k = Arc::new(FakeKernel::default());
        let net = network(&k);
        let (a, b, c) = (vm(1), vm_of(2, "bolt"), vm(3));
        let [host_a, host_b, host_c] = [&a, &b, &c].map(|v| interface_names(&v.id).0);
        start(&net, &a).await.unwrap();
        k.calls();

        // The table lost something (say, the host's firewall reload flushed it): the change
        // is refused, so the whole table is written, b included.
        *k.fail_on.lock().unwrap() = Some("nft change".into());
        start(&net, &b).await.unwrap();
        let calls = k.calls();
        assert_eq!(
            &calls[calls.len() - 2..],
            [
                format!("nft change [{host_b}]"),
                format!("nft table [{host_a},{host_b}]")
            ]
        );

        // nft refuses everything: c's boot fails and the model stays a and b.
        *k.fail_on.lock().unwrap() = Some("nft".into());
        assert!(start(&net, &c).await.is_err());
        *k.fail_on.lock().unwrap() = None;
        k.calls();
        net.teardown(&c).await.unwrap();
        assert!(
            !k.calls().iter().any(|c| c.starts_with("nft")),
            "c was never in the firewall"
        );
        net.sweep(&HashSet::from([a.id.clone(), b.id.clone()]))
            .await
            .unwrap();
        let s = last_script(&k);
        assert_eq!(named(&s), BTreeSet::from([host_a, host_b]));
        assert!(!s.contains(&host_c));
    }

    #[tokio::test]
    async fn the_table_written_at_start_holds_every_running_vm() {
        let k = Arc::new(FakeKernel::default());
        let vms = [vm_of(1, "acme"), vm_of(2, "acme"), vm_of(3, "bolt")];
        let net = network(&k);
        for v in &vms {
            start(&net, v).await.unwrap();
        }
        let net = network(&k);
        for v in &vms {
            net.adopt(v).await.unwrap();
        }
        k.scripts.lock().unwrap().clear();
        net.sweep(&vms.iter().map(|v| v.id.clone()).collect())
            .await
            .unwrap();
        let scripts = k.scripts.lock().unwrap().clone();
        assert_eq!(scripts.len(), 1, "one write: {scripts:?}");
        let s = &scripts[0];
        assert!(s.starts_with("table inet metald\ndelete table inet metald\n"));
        for (n, v) in vms.iter().enumerate() {
            let host = interface_names(&v.id).0;
            let n = n + 1;
            // Both customers' tags: acme 1, bolt 2.
            let tag = if n == 3 { 2 } else { 1 };
            for element in [
                format!("\"{host}\" . fd00:1::{n}"),
                format!("\"{host}\" . 10.9.0.{n}"),
                format!("\"{host}\" comment \"customer {}\" : {tag}", v.customer),
                format!("{tag} . \"{host}\""),
            ] {
                assert!(s.contains(&element), "{element} missing:\n{s}");
            }
        }
    }

    #[tokio::test]
    async fn firewall_changes_that_wait_together_are_loaded_in_one_nft_run() {
        let k = Arc::new(FakeKernel::default());
        let net = Arc::new(network(&k));
        // Two customers, each with its first VMs in the same batch.
        let vms: Vec<VmRecord> = (1..=6)
            .map(|n| vm_of(n, if n % 2 == 0 { "acme" } else { "bolt" }))
            .collect();
        for v in &vms {
            net.setup(v).await.unwrap();
        }
        *k.load_delay.lock().unwrap() = Some(std::time::Duration::from_millis(100));
        let run_all = |stop: bool| {
            let tasks: Vec<_> = vms
                .iter()
                .map(|v| {
                    let (net, v) = (Arc::clone(&net), v.clone());
                    tokio::spawn(async move {
                        if stop {
                            net.teardown(&v).await
                        } else {
                            net.open(&v).await
                        }
                    })
                })
                .collect();
            async move {
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
            }
        };
        run_all(false).await;
        let scripts = std::mem::take(&mut *k.scripts.lock().unwrap());
        assert_eq!(
            scripts.len(),
            2,
            "the first alone, the five that waited together: {scripts:#?}"
        );
        assert_eq!(named(&scripts[0]).len() + named(&scripts[1]).len(), 6);
        {
            let fw = net.firewall.lock().await;
            assert_eq!(fw.len(), 6);
            let (acme, bolt) = (
                fw.tag_of(&"acme".parse().unwrap()).unwrap(),
                fw.tag_of(&"bolt".parse().unwrap()).unwrap(),
            );
            assert_ne!(acme, bolt, "one tag per customer, even made in one batch");
            for v in &vms {
                let (host, _) = interface_names(&v.id);
                let tag = if v.customer.as_str() == "acme" {
                    acme
                } else {
                    bolt
                };
                let all = scripts.concat();
                assert!(
                    all.contains(&format!("{tag} . \"{host}\"")),
                    "{host} {tag}: {all}"
                );
            }
        }
        run_all(true).await;
        let scripts = std::mem::take(&mut *k.scripts.lock().unwrap());
        assert_eq!(scripts.len(), 2, "{scripts:#?}");
        assert!(net.firewall.lock().await.is_empty());
        // A refused batch: the whole table is written once for all of it.
        run_all(false).await;
        k.scripts.lock().unwrap().clear();
        *k.fail_on.lock().unwrap() = Some("nft change".into());
        run_all(true).await;
        let scripts = std::mem::take(&mut *k.scripts.lock().unwrap());
        assert_eq!(
            scripts.len(),
            4,
            "two refused batches, each healed by one rewrite"
        );
        assert!(net.firewall.lock().await.is_empty());
    }

    #[tokio::test]
    async fn a_boot_takes_a_spare_from_the_warm_pool_which_is_refilled_and_removed_at_close() {
        let k = Arc::new(FakeKernel::default());
        let net = Arc::new(pooled_network(&k, 2));
        net.start_pool();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while net.spares() < 2 {
            assert!(std::time::Instant::now() < deadline, "pool never filled");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let made = k.calls();
        assert_eq!(
            made.iter()
                .filter(|c| c.starts_with("wire tap0 br0 veth0 in /run/test-netns/pool-"))
                .count(),
            2,
            "{made:?}"
        );
        assert!(
            made.iter()
                .any(|c| c
                    .starts_with("veth mw000000000001 veth0 in /run/test-netns/pool-000000000001")),
            "{made:?}"
        );
        assert!(
            made.iter()
                .any(|c| c == "address fd00:1::1/128 on mw000000000001")
                && made
                    .iter()
                    .any(|c| c == "address 10.9.0.1/32 on mw000000000001"),
            "a spare's host end has the gateways already: {made:?}"
        );

        let a = vm(1);
        let (host, _) = interface_names(&a.id);
        let ns = format!("/run/test-netns/{}", a.id);
        let plan = start(&net, &a).await.unwrap();
        assert_eq!(plan.peer_if, PEER_IF);
        let calls = k.calls();
        // No namespace and no veth made on the boot's path: the spare is renamed and routed.
        assert_eq!(
            calls
                .iter()
                .filter(|c| !c.starts_with("netns create /run/test-netns/pool-")
                    && !c.starts_with("veth mw")
                    && !c.starts_with("wire ")
                    && !c.contains(" on mw")
                    && !c.starts_with("up mw"))
                .cloned()
                .collect::<Vec<_>>(),
            [
                format!("netns repin /run/test-netns/pool-000000000001 to {ns}"),
                format!("rename mw000000000001 to {host}"),
                format!("up {host}"),
                format!("route fd00:1::1/128 to {host}"),
                format!("route 10.9.0.1/32 to {host}"),
                format!("nft change [{host}]"),
            ]
        );
        while net.spares() < 2 {
            assert!(std::time::Instant::now() < deadline, "pool never refilled");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        net.close_pool().await;
        assert_eq!(net.spares(), 0);
        let links: Vec<String> = k.links.lock().unwrap().keys().cloned().collect();
        assert_eq!(
            links,
            std::slice::from_ref(&host),
            "only the VM's veth is left"
        );
        assert_eq!(
            k.namespaces.lock().unwrap().clone(),
            [PathBuf::from(&ns)],
            "only the VM's namespace is left"
        );
        // A closed pool makes no more spares, and the VM's network goes as usual.
        let b = vm(2);
        start(&net, &b).await.unwrap();
        assert!(k.calls().iter().any(|c| c.starts_with("veth mv")));
        net.teardown(&a).await.unwrap();
        net.teardown(&b).await.unwrap();
        assert!(k.links.lock().unwrap().is_empty());
        assert!(k.namespaces.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_spares_host_end_is_finished_beside_the_vmm_start_or_removed_with_the_vm() {
        let k = Arc::new(FakeKernel::default());
        let net = Arc::new(pooled_network(&k, 1));
        net.start_pool();
        let wait_spare = || async {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while net.spares() < 1 {
                assert!(std::time::Instant::now() < deadline, "pool never filled");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        };
        // Calls about one spare (its veth and namespace) and one VM (its veth), in order.
        let about = |calls: Vec<String>, spare: &str, host: &str| -> Vec<String> {
            calls
                .into_iter()
                .filter(|c| {
                    (c.contains(&format!("mw{spare}")) || c.contains(&format!("pool-{spare}")))
                        && !c.starts_with("veth ")
                        && !c.starts_with("netns create")
                        && !c.starts_with("wire ")
                        && !c.contains(" on mw")
                        && !c.starts_with("up mw")
                        || c.contains(host)
                })
                .collect()
        };

        // The setup moves only the namespace; open renames, sets up and routes the host end.
        wait_spare().await;
        k.calls();
        let a = vm(1);
        let (host_a, _) = interface_names(&a.id);
        net.setup(&a).await.unwrap();
        assert_eq!(
            about(k.calls(), "000000000001", &host_a),
            [format!(
                "netns repin /run/test-netns/pool-000000000001 to /run/test-netns/{}",
                a.id
            )],
            "nothing on the host end before the VMM starts"
        );
        net.open(&a).await.unwrap();
        let opened = about(k.calls(), "000000000001", &host_a);
        assert_eq!(
            opened[..4],
            [
                format!("rename mw000000000001 to {host_a}"),
                format!("up {host_a}"),
                format!("route fd00:1::1/128 to {host_a}"),
                format!("route 10.9.0.1/32 to {host_a}"),
            ]
        );
        assert!(
            opened.contains(&format!("nft change [{host_a}]")),
            "{opened:?}"
        );
        net.finish(&a).await.unwrap();
        assert_eq!(k.calls(), Vec::<String>::new(), "finished once");

        // A start that ends before open: the spare's veth goes with the VM's namespace.
        wait_spare().await;
        let b = vm(2);
        let (host_b, _) = interface_names(&b.id);
        net.setup(&b).await.unwrap();
        net.teardown(&b).await.unwrap();
        let links: Vec<String> = k.links.lock().unwrap().keys().cloned().collect();
        assert!(!links.contains(&"mw000000000002".to_string()), "{links:?}");
        assert!(!links.contains(&host_b), "{links:?}");
        let ns = PathBuf::from(format!("/run/test-netns/{}", b.id));
        assert!(!k.namespaces.lock().unwrap().contains(&ns));

        // A host end that cannot be routed: open fails and removes the veth; the namespace
        // stays for the teardown that follows.
        wait_spare().await;
        let c = vm(3);
        let (host_c, _) = interface_names(&c.id);
        net.setup(&c).await.unwrap();
        *k.fail_on.lock().unwrap() = Some(format!("route fd00:1::3/128 to {host_c}"));
        assert!(net.open(&c).await.is_err());
        *k.fail_on.lock().unwrap() = None;
        let links: Vec<String> = k.links.lock().unwrap().keys().cloned().collect();
        assert!(!links.contains(&host_c), "{links:?}");
        assert!(!links.contains(&"mw000000000003".to_string()), "{links:?}");
        net.teardown(&c).await.unwrap();
        let ns = PathBuf::from(format!("/run/test-netns/{}", c.id));
        assert!(!k.namespaces.lock().unwrap().contains(&ns));

        net.close_pool().await;
        net.teardown(&a).await.unwrap();
        assert!(k.links.lock().unwrap().is_empty());
        assert!(k.namespaces.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_start_up_sweep_removes_a_killed_metalds_spares() {
        let k = Arc::new(FakeKernel::default());
        let net = Arc::new(pooled_network(&k, 2));
        net.start_pool();
        while net.spares() < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Killed: a new metald over the same kernel state sweeps the spares as leftovers.
        let net = network(&k);
        net.sweep(&HashSet::new()).await.unwrap();
        assert!(k.links.lock().unwrap().is_empty());
        assert!(k.namespaces.lock().unwrap().is_empty());
    }

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
