//! A VM run's sandbox: its network ([`crate::network`]) and its jail ([`crate::jailer`]),
//! set up before the VMM starts and removed once it is gone, whatever the reason (shutdown,
//! crash, failed boot, delete).
//!
//! The service sees isolation only through the [`Isolation`] trait, as it sees VMMs through
//! the backend trait: [`Sandboxes`] is the real one, [`Unisolated`] the development mode
//! (`UNKEY_METALD_ISOLATION=none`), and the service's unit tests use a recording fake.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::VmLaunch;
use crate::domain::{VmId, VmRecord};
use crate::jailer::{JailError, JailRequest, Jailer};
use crate::metering::sources::Sources;
use crate::network::ipam::AllocationPlan;
use crate::network::{Network, NetworkError, VmNetworkPlan};
use crate::report::Chain;
use crate::starts::{Starting, Starts, Stock};

/// Errors setting up a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Networking failed.
    #[error("network")]
    Network(#[from] NetworkError),
    /// The jail failed.
    #[error("jail")]
    Jail(#[from] JailError),
    /// The VM has no jail slot (made before isolation was on).
    #[error("VM {0} has no jail slot; delete and re-create it")]
    NotAllocated(VmId),
}

/// What the lifecycle service asks of isolation, at each step of a VM's life.
#[async_trait::async_trait]
pub trait Isolation: Send + Sync {
    /// What each new VM is allocated (jail slot, addresses); `None` when VMs get neither.
    fn allocation(&self) -> Option<AllocationPlan>;

    /// Makes the VM's network and jail and puts them into `launch`, before its VMM starts.
    /// Nothing is left behind on failure.
    async fn setup(&self, vm: &VmRecord, launch: &mut VmLaunch) -> Result<(), SandboxError>;

    /// Lets the VM's traffic through the firewall (after [`Isolation::setup`], while its VMM
    /// starts: until then its traffic is dropped), finishing first what the setup left to do
    /// beside the VMM's start. On failure [`Isolation::release`] removes the rest.
    async fn open(&self, vm: &VmRecord) -> Result<(), SandboxError>;

    /// For a VM whose network is already up (a reboot): fills `launch` with it and a new jail.
    fn attach(&self, vm: &VmRecord, launch: &mut VmLaunch) -> Result<(), SandboxError>;

    /// Removes everything the VM's run had (best effort, each failure logged).
    async fn release(&self, vm: &VmRecord) -> Result<(), SandboxError>;

    /// Takes over the sandbox of a VMM that outlived a metald restart.
    async fn adopt(&self, vm: &VmRecord) -> Result<(), SandboxError>;

    /// At start: removes every sandbox left of VMs not in `keep` (and of warm spares), then
    /// starts keeping spares ready.
    async fn sweep(&self, keep: &HashSet<VmId>) -> Result<(), SandboxError>;

    /// At shutdown: removes what belongs to no VM (the warm pool's spares).
    async fn shutdown(&self) {}

    /// Where the usage of the VM's VMM `pid` is read: its cgroup and host-side interface.
    fn meter_sources(&self, vm: &VmRecord, pid: u32) -> (Sources, Option<String>);

    /// The VM's network identity, if it has one.
    fn network_of(&self, vm: &VmRecord) -> Option<VmNetworkPlan>;

    /// Where a jailed VM's VMM makes its control socket; `None`: in the VM's directory.
    fn control_dir(&self, vm: &VmId) -> Option<PathBuf>;

    /// Counts a VM start in flight until the guard is dropped: the pools of sandboxes made
    /// ahead of boots refill once no start is in flight. `None` without pools.
    fn starting(&self) -> Option<Starting> {
        None
    }

    /// Before a refill of parts made ahead of creates (spare disk copies), on a blocking
    /// thread: waits for a moment without starts as `stock()` says, as the sandbox pools'
    /// refills do (even with none left: a create's own copy costs it less than a refill
    /// beside its boot).
    fn before_refill(&self, _stock: &dyn Fn() -> Stock) {}

    /// How the sandboxes made ahead of boots are doing (for `/metrics`); `None` without them.
    fn pools(&self) -> Option<Pools> {
        None
    }
}

/// The pools of sandbox parts made ahead of boots, as `/metrics` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pools {
    /// Spare networks ready (`UNKEY_METALD_WARM_POOL`).
    pub spare_networks: usize,
    /// Warm jails ready (`UNKEY_METALD_WARM_JAILS`).
    pub warm_jails: usize,
    /// VMMs started in a warm jail since metald started.
    pub warm_jail_starts: u64,
    /// VMMs whose jail was built at their boot since metald started.
    pub cold_jail_starts: u64,
}

/// No isolation: VMMs run as metald's own user, unjailed and without network. Every step is
/// a no-op and usage comes from the VMM process alone.
pub struct Unisolated {
    /// procfs, where the VMM's usage is read.
    pub proc: PathBuf,
    /// The directory holding one directory per VM, each VMM's working directory.
    pub vms_dir: PathBuf,
}

#[async_trait::async_trait]
impl Isolation for Unisolated {
    fn allocation(&self) -> Option<AllocationPlan> {
        None
    }
    async fn setup(&self, _: &VmRecord, _: &mut VmLaunch) -> Result<(), SandboxError> {
        Ok(())
    }
    async fn open(&self, _: &VmRecord) -> Result<(), SandboxError> {
        Ok(())
    }
    fn attach(&self, _: &VmRecord, _: &mut VmLaunch) -> Result<(), SandboxError> {
        Ok(())
    }
    async fn release(&self, _: &VmRecord) -> Result<(), SandboxError> {
        Ok(())
    }
    async fn adopt(&self, _: &VmRecord) -> Result<(), SandboxError> {
        Ok(())
    }
    /// No cgroup holds an unjailed VMM: one started for a VM that is not running (metald was
    /// killed before recording it) is found by its working directory and killed.
    async fn sweep(&self, keep: &HashSet<VmId>) -> Result<(), SandboxError> {
        for (pid, vm) in crate::backend::process::stray_vmms(&self.proc, &self.vms_dir, keep) {
            tracing::warn!(vm_id = %vm, pid, "killing a VMM whose VM is not running");
            if let Err(e) = crate::backend::process::kill_pid(pid) {
                tracing::error!(vm_id = %vm, pid, error = %Chain(&e), "killing a stray VMM failed");
            }
        }
        Ok(())
    }
    fn meter_sources(&self, _: &VmRecord, pid: u32) -> (Sources, Option<String>) {
        (Sources::for_process(&self.proc, pid), None)
    }
    fn network_of(&self, _: &VmRecord) -> Option<VmNetworkPlan> {
        None
    }
    fn control_dir(&self, _: &VmId) -> Option<PathBuf> {
        None
    }
}

/// Sets up and removes sandboxes: the jailer and the network together.
pub struct Sandboxes {
    jailer: Arc<Jailer>,
    network: Arc<Network>,
    plan: AllocationPlan,
    proc: PathBuf,
    /// The starts in flight, shared with the jailer's and the network's pools.
    starts: Arc<Starts>,
}

impl Sandboxes {
    /// Sandboxes from a jailer and a network, allocating by `plan`; usage is read from the
    /// cgroups and from procfs at `proc`; `starts` is the count of starts in flight the
    /// jailer's and the network's pools were made with.
    pub fn new(
        jailer: Jailer,
        network: Network,
        plan: AllocationPlan,
        proc: PathBuf,
        starts: Arc<Starts>,
    ) -> Self {
        Self {
            jailer: Arc::new(jailer),
            network: Arc::new(network),
            plan,
            proc,
            starts,
        }
    }

    /// Removes the VM's jail (cgroups, directories), its error logged and returned. Killing
    /// the cgroup waits for its processes to be reaped: not on a runtime thread.
    async fn release_jail(&self, vm: &VmRecord) -> Result<(), JailError> {
        let jailer = Arc::clone(&self.jailer);
        let id = vm.id.clone();
        let released = tokio::task::spawn_blocking(move || jailer.release(&id))
            .await
            .unwrap_or_else(|e| Err(JailError::Task(e.to_string())));
        if let Err(e) = &released {
            tracing::error!(vm_id = %vm.id, error = %Chain(e), "removing the VM's jail failed");
        }
        released
    }

    fn attach_jail(&self, vm: &VmRecord, launch: &mut VmLaunch) -> Result<(), SandboxError> {
        let req = JailInputs::of(vm, launch)?;
        launch.jail = Some(self.jailer.prepare(&req.request(launch.net.as_ref()))?);
        Ok(())
    }
}

/// What a VM's jail is prepared from, owned (so it can be prepared on a blocking thread).
struct JailInputs {
    vm_id: VmId,
    slot: u32,
    vcpu_count: u32,
    memory_mib: u64,
    dir: PathBuf,
    read_only: Vec<PathBuf>,
    owned: Vec<PathBuf>,
}

impl JailInputs {
    /// The jail's inputs from the VM and its launch, whose kernel arguments get the network's
    /// (`launch.net` is the VM's network plan, made or not yet).
    fn of(vm: &VmRecord, launch: &mut VmLaunch) -> Result<Self, SandboxError> {
        let slot = vm
            .net
            .as_ref()
            .map(|n| n.slot)
            .ok_or_else(|| SandboxError::NotAllocated(vm.id.clone()))?;
        // metald's arguments last: where a kernel or init takes the last of repeated
        // arguments, the customer's cannot win (validation refuses metald.* ones anyway).
        if let Some(net) = &launch.net {
            let args = net.kernel_args();
            launch.extra_kernel_args = if launch.extra_kernel_args.is_empty() {
                args
            } else {
                format!("{} {args}", launch.extra_kernel_args)
            };
        }
        let mut read_only: Vec<PathBuf> = vec![launch.kernel.clone()];
        read_only.extend(launch.initrd.iter().cloned());
        read_only.extend(
            launch
                .disks
                .iter()
                .filter(|d| !d.path.starts_with(&launch.dir))
                .map(|d| d.path.clone()),
        );
        let owned = launch
            .disks
            .iter()
            .filter(|d| d.path.starts_with(&launch.dir))
            .map(|d| d.path.clone())
            .chain([launch.console_log(), launch.vmm_log()])
            .collect();
        Ok(Self {
            vm_id: vm.id.clone(),
            slot,
            vcpu_count: launch.vcpu_count,
            memory_mib: launch.memory_mib,
            dir: launch.dir.clone(),
            read_only,
            owned,
        })
    }

    fn request<'a>(&'a self, net: Option<&'a VmNetworkPlan>) -> JailRequest<'a> {
        JailRequest {
            vm_id: &self.vm_id,
            slot: self.slot,
            vcpu_count: self.vcpu_count,
            memory_mib: self.memory_mib,
            dir: &self.dir,
            read_only: self.read_only.clone(),
            owned: self.owned.clone(),
            net,
        }
    }
}

#[async_trait::async_trait]
impl Isolation for Sandboxes {
    fn allocation(&self) -> Option<AllocationPlan> {
        Some(self.plan)
    }

    /// Makes the VM's network (closed until [`Isolation::open`]) and jail and puts them into
    /// `launch`. Nothing is left behind on failure.
    async fn setup(&self, vm: &VmRecord, launch: &mut VmLaunch) -> Result<(), SandboxError> {
        let t0 = std::time::Instant::now();
        let plan = self.network.plan(vm)?;
        launch.net = Some(plan.clone());
        // The jail (cgroups, directories) is prepared on a blocking thread while the network
        // is made: neither needs the other, and on 2 cores they overlap.
        let inputs = JailInputs::of(vm, launch)?;
        let jailer = Arc::clone(&self.jailer);
        let jail = tokio::task::spawn_blocking(move || {
            let jail = jailer.prepare(&inputs.request(Some(&plan)));
            (jail, std::time::Instant::now())
        });
        let net = self.network.setup(vm).await;
        let network_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let (jail, jail_done) = match jail.await {
            Ok(done) => done,
            Err(e) => (
                Err(JailError::Task(e.to_string())),
                std::time::Instant::now(),
            ),
        };
        match (net, jail) {
            (Ok(_), Ok(jail)) => launch.jail = Some(jail),
            (Err(e), jail) => {
                // The network removed what it made; the jail goes too, if it was made.
                if jail.is_ok() {
                    let _logged = self.release_jail(vm).await;
                }
                return Err(e.into());
            }
            (Ok(_), Err(e)) => {
                // Its own failure is logged inside; the jail's error is the one to report.
                let _logged = self.release(vm).await;
                return Err(e.into());
            }
        }
        let jail_ms = (jail_done - t0).as_secs_f64() * 1000.0;
        tracing::debug!(vm_id = %vm.id, network_ms, jail_ms, "sandbox ready");
        Ok(())
    }

    async fn open(&self, vm: &VmRecord) -> Result<(), SandboxError> {
        Ok(self.network.open(vm).await?)
    }

    /// For a VM whose network is already up (a reboot): fills `launch` with it and a new jail.
    fn attach(&self, vm: &VmRecord, launch: &mut VmLaunch) -> Result<(), SandboxError> {
        launch.net = Some(self.network.plan(vm)?);
        self.attach_jail(vm, launch)
    }

    /// Removes everything the VM's run had. Each failure is logged and the rest still
    /// removed; the jail's error is returned, since processes left in the VM's cgroup mean
    /// its uid must stay taken.
    async fn release(&self, vm: &VmRecord) -> Result<(), SandboxError> {
        let t0 = std::time::Instant::now();
        if let Err(e) = self.network.teardown(vm).await {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "removing the VM's network failed");
        }
        let network_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let released = self.release_jail(vm).await;
        tracing::debug!(vm_id = %vm.id, network_ms, jail_ms = t0.elapsed().as_secs_f64() * 1000.0 - network_ms, "sandbox released");
        Ok(released?)
    }

    /// Takes over the sandbox of a VMM that outlived a metald restart.
    async fn adopt(&self, vm: &VmRecord) -> Result<(), SandboxError> {
        Ok(self.network.adopt(vm).await?)
    }

    /// At start: removes every namespace, interface, cgroup and jail of VMs not in `keep`.
    async fn sweep(&self, keep: &HashSet<VmId>) -> Result<(), SandboxError> {
        // Killing leftover cgroups waits for their processes: not on a runtime thread.
        let (jailer, kept) = (Arc::clone(&self.jailer), keep.clone());
        tokio::task::spawn_blocking(move || jailer.sweep(&kept))
            .await
            .map_err(|e| JailError::Task(e.to_string()))?;
        self.network.sweep(keep).await?;
        self.network.start_pool();
        self.jailer.start_warm();
        Ok(())
    }

    async fn shutdown(&self) {
        self.network.close_pool().await;
        self.jailer.close();
    }

    fn meter_sources(&self, vm: &VmRecord, pid: u32) -> (Sources, Option<String>) {
        (
            Sources::for_cgroup(
                &self.jailer.cgroups().files(vm.id.as_str()),
                &self.proc,
                pid,
            ),
            self.network.plan(vm).ok().map(|p| p.host_if),
        )
    }

    fn network_of(&self, vm: &VmRecord) -> Option<VmNetworkPlan> {
        self.network.plan(vm).ok()
    }
    fn control_dir(&self, vm: &VmId) -> Option<PathBuf> {
        Some(self.jailer.control_dir(vm))
    }

    fn starting(&self) -> Option<Starting> {
        Some(self.starts.begin())
    }

    fn before_refill(&self, stock: &dyn Fn() -> Stock) {
        self.starts.before_refill(|| match stock() {
            Stock::Empty => Stock::Low,
            other => other,
        });
    }

    fn pools(&self) -> Option<Pools> {
        let (warm_jail_starts, cold_jail_starts) = self.jailer.warm().starts();
        Some(Pools {
            spare_networks: self.network.spares(),
            warm_jails: self.jailer.warm().ready(),
            warm_jail_starts,
            cold_jail_starts,
        })
    }
}
