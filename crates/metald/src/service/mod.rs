//! The VM lifecycle service: validates requests, owns every state transition, and drives the
//! store, the asset store and the backend. Both API adapters (Connect and REST) call only this.
//!
//! Each public operation here reads as load → `transition` check → effect → `VmLife::apply` →
//! save. The jobs around them live beside: `validate` (requests), `launch` (disks and what a
//! VMM is started with), `durable` (disk copies synced off the boot path), `supervise` (exits,
//! readiness, re-attach at start) and `usage` (metering and billing hooks, usage windows).

mod assets_fetch;
mod capacity;
mod durable;
mod launch;
mod placement;
mod snapshots;
pub mod spare_disks;
mod supervise;
mod usage;
mod validate;
pub(crate) use validate::validate_kernel_args;

pub use crate::backend::console::ConsoleTail;
pub use capacity::{Amount, HostCapacity, HostSettings, Ratio};
pub use snapshots::{CloneNet, MAX_SNAPSHOT_ID};
pub use usage::WindowUsage;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::assets::{AssetError, AssetStore, BootFiles};
use crate::backend::console::file_len;
use crate::backend::{
    file_tail, Backend, BackendError, Disk, ExitEvent, StartKind, StopMode, VmLaunch,
};
use crate::billing::Billing;
use crate::domain::{is_token, now_ms, CustomerId, DriveConfig, VmConfig, VmId, VmRecord, MIB};
use crate::metering::{Counters, Meter, RunStart, VmUsage};
use crate::probe::{HostProbe, ProbeError};
use crate::quota::QuotaTable;
use crate::report::Chain;
use crate::sandbox::{Isolation, SandboxError};
use crate::starts::StartHold;
use crate::state::{transition, Change, InvalidTransition, Operation, VmLife, VmState};
use crate::store::{AssetKind, Shortage, StateStore, StoreError};
use crate::timings::{Step, Timings};

/// Smallest guest memory metald accepts. Measured with the default guest (Debian 6.1 cloud
/// kernel, initrd, busybox rootfs) under QEMU: 80 MiB booted to the readiness line in 12 of 12
/// runs, 72 MiB in 3 of 12, 64 MiB in none (out of memory unpacking the initrd); 96 MiB keeps
/// one step of margin.
pub const MIN_MEMORY_MIB: u64 = 96;
/// Largest network rate limit and burst, in bytes (per second): 1 TiB, far above any NIC, and
/// far enough below 2^64 that the VMMs' bucket arithmetic (rate × refill period) cannot
/// overflow.
pub const MAX_RATE_BYTES: u64 = 1 << 40;
/// Most extra drives one VM may have.
pub const MAX_DRIVES: usize = 8;
/// Longest kernel command line addition accepted.
pub const MAX_KERNEL_ARGS: usize = 1024;
/// Most metadata entries per VM.
pub const MAX_METADATA: usize = 64;
/// Default and largest ListVms page.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest ListVms page.
pub const MAX_PAGE: u32 = 1000;
/// Default console tail.
pub const DEFAULT_CONSOLE_TAIL: u32 = 64 * 1024;
/// Largest console tail.
pub const MAX_CONSOLE_TAIL: u32 = 1024 * 1024;
/// Default graceful shutdown timeout.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest graceful shutdown timeout a caller may ask for.
pub const MAX_SHUTDOWN_TIMEOUT_SECS: u32 = 600;
/// File name of a VM's private root disk.
const ROOTFS_FILE: &str = "rootfs.img";

/// Errors from the service, each mapped to one API status in `api::error`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A request field is wrong.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, as a path like `config.cpu.vcpu_count`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No VM with this id belongs to the caller.
    #[error("vm {0} not found")]
    NotFound(VmId),
    /// No snapshot with this id belongs to the caller (another customer's is the same answer).
    #[error("snapshot {0} not found")]
    SnapshotNotFound(String),
    /// The VM or snapshot is not in a state that allows the operation.
    #[error("{0}")]
    Precondition(String),
    /// This host's VMM cannot do what was asked.
    #[error("{0}")]
    Unimplemented(String),
    /// The VM's state does not allow the operation.
    #[error(transparent)]
    FailedPrecondition(#[from] InvalidTransition),
    /// The VMM failed to do what was asked.
    #[error("{op} {vm}")]
    Backend {
        /// The operation.
        op: &'static str,
        /// The VM.
        vm: VmId,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// The asset store failed.
    #[error(transparent)]
    Asset(AssetError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM's sandbox (network, jail) could not be set up.
    #[error("isolate {vm}")]
    Sandbox {
        /// The VM.
        vm: VmId,
        /// What failed.
        #[source]
        source: SandboxError,
    },
    /// The host has no room for what was asked; nothing was made.
    #[error(transparent)]
    HostExhausted(Shortage),
    /// The host's totals could not be read.
    #[error("measure the host")]
    Probe(#[source] ProbeError),
    /// Removing leftovers of earlier runs at start failed.
    #[error("remove leftovers of earlier runs")]
    Sweep(#[source] SandboxError),
    /// A clone's address map could not be set up in its sandbox.
    #[error("map the addresses of {vm}")]
    CloneMap {
        /// The VM.
        vm: VmId,
        /// What failed.
        #[source]
        source: Box<crate::network::clone_map::CloneMapError>,
    },
    /// The VM's host is another host of the fleet whose lease ran out.
    #[error("the VM's host is down; the VM keeps its last known state until the host is back")]
    HostDown,
    /// A file operation failed.
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
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Tunables of the service.
#[derive(Clone)]
pub struct ServiceConfig {
    /// Directory holding one sub-directory per VM.
    pub vms_dir: PathBuf,
    /// How long a guest whose rootfs declares a readiness line may take to print it.
    pub boot_timeout: Duration,
    /// Each customer's quotas, as the quota file says now.
    pub quotas: Arc<QuotaTable>,
    /// What metald leaves to the host and how far it overcommits.
    pub host: HostSettings,
    /// The host's totals.
    pub probe: Arc<dyn HostProbe>,
    /// Most bytes a VM's console log keeps (its oldest output is cut beyond).
    pub console_max_bytes: u64,
    /// Directory holding one sub-directory per snapshot (metald's alone).
    pub snapshots_dir: PathBuf,
    /// How clones' address maps are loaded; `None` when VMs have no network (isolation off).
    pub clone_net: Option<CloneNet>,
    /// This host in its fleet.
    pub membership: Arc<crate::membership::Membership>,
    /// Spare disk copies kept per image (`UNKEY_METALD_WARM_DISKS`; 0: none).
    pub warm_disks: usize,
    /// Largest image given spare copies, bytes (`UNKEY_METALD_WARM_DISK_MAX_MIB`).
    pub warm_disk_max_bytes: u64,
}

/// How often running VMs' console logs are checked against their cap.
const CONSOLE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How to shut a VM down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownRequest {
    /// Kill at once.
    pub force: bool,
    /// Seconds the guest may take; 0 means the default.
    pub timeout_seconds: u32,
}

/// One page of VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPage {
    /// The VMs.
    pub vms: Vec<VmRecord>,
    /// Token for the next page; empty on the last one.
    pub next_page_token: String,
}

/// Where a caller's VM is held ([`VmService::whereabouts`]).
#[derive(Debug)]
pub enum Whereabouts {
    /// On this host (or nowhere: the local call answers not found).
    Here,
    /// On an UP peer.
    Peer(Box<crate::fleet::HostRecord>),
}

/// Which host holds a VM a read shows ([`VmService::held_by`]).
#[derive(Debug)]
pub enum HeldBy {
    /// This host.
    Here,
    /// Another host of the fleet.
    Peer(Box<crate::fleet::HostRecord>),
    /// A host no longer registered.
    Gone,
}

/// The lifecycle service.
pub struct VmService {
    store: Arc<dyn StateStore>,
    assets: Arc<AssetStore>,
    backend: Arc<dyn Backend>,
    isolation: Arc<dyn Isolation>,
    meter: Arc<Meter>,
    billing: std::sync::OnceLock<Arc<Billing>>,
    cfg: ServiceConfig,
    locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    timings: Timings,
    /// Console bytes cut from each VM's log since metald started.
    console_dropped: Mutex<HashMap<VmId, u64>>,
    /// Work left running in the background: deleted VMs whose leftovers are still being
    /// removed ([`VmService::reap`]), new VMs' disk copies being synced
    /// ([`VmService::sync_disks_later`]) and spare disk copies being made.
    background: Arc<tokio::sync::watch::Sender<usize>>,
    /// Disk copies made ahead of creates.
    spares: Arc<spare_disks::SpareDisks>,
    /// Turns to remove a deleted VM's leftovers ([`REAPERS`] at a time).
    reapers: tokio::sync::Semaphore,
}

/// How many deleted VMs' leftovers are removed at once.
const REAPERS: usize = 4;
impl VmService {
    /// Builds the service and starts handling VMM exits reported on `exits`.
    pub fn start(
        store: Arc<dyn StateStore>,
        assets: Arc<AssetStore>,
        backend: Arc<dyn Backend>,
        isolation: Arc<dyn Isolation>,
        meter: Arc<Meter>,
        cfg: ServiceConfig,
        mut exits: mpsc::UnboundedReceiver<ExitEvent>,
    ) -> Arc<Self> {
        let spares = Arc::new(spare_disks::SpareDisks::new(
            &cfg.vms_dir,
            cfg.warm_disks,
            cfg.warm_disk_max_bytes,
        ));
        let svc = Arc::new(Self {
            spares,
            store,
            assets,
            backend,
            isolation,
            meter,
            billing: std::sync::OnceLock::new(),
            cfg,
            locks: Mutex::new(HashMap::new()),
            timings: Timings::default(),
            console_dropped: Mutex::new(HashMap::new()),
            background: Arc::new(tokio::sync::watch::Sender::new(0)),
            reapers: tokio::sync::Semaphore::new(REAPERS),
        });
        let weak = Arc::downgrade(&svc);
        tokio::spawn(async move {
            while let Some(ev) = exits.recv().await {
                let Some(svc) = weak.upgrade() else { break };
                svc.handle_exit(ev).await;
            }
        });
        let weak = Arc::downgrade(&svc);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CONSOLE_CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(svc) = weak.upgrade() else { break };
                // File work off the runtime threads.
                let _done = tokio::task::spawn_blocking(move || svc.cap_consoles()).await;
            }
        });
        svc
    }

    /// Cuts the console log of every VM with a VMM down to the cap, so a guest cannot fill
    /// the host's disk. A guest flooding its console before its readiness line may get that
    /// line cut too, and then times out like a guest that never became ready.
    fn cap_consoles(&self) {
        // The meter knows which VMs have a VMM: no database read every second.
        for vm in self.meter.running() {
            match crate::backend::console::cap(&self.vm_dir(&vm), self.cfg.console_max_bytes) {
                Ok(0) => {}
                Ok(cut) => {
                    *self
                        .console_dropped
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(vm.clone())
                        .or_default() += cut;
                    tracing::info!(vm_id = %vm, cut, "console log cut to its cap");
                }
                Err(e) => {
                    tracing::warn!(vm_id = %vm, error = %e, "capping the console log failed")
                }
            }
        }
    }

    /// Sends usage to the billing service from now on (set once, at start, before
    /// [`VmService::reconcile`]).
    pub fn set_billing(&self, billing: Arc<Billing>) {
        if self.billing.set(billing).is_err() {
            tracing::error!("billing was set twice; keeping the first");
        }
    }

    /// This host in its fleet.
    pub fn membership(&self) -> &Arc<crate::membership::Membership> {
        &self.cfg.membership
    }

    /// The pools of sandbox parts made ahead of boots, when VMs are isolated.
    pub fn pools(&self) -> Option<crate::sandbox::Pools> {
        self.isolation.pools()
    }

    /// Spare disk copies ready for creates, all images together.
    pub fn spare_disks(&self) -> usize {
        self.spares.ready()
    }

    /// Rows waiting for the billing service, when billing is on.
    pub fn outbox_depth(&self) -> Option<u64> {
        self.billing.get().map(|b| b.outbox_depth())
    }

    /// Durations of lifecycle steps.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Whether metald can serve: the database answers and the VMM binary can be run.
    pub fn ready(&self) -> Result<(), Unready> {
        self.store.count_by_state().map_err(Unready::Database)?;
        self.backend.ready().map_err(Unready::Backend)
    }

    /// The VM's network identity, when metald isolates VMs.
    pub fn network_of(&self, vm: &VmRecord) -> Option<crate::network::VmNetworkPlan> {
        self.isolation.network_of(vm)
    }

    /// The backend in use.
    pub fn backend_name(&self) -> &'static str {
        self.backend.kind().as_str()
    }

    /// Locks the caller's VM `id` and loads it under the lock. Ownership is checked first:
    /// another customer's id, or a made-up one, never reaches the lock map, so it neither grows
    /// the map nor waits behind (and so learns of) the owner's call in flight.
    async fn lock_own(
        &self,
        customer: &CustomerId,
        id: &VmId,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, VmRecord), ServiceError> {
        self.load(customer, id).await?;
        let guard = self.lock(id).await;
        match self.load(customer, id).await {
            Ok(vm) => Ok((guard, vm)),
            Err(e) => {
                // Deleted while this call waited: its entry goes too.
                drop(guard);
                self.forget_lock(id);
                Err(e)
            }
        }
    }

    /// Drops the VM's lock entry (the VM is gone; a holder keeps its own `Arc`).
    fn forget_lock(&self, id: &VmId) {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    async fn lock(&self, id: &VmId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(locks.entry(id.clone()).or_default())
        };
        lock.lock_owned().await
    }

    fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.cfg.vms_dir.join(id.as_str())
    }

    /// Which host holds the caller's VM: this one (or none: the local call answers not found,
    /// as for any missing VM), an UP peer the call is forwarded to, or a DOWN one. Another
    /// customer's VM on a peer is not found, exactly like a missing one.
    pub async fn whereabouts(
        &self,
        customer: &CustomerId,
        id: &VmId,
    ) -> Result<Whereabouts, ServiceError> {
        let me = self.cfg.membership.host_id();
        match self
            .store
            .vm_hosts(std::slice::from_ref(id))?
            .pop()
            .flatten()
        {
            None => Ok(Whereabouts::Here),
            Some(host) if host == me => Ok(Whereabouts::Here),
            Some(host) => {
                self.load(customer, id).await?;
                self.peer(&host)
            }
        }
    }

    /// [`VmService::whereabouts`] of the caller's snapshot `id`: the host holding its files.
    pub fn snapshot_whereabouts(
        &self,
        customer: &CustomerId,
        id: &str,
    ) -> Result<Whereabouts, ServiceError> {
        let me = self.cfg.membership.host_id();
        match self.store.snapshot_host(id)? {
            None => Ok(Whereabouts::Here),
            Some(host) if host == me => Ok(Whereabouts::Here),
            Some(host) => {
                if self.store.get_snapshot(customer, id)?.is_none() {
                    return Err(ServiceError::SnapshotNotFound(id.to_string()));
                }
                self.peer(&host)
            }
        }
    }

    /// An UP peer to call, or the reason it cannot be.
    fn peer(&self, host: &crate::fleet::HostId) -> Result<Whereabouts, ServiceError> {
        let record = self
            .cfg
            .membership
            .hosts()?
            .into_iter()
            .find(|h| h.registration.id == *host);
        match record {
            Some(h) if h.status == crate::fleet::HostStatus::Up => {
                Ok(Whereabouts::Peer(Box::new(h)))
            }
            _ => Err(ServiceError::HostDown),
        }
    }

    /// Where a new VM of `customer` with `config` may go, best first: the UP hosts with room
    /// for it (their registered capacity less what their stored VMs reserve), spreading the
    /// customer's VMs (fewest of theirs first), then the emptiest, then this host (no hop).
    /// The loads are a snapshot: the chosen host's insert checks its room again in the same
    /// transaction as the VM row, and a refusal moves on to the next. A store that serves one
    /// host places nothing: `[Here]`.
    pub fn placement(
        &self,
        customer: &CustomerId,
        config: &VmConfig,
    ) -> Result<Vec<Whereabouts>, ServiceError> {
        let hosts = self.cfg.membership.hosts()?;
        if hosts.len() < 2 {
            return Ok(vec![Whereabouts::Here]);
        }
        let loads = self.store.host_loads(customer)?;
        let me = self.cfg.membership.host_id();
        let headroom = self.backend.kind().memory_headroom_mib() * MIB;
        Ok(placement::rank(hosts, &loads, &me, config, headroom))
    }

    /// Where each of `vms` is held, for reads from a shared store that show VMs of every host
    /// (one read of their hosts, and of the fleet only when a VM is another host's).
    pub fn held_by(&self, vms: &[VmRecord]) -> Result<Vec<HeldBy>, ServiceError> {
        let me = self.cfg.membership.host_id();
        let ids: Vec<VmId> = vms.iter().map(|vm| vm.id.clone()).collect();
        let mut hosts: Option<Vec<crate::fleet::HostRecord>> = None;
        let mut out = Vec::with_capacity(vms.len());
        for host in self.store.vm_hosts(&ids)? {
            let held = match host {
                None => HeldBy::Here,
                Some(h) if h == me => HeldBy::Here,
                Some(h) => {
                    if hosts.is_none() {
                        hosts = Some(self.cfg.membership.hosts()?);
                    }
                    hosts
                        .iter()
                        .flatten()
                        .find(|r| r.registration.id == h)
                        .map_or(HeldBy::Gone, |r| HeldBy::Peer(Box::new(r.clone())))
                }
            };
            out.push(held);
        }
        Ok(out)
    }

    /// The address blocks the fleet gave the host at `index`.
    pub fn blocks_of(
        &self,
        index: u64,
    ) -> Option<(
        crate::network::ipam::Ipv6Prefix,
        Option<crate::network::ipam::Ipv4Subnet>,
    )> {
        self.cfg.membership.blocks(index)
    }

    async fn load(&self, customer: &CustomerId, id: &VmId) -> Result<VmRecord, ServiceError> {
        self.store
            .get_vm(customer, id)?
            .ok_or_else(|| ServiceError::NotFound(id.clone()))
    }

    fn save(&self, vm: &mut VmRecord) -> Result<(), ServiceError> {
        vm.updated_at_ms = now_ms();
        self.store.update_vm(vm)?;
        Ok(())
    }

    /// Validates `config`, prepares the VM's disks and records it as CREATED. Nothing is left
    /// behind if any step fails.
    pub async fn create(
        &self,
        customer: &CustomerId,
        config: VmConfig,
    ) -> Result<VmRecord, ServiceError> {
        let t0 = std::time::Instant::now();
        self.validate(customer, &config)?;
        let writable = self.writable_disk_bytes(&config)?;
        self.check_disk_room(writable)?;
        self.in_new_vm_dir(|id, dir| async move {
            self.prepare(customer, &id, &dir, config, writable, t0)
                .await
        })
        .await
    }

    /// Makes a new VM's id and directory and runs `make` in it; if that fails, the directory
    /// goes again (nothing of a failed create is left).
    pub(super) async fn in_new_vm_dir<F, Fut>(&self, make: F) -> Result<VmRecord, ServiceError>
    where
        F: FnOnce(VmId, PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<VmRecord, ServiceError>>,
    {
        let id = VmId::generate();
        let dir = self.vm_dir(&id);
        std::fs::create_dir(&dir).map_err(|source| ServiceError::Io {
            op: "create VM directory",
            path: dir.clone(),
            source,
        })?;
        let result = make(id.clone(), dir.clone()).await;
        if result.is_err() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::error!(vm_id = %id, error = %Chain(&e), "rolling back a failed create left its directory");
            }
        }
        result
    }

    /// A new VM's record, CREATED now, with the files its backend wants beside its disks;
    /// the store gives it its sequence number and network.
    pub(super) async fn new_record(
        &self,
        id: &VmId,
        customer: &CustomerId,
        config: VmConfig,
    ) -> Result<VmRecord, ServiceError> {
        let now = now_ms();
        let record = VmRecord {
            id: id.clone(),
            customer: customer.clone(),
            life: VmLife::created(),
            config,
            backend: self.backend_name().to_string(),
            created_at_ms: now,
            updated_at_ms: now,
            seq: 0,
            net: None,
        };
        let launch = self.launch(&record)?;
        self.backend
            .create(&launch)
            .await
            .map_err(|source| ServiceError::Backend {
                op: "prepare",
                vm: id.clone(),
                source,
            })?;
        Ok(record)
    }

    /// Starts the VM's VMM and boots its guest.
    pub async fn boot(
        self: &Arc<Self>,
        customer: &CustomerId,
        id: &VmId,
    ) -> Result<VmRecord, ServiceError> {
        let (_guard, mut vm) = self.lock_own(customer, id).await?;
        next_state(vm.state(), Operation::Boot)?;
        if self.missing_disk(&vm).is_some() {
            return Err(ServiceError::FailedPrecondition(InvalidTransition {
                from: vm.state(),
                op: Operation::Boot,
                hint: "; a disk of its own is gone, it can only be deleted",
            }));
        }
        self.fetch_assets(&vm.config).await?;
        // A clone's first boot restores its snapshot; otherwise a save left by a suspend that
        // never finished (metald killed half way) is stale.
        let how = if self.restores_on_boot(&vm) {
            StartKind::Restore
        } else {
            remove_suspended_state(&self.vm_dir(id))?;
            StartKind::Boot
        };
        // The reservation counts the headroom of the backend that boots the VM.
        vm.backend = self.backend_name().to_string();
        self.admit_and_start(vm, how).await
    }

    /// Admits the VM against its customer's running quotas and the host's capacity before
    /// anything starts, then starts it. The reservation ends when the VM is saved running, or
    /// here when the start fails.
    async fn admit_and_start(
        self: &Arc<Self>,
        mut vm: VmRecord,
        how: StartKind,
    ) -> Result<VmRecord, ServiceError> {
        let t0 = std::time::Instant::now();
        let host = self.host_limits()?;
        self.store
            .reserve_run(&vm, &self.cfg.quotas.of(&vm.customer).run, &host)?;
        let admission_ms = t0.elapsed().as_secs_f64() * 1000.0;
        match self.start_vmm(&mut vm, how, admission_ms).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                if let Err(r) = self.store.release_run(&vm.id) {
                    tracing::error!(vm_id = %vm.id, how = how.as_str(), error = %Chain(&r), "releasing a failed start's quota reservation failed");
                }
                Err(e)
            }
        }
    }

    /// A boot's or a wake's effects: the sandbox, the VMM, the record saved running, metering
    /// and (for a boot) the readiness watch. What fails half way is undone here.
    async fn start_vmm(
        self: &Arc<Self>,
        vm: &mut VmRecord,
        how: StartKind,
        admission_ms: f64,
    ) -> Result<(), ServiceError> {
        let mut launch = self.launch(vm)?;
        // Until this start is over (however it ends), or its backend says what is left of it
        // needs none of what a refill takes, the warm pools hold their refills.
        launch.hold = StartHold::new(self.isolation.starting());
        let _hold = launch.hold.until_dropped();
        let t0 = std::time::Instant::now();
        self.isolation
            .setup(vm, &mut launch)
            .instrument(tracing::info_span!("sandbox.setup", vm_id = %vm.id))
            .await
            .map_err(|source| ServiceError::Sandbox {
                vm: vm.id.clone(),
                source,
            })?;
        let sandbox_ms = t0.elapsed().as_secs_f64() * 1000.0;
        self.timings.observe(Step::Sandbox, sandbox_ms / 1000.0);
        let console_offset = file_len(&launch.console_log());
        let t1 = std::time::Instant::now();
        let started = match how {
            StartKind::Boot => self.backend.boot(&launch).instrument(tracing::info_span!(
                "backend.boot",
                vm_id = %vm.id,
                backend = self.backend_name()
            )),
            StartKind::Wake | StartKind::Restore => {
                self.backend.wake(&launch).instrument(tracing::info_span!(
                    "backend.wake",
                    vm_id = %vm.id,
                    backend = self.backend_name()
                ))
            }
        };
        // The firewall opens while the VMM starts, and then a clone's address map loads (an
        // `nft` run of 5-8 ms here, beside a snapshot load of 10-15 ms): the VM's traffic
        // is dropped until the firewall is open, and what a clone's guest sends before its
        // map is there leaves with addresses that are not its VM's, which the firewall drops
        // too. The start waits for both.
        let opened = async {
            self.isolation
                .open(vm)
                .await
                .map_err(|source| ServiceError::Sandbox {
                    vm: vm.id.clone(),
                    source,
                })?;
            self.map_clone_addresses(vm, &launch, how).await
        };
        let (started, opened) = tokio::join!(started, opened);
        let process = match (started, opened) {
            (Ok(p), Ok(())) => p,
            (Err(source), _) => {
                let _logged = self.release_sandbox(vm).await;
                return Err(ServiceError::Backend {
                    op: how.as_str(),
                    vm: vm.id.clone(),
                    source,
                });
            }
            (Ok(_), Err(e)) => {
                if let Err(stop) = self.backend.shutdown(&vm.id, StopMode::Force).await {
                    tracing::error!(vm_id = %vm.id, error = %Chain(&stop), "stopping a VMM whose firewall or address map could not be set up failed");
                }
                let _logged = self.release_sandbox(vm).await;
                return Err(e);
            }
        };
        let (pid, start_ticks) = (process.pid, process.start_ticks);
        vm.life.apply(match how {
            StartKind::Boot | StartKind::Restore => Change::Booted { pid, start_ticks },
            StartKind::Wake => Change::Woken { pid, start_ticks },
        })?;
        if how != StartKind::Boot {
            // The guest goes on from where it was saved: booted long ago.
            vm.life.mark_guest_ready();
        }
        let vmm_ms = t1.elapsed().as_secs_f64() * 1000.0;
        self.timings.observe(Step::VmmStart, vmm_ms / 1000.0);
        let t2 = std::time::Instant::now();
        vm.backend = self.backend_name().to_string();
        self.save(vm)?;
        self.track(vm, process.pid, false);
        // The start's steps, in order (the per-step profile of issue 14).
        let record_ms = t2.elapsed().as_secs_f64() * 1000.0;
        let pid = process.pid;
        match how {
            StartKind::Boot => {
                tracing::info!(vm_id = %vm.id, pid, admission_ms, sandbox_ms, vmm_ms, record_ms, "vm booted")
            }
            StartKind::Wake => {
                tracing::info!(vm_id = %vm.id, pid, admission_ms, sandbox_ms, vmm_ms, record_ms, "vm woken")
            }
            StartKind::Restore => {
                tracing::info!(vm_id = %vm.id, pid = process.pid, sandbox_ms, vmm_ms, "vm restored from its snapshot")
            }
        }
        if how == StartKind::Boot {
            self.watch_readiness(vm, &launch, console_offset);
        }
        Ok(())
    }

    /// Freezes the VM's vCPUs.
    pub async fn pause(&self, customer: &CustomerId, id: &VmId) -> Result<VmRecord, ServiceError> {
        self.vcpus(customer, id, Vcpus::Freeze).await
    }

    /// Unfreezes the VM's vCPUs, or wakes a suspended VM where it was saved.
    pub async fn resume(
        self: &Arc<Self>,
        customer: &CustomerId,
        id: &VmId,
    ) -> Result<VmRecord, ServiceError> {
        if self.load(customer, id).await?.state() == VmState::Suspended {
            return self.wake(customer, id).await;
        }
        self.vcpus(customer, id, Vcpus::Thaw).await
    }

    /// Saves the VM's memory and device state next to its disks and ends its VMM: the VM then
    /// holds no running quota, memory, sandbox or VMM until it is woken.
    pub async fn suspend(
        &self,
        customer: &CustomerId,
        id: &VmId,
    ) -> Result<VmRecord, ServiceError> {
        let (_guard, mut vm) = self.lock_own(customer, id).await?;
        next_state(vm.state(), Operation::Suspend)?;
        // The saved memory is as large as the guest's.
        self.check_disk_room(vm.config.memory_bytes)?;
        let dir = self.vm_dir(id);
        // A woken Firecracker maps its memory from the last saved file: the new save goes to
        // new files, never into the one the running guest reads from.
        remove_suspended_state(&dir)?;
        let t0 = std::time::Instant::now();
        if let Err(source) = self.backend.suspend(id, &dir).await {
            // The VMM may have died or been stopped half way; record what is true.
            if self.backend.info(id).await.is_none_or(|i| !i.alive) {
                vm.life
                    .apply(Change::Failed(format!("suspend failed: {source}")))?;
                self.save(&mut vm)?;
                let _logged = self.release_sandbox(&vm).await;
            } else if vm.state() == VmState::Running {
                // Paused for the save: running again, as it was.
                let _ignored = self.backend.resume(id).await;
            }
            let _ignored = remove_suspended_state(&dir);
            return Err(ServiceError::Backend {
                op: "suspend",
                vm: id.clone(),
                source,
            });
        }
        let _logged = self.release_sandbox(&vm).await;
        vm.life.apply(Change::Suspended)?;
        self.save(&mut vm)?;
        tracing::info!(vm_id = %id, suspend_ms = t0.elapsed().as_secs_f64() * 1000.0, "vm suspended");
        Ok(vm)
    }

    /// Starts a suspended VM again from its saved state, admitted like a boot.
    async fn wake(
        self: &Arc<Self>,
        customer: &CustomerId,
        id: &VmId,
    ) -> Result<VmRecord, ServiceError> {
        let (_guard, vm) = self.lock_own(customer, id).await?;
        next_state(vm.state(), Operation::Resume)?;
        if vm.backend != self.backend_name() {
            return Err(ServiceError::FailedPrecondition(InvalidTransition {
                from: vm.state(),
                op: Operation::Resume,
                hint: "; it was saved by another VMM than this host runs: shut it down to boot it afresh",
            }));
        }
        self.admit_and_start(vm, StartKind::Wake).await
    }

    async fn vcpus(
        &self,
        customer: &CustomerId,
        id: &VmId,
        op: Vcpus,
    ) -> Result<VmRecord, ServiceError> {
        let (_guard, mut vm) = self.lock_own(customer, id).await?;
        let (name, change) = match op {
            Vcpus::Freeze => ("pause", Change::Paused),
            Vcpus::Thaw => ("resume", Change::Resumed),
        };
        next_state(vm.state(), change.operation())?;
        let result = match op {
            Vcpus::Freeze => self.backend.pause(id).await,
            Vcpus::Thaw => self.backend.resume(id).await,
        };
        result.map_err(|source| ServiceError::Backend {
            op: name,
            vm: id.clone(),
            source,
        })?;
        vm.life.apply(change)?;
        self.save(&mut vm)?;
        Ok(vm)
    }

    /// Shuts the VM down, gracefully unless forced.
    pub async fn shutdown(
        &self,
        customer: &CustomerId,
        id: &VmId,
        req: ShutdownRequest,
    ) -> Result<VmRecord, ServiceError> {
        let mode = stop_mode(req.force, req.timeout_seconds)?;
        let (_guard, mut vm) = self.lock_own(customer, id).await?;
        next_state(vm.state(), Operation::Shutdown)?;
        if vm.state() == VmState::Suspended {
            // No VMM: only the saved state goes, and the next boot is a cold one.
            remove_suspended_state(&self.vm_dir(id))?;
            vm.life.apply(Change::ShutDown)?;
            self.save(&mut vm)?;
            return Ok(vm);
        }
        self.backend
            .shutdown(id, mode)
            .await
            .map_err(|source| ServiceError::Backend {
                op: "shut down",
                vm: id.clone(),
                source,
            })?;
        let _logged = self.release_sandbox(&vm).await;
        // A woken VM's saved state is stale once it stops.
        remove_suspended_state(&self.vm_dir(id))?;
        tracing::info!(vm_id = %id, "vm shut down");
        vm.life.apply(Change::ShutDown)?;
        self.save(&mut vm)?;
        Ok(vm)
    }

    /// Restarts the guest in a fresh VMM process.
    pub async fn reboot(
        self: &Arc<Self>,
        customer: &CustomerId,
        id: &VmId,
        force: bool,
    ) -> Result<VmRecord, ServiceError> {
        let mode = stop_mode(force, 0)?;
        let (_guard, mut vm) = self.lock_own(customer, id).await?;
        next_state(vm.state(), Operation::Reboot)?;
        let mut launch = self.launch(&vm)?;
        // The namespace and veth stay across a reboot; only a new jail is made.
        self.isolation
            .attach(&vm, &mut launch)
            .map_err(|source| ServiceError::Sandbox {
                vm: id.clone(),
                source,
            })?;
        // The reboot is a cold boot in the namespace that stays: a clone's map goes.
        self.unmap_clone_addresses(&vm, &launch).await?;
        let console_offset = file_len(&launch.console_log());
        let result = self.backend.reboot(&launch, mode).await;
        let process = match result {
            Ok(p) => p,
            Err(source) => {
                // The old VMM may be gone by now; record what is true before reporting.
                if self.backend.info(id).await.is_none_or(|i| !i.alive) {
                    vm.life
                        .apply(Change::Failed(format!("reboot failed: {source}")))?;
                    self.save(&mut vm)?;
                    let _logged = self.release_sandbox(&vm).await;
                }
                return Err(ServiceError::Backend {
                    op: "reboot",
                    vm: id.clone(),
                    source,
                });
            }
        };
        vm.life.apply(Change::Rebooted {
            pid: process.pid,
            start_ticks: process.start_ticks,
        })?;
        self.save(&mut vm)?;
        self.untrack(&vm);
        self.track(&vm, process.pid, false);
        tracing::info!(vm_id = %id, pid = process.pid, "vm rebooted");
        self.watch_readiness(&vm, &launch, console_offset);
        Ok(vm)
    }

    /// Removes the VM and everything it owns. The call waits only for what makes the VM gone
    /// for its owner: its VMM is sent SIGKILL, its last usage taken and its row removed, while
    /// its jail slot and addresses stay held. The rest (the VMM's end, its network, cgroup and
    /// jail, its directory) is removed by [`VmService::reap`] in a task of its own, which frees
    /// the held allocation once all of it is gone; metald killed before that sweeps the same
    /// leftovers at start.
    pub async fn delete(
        self: &Arc<Self>,
        customer: &CustomerId,
        id: &VmId,
        force: bool,
    ) -> Result<(), ServiceError> {
        let (guard, vm) = self.lock_own(customer, id).await?;
        next_state(vm.state(), Operation::Delete { force })?;
        let dir = self.vm_dir(id);
        let t0 = std::time::Instant::now();
        self.backend
            .delete(id, &dir)
            .await
            .map_err(|source| ServiceError::Backend {
                op: "delete",
                vm: id.clone(),
                source,
            })?;
        let vmm_ms = t0.elapsed().as_secs_f64() * 1000.0;
        self.untrack(&vm);
        self.store.delete_vm_holding_allocation(id)?;
        self.meter.forget(id);
        self.console_dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        drop(guard);
        self.forget_lock(id);
        let rest_ms = t0.elapsed().as_secs_f64() * 1000.0 - vmm_ms;
        tracing::info!(vm_id = %id, vmm_ms, rest_ms, "vm deleted");
        let job = self.background_job();
        let svc = Arc::clone(self);
        tokio::spawn(async move {
            let _job = job;
            // A few at a time: a burst of deletes queues here rather than as hundreds of tasks
            // and blocking threads contending for the same kernel locks.
            if let Ok(_turn) = svc.reapers.acquire().await {
                svc.reap(vm).await;
            }
        });
        Ok(())
    }

    /// Removes what a deleted VM left: its sandbox (waiting for its VMM to be gone) and its
    /// directory, then frees its jail slot and addresses. What fails is retried a few times;
    /// after that the allocation stays held and the start-up sweep finishes the job.
    async fn reap(&self, vm: VmRecord) {
        const TRIES: u32 = 3;
        let t0 = std::time::Instant::now();
        let dir = self.vm_dir(&vm.id);
        for attempt in 1..=TRIES {
            let released = self.isolation.release(&vm).await;
            let removed = match tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            })
            .await
            {
                Ok(r) => r,
                Err(join) => Err(std::io::Error::other(join)),
            };
            match (released, removed) {
                (Ok(()), Ok(())) => {
                    if let Err(e) = self.store.free_held_allocation(&vm.id) {
                        tracing::error!(vm_id = %vm.id, error = %Chain(&e), "freeing a deleted VM's slot and addresses failed; freed at next start");
                    }
                    let reap_ms = t0.elapsed().as_secs_f64() * 1000.0;
                    tracing::info!(vm_id = %vm.id, reap_ms, "deleted VM's leftovers removed");
                    return;
                }
                // Each failure is logged where it happened.
                (Err(_), _) | (_, Err(_)) if attempt < TRIES => {
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                }
                (released, removed) => {
                    if let Err(e) = removed {
                        tracing::error!(vm_id = %vm.id, error = %Chain(&e), "removing a deleted VM's directory failed");
                    }
                    tracing::error!(vm_id = %vm.id, sandbox_released = released.is_ok(), "a deleted VM's leftovers could not all be removed; its slot and addresses stay held until the next start");
                    return;
                }
            }
        }
    }

    /// At shutdown: finishes removing deleted VMs' leftovers, then what belongs to no VM (the
    /// spare disk copies, the warm pools). Running VMs keep running.
    pub async fn close(&self) {
        // No refill adds spares from here on; one copying ends and removes its copy.
        self.spares.close();
        self.settle().await;
        self.isolation.shutdown().await;
    }

    /// Counts a piece of background work until the returned guard is dropped.
    pub(super) fn background_job(&self) -> BackgroundJob {
        self.background.send_modify(|n| *n += 1);
        BackgroundJob(Arc::clone(&self.background))
    }

    /// Waits until the background work ends: every deleted VM's leftovers removed (or given
    /// up on), every new VM's disk copies synced and every spare disk refill over. At
    /// shutdown, and in tests that look for leftovers or durable disks.
    pub async fn settle(&self) {
        let mut rx = self.background.subscribe();
        // The sender lives as long as `self`.
        let _closed = rx.wait_for(|n| *n == 0).await;
    }

    /// One of the caller's VMs.
    pub async fn get(&self, customer: &CustomerId, id: &VmId) -> Result<VmRecord, ServiceError> {
        self.load(customer, id).await
    }

    /// A page of the caller's VMs.
    pub async fn list(
        &self,
        customer: &CustomerId,
        state: Option<VmState>,
        page_size: u32,
        page_token: &str,
    ) -> Result<VmPage, ServiceError> {
        let limit = match page_size {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            n => return Err(invalid("page_size", format!("at most {MAX_PAGE}, got {n}"))),
        };
        let after = if page_token.is_empty() {
            0
        } else {
            page_token
                .strip_prefix("after:")
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    invalid("page_token", "not a token from a previous ListVms response")
                })?
        };
        // One extra row tells whether another page follows.
        let mut vms = self.store.list_vms(customer, state, after, limit + 1)?;
        let next_page_token = if vms.len() > limit as usize {
            vms.truncate(limit as usize);
            vms.last()
                .map(|v| format!("after:{}", v.seq))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(VmPage {
            vms,
            next_page_token,
        })
    }

    /// The tail of the VM's serial console.
    pub async fn console(
        &self,
        customer: &CustomerId,
        id: &VmId,
        tail_bytes: u32,
    ) -> Result<ConsoleTail, ServiceError> {
        let tail = match tail_bytes {
            0 => DEFAULT_CONSOLE_TAIL,
            n if n <= MAX_CONSOLE_TAIL => n,
            n => {
                return Err(invalid(
                    "tail_bytes",
                    format!("at most {MAX_CONSOLE_TAIL}, got {n}"),
                ))
            }
        };
        self.load(customer, id).await?;
        let mut tail =
            crate::backend::console::tail(&self.vm_dir(id), u64::from(tail)).map_err(|source| {
                ServiceError::Backend {
                    op: "read the console of",
                    vm: id.clone(),
                    source,
                }
            })?;
        tail.dropped_bytes = self
            .console_dropped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or(0);
        Ok(tail)
    }
}

/// The VMs and snapshots (of any customer) whose configuration names the asset: a snapshot's
/// clones boot from it too. An operator tool's read, not a request's.
pub fn asset_users(store: &dyn StateStore, image_id: &str) -> Result<Vec<String>, StoreError> {
    let names = |c: &VmConfig| {
        c.kernel_image_id == image_id
            || c.rootfs_image_id == image_id
            || c.drives.iter().any(|d| d.image_id == image_id)
    };
    let vms = store.all_vms()?.into_iter().filter(|vm| names(&vm.config));
    let snapshots = store
        .all_snapshots()?
        .into_iter()
        .filter(|s| names(&s.config));
    Ok(vms
        .map(|vm| vm.id.to_string())
        .chain(snapshots.map(|s| format!("snapshot {}", s.id)))
        .collect())
}

/// Removes a VM's saved suspend state (missing is fine; a link is removed, not followed).
fn remove_suspended_state(dir: &Path) -> Result<(), ServiceError> {
    let remove = || -> Result<(), crate::backend::BackendError> {
        let dir = crate::backend::vm_dir::VmDir::open(dir)?;
        dir.remove(crate::backend::files::SUSPEND_STATE)?;
        dir.remove(crate::backend::files::SUSPEND_MEMORY)
    };
    remove().map_err(|source| ServiceError::Io {
        op: "remove the saved state of",
        path: dir.to_path_buf(),
        source: std::io::Error::other(source),
    })
}

/// Pause and resume: the VMM stays, its vCPUs freeze or run again.
#[derive(Clone, Copy)]
enum Vcpus {
    Freeze,
    Thaw,
}

/// Why metald cannot serve now (the readiness check's answer).
#[derive(Debug, thiserror::Error)]
pub enum Unready {
    /// The database does not answer.
    #[error("database")]
    Database(#[source] StoreError),
    /// The backend cannot start VMMs.
    #[error("backend")]
    Backend(#[source] crate::backend::NotReady),
}

/// Runs `f` on the blocking pool (file work that may take long, never on an async worker); a
/// task that did not finish is an I/O error named by `op`.
pub(super) async fn on_blocking_pool<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|join| ServiceError::Io {
            op,
            path: PathBuf::new(),
            source: std::io::Error::other(join),
        })
}

/// One piece of background work, counted for [`VmService::settle`] until it is dropped
/// (however the work ends).
pub(super) struct BackgroundJob(Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for BackgroundJob {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The state a legal operation leads to (Delete, which leads nowhere, keeps the current one).
fn next_state(from: VmState, op: Operation) -> Result<VmState, ServiceError> {
    Ok(transition(from, op)?.unwrap_or(from))
}

fn stop_mode(force: bool, timeout_seconds: u32) -> Result<StopMode, ServiceError> {
    if timeout_seconds > MAX_SHUTDOWN_TIMEOUT_SECS {
        return Err(invalid(
            "timeout_seconds",
            format!("at most {MAX_SHUTDOWN_TIMEOUT_SECS}, got {timeout_seconds}"),
        ));
    }
    Ok(match (force, timeout_seconds) {
        (true, _) => StopMode::Force,
        (false, 0) => StopMode::Graceful(DEFAULT_SHUTDOWN_TIMEOUT),
        (false, s) => StopMode::Graceful(Duration::from_secs(u64::from(s))),
    })
}

#[cfg(test)]
mod tests;
