//! The VM lifecycle service: validates requests, owns every state transition, and drives the
//! store, the asset store and the backend. Both API adapters (Connect and REST) call only this.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::assets::{AssetError, AssetStore, BootFiles};
use crate::backend::{file_tail, Backend, BackendError, Disk, ExitEvent, StopMode, VmLaunch};
use crate::billing::Billing;
use crate::domain::{is_token, now_ms, CustomerId, DriveConfig, VmConfig, VmId, VmRecord, MIB};
use crate::metering::sources::Sources;
use crate::metering::{Counters, Meter, RunStart, VmUsage};
use crate::report::Chain;
use crate::sandbox::{SandboxError, Sandboxes};
use crate::state::{transition, Change, InvalidTransition, Operation, VmLife, VmState};
use crate::store::{AssetKind, Store, StoreError};
use crate::timings::{Step, Timings};

/// Smallest guest memory metald accepts. Measured with the default guest (Debian 6.1 cloud
/// kernel, initrd, busybox rootfs) under QEMU: 80 MiB booted to the readiness line in 12 of 12
/// runs, 72 MiB in 3 of 12, 64 MiB in none (out of memory unpacking the initrd); 96 MiB keeps
/// one step of margin.
pub const MIN_MEMORY_MIB: u64 = 96;
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
    /// Removing leftovers of earlier runs at start failed.
    #[error("remove leftovers of earlier runs")]
    Sweep(#[source] SandboxError),
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
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Directory holding one sub-directory per VM.
    pub vms_dir: PathBuf,
    /// How long a guest whose rootfs declares a readiness line may take to print it.
    pub boot_timeout: Duration,
}

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

/// The tail of a console log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleTail {
    /// The text.
    pub output: String,
    /// Size of the whole log.
    pub total_bytes: u64,
    /// Only part of the log was returned.
    pub truncated: bool,
}

/// What one VM used within a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowUsage {
    /// The VM.
    pub vm: VmId,
    /// Used within the window.
    pub usage: Counters,
    /// Set when the window started before the VM's oldest sample held: usage counts from
    /// this time (Unix milliseconds) instead.
    pub covered_from_ms: Option<i64>,
}

/// The lifecycle service.
pub struct VmService {
    store: Arc<Store>,
    assets: Arc<AssetStore>,
    backend: Arc<dyn Backend>,
    sandboxes: Option<Arc<Sandboxes>>,
    meter: Option<Arc<Meter>>,
    billing: std::sync::OnceLock<Arc<Billing>>,
    cfg: ServiceConfig,
    locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    timings: Timings,
}

impl VmService {
    /// Builds the service and starts handling VMM exits reported on `exits`.
    pub fn start(
        store: Arc<Store>,
        assets: Arc<AssetStore>,
        backend: Arc<dyn Backend>,
        sandboxes: Option<Arc<Sandboxes>>,
        meter: Option<Arc<Meter>>,
        cfg: ServiceConfig,
        mut exits: mpsc::UnboundedReceiver<ExitEvent>,
    ) -> Arc<Self> {
        let svc = Arc::new(Self {
            store,
            assets,
            backend,
            sandboxes,
            meter,
            billing: std::sync::OnceLock::new(),
            cfg,
            locks: Mutex::new(HashMap::new()),
            timings: Timings::default(),
        });
        let weak = Arc::downgrade(&svc);
        tokio::spawn(async move {
            while let Some(ev) = exits.recv().await {
                let Some(svc) = weak.upgrade() else { break };
                svc.handle_exit(ev).await;
            }
        });
        svc
    }

    /// Sends usage to the billing service from now on (set once, at start, before
    /// [`VmService::reconcile`]).
    pub fn set_billing(&self, billing: Arc<Billing>) {
        if self.billing.set(billing).is_err() {
            tracing::error!("billing was set twice; keeping the first");
        }
    }

    /// Rows waiting for the billing service, when billing is on.
    pub fn outbox_depth(&self) -> Option<u64> {
        self.billing.get().map(|b| b.outbox_depth())
    }

    /// Starts counting a VM's VMM run: a new one (`adopted` false) from its current counter
    /// readings, a re-adopted one from where its counting started, so the totals stay
    /// continuous across a metald restart (the kernel kept counting meanwhile).
    fn track(&self, vm: &VmRecord, pid: u32, adopted: bool) {
        let Some(meter) = &self.meter else { return };
        let saved = self.store.load_usage(&vm.id).unwrap_or_else(|e| {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "reading saved usage failed");
            None
        });
        let (carried, base) = saved.unwrap_or_default();
        let base = if adopted { base } else { None };
        let (sources, host_if) = match &self.sandboxes {
            Some(sb) => (
                Sources::for_cgroup(&sb.jailer().cgroups().files(vm.id.as_str()), pid),
                sb.network().plan(vm).ok().map(|p| p.host_if),
            ),
            None => (Sources::for_process(pid), None),
        };
        let base = meter.track(
            &vm.id,
            RunStart {
                customer: vm.customer.clone(),
                memory_configured: vm.config.memory_bytes,
                sources,
                host_if,
                carried,
                base,
            },
        );
        if let Err(e) = self.store.save_usage(&vm.id, &carried, Some(&base)) {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "saving usage failed");
        }
        self.poll_vmm_metrics(&vm.id);
        if let Some(b) = self.billing.get() {
            if adopted {
                b.resumed(&vm.id);
            } else {
                b.vm_started(&vm.id, &vm.customer);
            }
        }
    }

    /// While the VM runs, asks its VMM for its own metrics every
    /// `UNKEY_METALD_VMM_METRICS_INTERVAL` (Firecracker's FlushMetrics). Each flush costs an
    /// API round trip and a 5 KB JSON record, a few hundred µs of metald's CPU on a slow host,
    /// so this is not done at the 100 ms sampling rate: billing comes from the kernel's counters,
    /// and these records add Firecracker's own view (disk operations, device errors).
    fn poll_vmm_metrics(&self, vm: &VmId) {
        let Some(meter) = self.meter.clone() else {
            return;
        };
        let backend = Arc::clone(&self.backend);
        let vm = vm.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(meter.vmm_metrics_interval());
            loop {
                every.tick().await;
                if !meter.is_running(&vm) {
                    return;
                }
                match backend.vmm_metrics(&vm).await {
                    Ok(Some(m)) => meter.add_vmm_metrics(&vm, m),
                    // This VMM has no metrics channel.
                    Ok(None) => return,
                    Err(BackendError::NotRunning(_)) => return,
                    Err(e) => {
                        tracing::debug!(vm_id = %vm, error = %Chain(&e), "VMM metrics flush failed")
                    }
                }
            }
        });
    }

    /// Takes the VM's last sample, saves its totals and queues its last usage for billing.
    fn untrack(&self, vm: &VmRecord) {
        let Some(total) = self.meter.as_ref().and_then(|m| m.stop(&vm.id)) else {
            return;
        };
        if let Err(e) = self.store.save_usage(&vm.id, &total, None) {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "saving usage failed");
        }
        if let Some(b) = self.billing.get() {
            b.vm_stopped(&vm.id, &vm.customer);
        }
    }

    /// Number of VMs in each state.
    pub fn vm_counts(&self) -> Vec<(VmState, u64)> {
        self.store.count_by_state().unwrap_or_else(|e| {
            tracing::error!(error = %Chain(&e), "counting VMs failed");
            Vec::new()
        })
    }

    /// Every metered VM's totals (for exporting).
    pub fn usage_snapshot(&self) -> Vec<(VmId, CustomerId, Counters)> {
        self.meter
            .as_ref()
            .map(|m| m.snapshot())
            .unwrap_or_default()
    }

    /// Durations of lifecycle steps.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Seconds the sampler spent sampling and its rounds.
    pub fn meter_cost(&self) -> Option<(f64, u64)> {
        self.meter.as_ref().map(|m| m.cost())
    }

    /// Whether metald can serve: the database answers and the VMM binary can be run.
    pub fn ready(&self) -> Result<(), Unready> {
        self.store.count_by_state().map_err(Unready::Database)?;
        self.backend.ready().map_err(Unready::Backend)
    }

    /// The metering interval (zero when metering is off).
    pub fn metering_interval(&self) -> Duration {
        self.meter.as_ref().map_or(Duration::ZERO, |m| m.interval())
    }

    /// A VM's usage: totals and the samples after `since_ms`.
    pub async fn usage(
        &self,
        customer: &CustomerId,
        id: &VmId,
        since_ms: i64,
    ) -> Result<VmUsage, ServiceError> {
        let vm = self.load(customer, id).await?;
        Ok(self
            .meter
            .as_ref()
            .and_then(|m| m.usage(id, since_ms))
            .unwrap_or(VmUsage {
                total: Counters::default(),
                memory_configured: vm.config.memory_bytes,
                samples: Vec::new(),
                known_from_ms: None,
                vmm_metrics_raw: None,
            }))
    }

    /// What each of the customer's VMs used in `(start_ms, end_ms]`, from the samples held.
    /// Where a VM's samples don't reach back to `start_ms` (they age out after the retention
    /// time, and a restarted metald starts a new series) its usage counts from its oldest
    /// sample, whose time comes back beside it.
    pub async fn customer_usage(
        &self,
        customer: &CustomerId,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<WindowUsage>, ServiceError> {
        if end_ms < start_ms {
            return Err(invalid("end", "must not be before start"));
        }
        let Some(meter) = &self.meter else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for id in meter.customer_vms(customer) {
            let Some(u) = meter.usage(&id, i64::MIN) else {
                continue;
            };
            let at = |t: i64| {
                u.samples
                    .iter()
                    .rev()
                    .find(|p| p.wall_ms <= t)
                    .map(|p| p.total)
            };
            let (before, covered_from_ms) = match (at(start_ms), u.known_from_ms) {
                (Some(p), _) => (p, None),
                // Before its first sample a new VM had used nothing.
                (None, None) => (Counters::default(), None),
                // Usage from before the oldest sample is not known by time: count from it.
                (None, Some(from)) => (
                    u.samples.first().map(|p| p.total).unwrap_or_default(),
                    Some(from),
                ),
            };
            let Some(after) = at(end_ms) else { continue };
            out.push(WindowUsage {
                vm: id,
                usage: after.since(&before),
                covered_from_ms,
            });
        }
        Ok(out)
    }

    /// The VM's network identity, when metald isolates VMs.
    pub fn network_of(&self, vm: &VmRecord) -> Option<crate::network::VmNetworkPlan> {
        self.sandboxes.as_ref()?.network().plan(vm).ok()
    }

    /// The backend in use.
    pub fn backend_name(&self) -> &'static str {
        self.backend.kind().as_str()
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

    /// Validates `config`, prepares the VM's disks and records it as CREATED. Nothing is left
    /// behind if any step fails.
    pub async fn create(
        &self,
        customer: &CustomerId,
        config: VmConfig,
    ) -> Result<VmRecord, ServiceError> {
        self.validate(&config)?;
        let id = VmId::generate();
        let dir = self.vm_dir(&id);
        std::fs::create_dir(&dir).map_err(|source| ServiceError::Io {
            op: "create VM directory",
            path: dir.clone(),
            source,
        })?;
        let result = self.prepare(customer, &id, &dir, config).await;
        if result.is_err() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::error!(vm_id = %id, error = %Chain(&e), "rolling back a failed create left its directory");
            }
        }
        result
    }

    async fn prepare(
        &self,
        customer: &CustomerId,
        id: &VmId,
        dir: &Path,
        config: VmConfig,
    ) -> Result<VmRecord, ServiceError> {
        let rootfs = self
            .assets
            .get_kind(&config.rootfs_image_id, AssetKind::Rootfs)
            .map_err(|e| asset_field_error("config.rootfs.image_id", e))?;
        clone_disk(self.assets.path_of(&rootfs), dir.join(ROOTFS_FILE))
            .instrument(tracing::info_span!("disk.clone", vm_id = %id))
            .await?;
        for d in config.drives.iter().filter(|d| !d.read_only) {
            let asset = self
                .assets
                .get_kind(&d.image_id, AssetKind::Rootfs)
                .map_err(ServiceError::Asset)?;
            clone_disk(self.assets.path_of(&asset), dir.join(drive_file(d))).await?;
        }
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
        let plan = self.sandboxes.as_ref().map(|s| *s.allocation());
        let saved = self.store.insert_vm(&record, plan.as_ref())?;
        tracing::info!(vm_id = %id, customer = %customer, "vm created");
        Ok(saved)
    }

    /// Checks every field, naming the first bad one; also resolves image ids.
    fn validate(&self, c: &VmConfig) -> Result<(), ServiceError> {
        let max = self.backend.max_vcpus();
        if c.vcpu_count == 0 || c.vcpu_count > max {
            return Err(invalid(
                "config.cpu.vcpu_count",
                format!(
                    "must be between 1 and {max} ({} limit), got {}",
                    self.backend_name(),
                    c.vcpu_count
                ),
            ));
        }
        if !c.memory_bytes.is_multiple_of(MIB) {
            return Err(invalid(
                "config.memory.size_bytes",
                format!(
                    "must be a whole number of MiB (multiple of 1048576), got {}",
                    c.memory_bytes
                ),
            ));
        }
        if c.memory_bytes < MIN_MEMORY_MIB * MIB {
            return Err(invalid(
                "config.memory.size_bytes",
                format!(
                    "must be at least {} ({MIN_MEMORY_MIB} MiB), got {}",
                    MIN_MEMORY_MIB * MIB,
                    c.memory_bytes
                ),
            ));
        }
        self.assets
            .get_kind(&c.kernel_image_id, AssetKind::Kernel)
            .map_err(|e| asset_field_error("config.kernel.image_id", e))?;
        self.assets
            .get_kind(&c.rootfs_image_id, AssetKind::Rootfs)
            .map_err(|e| asset_field_error("config.rootfs.image_id", e))?;
        if c.kernel_args.len() > MAX_KERNEL_ARGS {
            return Err(invalid(
                "config.kernel_args",
                format!(
                    "at most {MAX_KERNEL_ARGS} bytes, got {}",
                    c.kernel_args.len()
                ),
            ));
        }
        if c.kernel_args.chars().any(|ch| ch.is_control()) {
            return Err(invalid(
                "config.kernel_args",
                "must not contain control characters",
            ));
        }
        if c.drives.len() > MAX_DRIVES {
            return Err(invalid(
                "config.drives",
                format!("at most {MAX_DRIVES} drives, got {}", c.drives.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in c.drives.iter().enumerate() {
            let field = format!("config.drives[{i}].drive_id");
            if !is_token(&d.drive_id, 32) || d.drive_id.chars().any(|ch| ch.is_ascii_uppercase()) {
                return Err(invalid(field, "1-32 of a-z 0-9 _ -"));
            }
            if d.drive_id == "rootfs" || !seen.insert(d.drive_id.as_str()) {
                return Err(invalid(field, format!("'{}' is already used", d.drive_id)));
            }
            self.assets
                .get_kind(&d.image_id, AssetKind::Rootfs)
                .map_err(|e| asset_field_error(&format!("config.drives[{i}].image_id"), e))?;
        }
        validate_metadata(&c.metadata)
    }

    /// What the backend needs to start this VM.
    fn launch(&self, vm: &VmRecord) -> Result<VmLaunch, ServiceError> {
        let files = self.boot_files(vm)?;
        let dir = self.vm_dir(&vm.id);
        let mut disks = vec![Disk {
            id: "rootfs".into(),
            path: dir.join(ROOTFS_FILE),
            read_only: false,
        }];
        for d in &vm.config.drives {
            let path = if d.read_only {
                let asset = self
                    .assets
                    .get_kind(&d.image_id, AssetKind::Rootfs)
                    .map_err(ServiceError::Asset)?;
                self.assets.path_of(&asset)
            } else {
                dir.join(drive_file(d))
            };
            disks.push(Disk {
                id: d.drive_id.clone(),
                path,
                read_only: d.read_only,
            });
        }
        Ok(VmLaunch {
            vm_id: vm.id.clone(),
            dir,
            vcpu_count: vm.config.vcpu_count,
            memory_mib: vm.config.memory_mib(),
            kernel: files.kernel,
            initrd: files.initrd,
            extra_kernel_args: vm.config.kernel_args.clone(),
            disks,
            net: None,
            jail: None,
        })
    }

    fn boot_files(&self, vm: &VmRecord) -> Result<BootFiles, ServiceError> {
        self.assets
            .boot_files(&vm.config.kernel_image_id, &vm.config.rootfs_image_id)
            .map_err(ServiceError::Asset)
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

    /// Starts the VM's VMM and boots its guest.
    pub async fn boot(
        self: &Arc<Self>,
        customer: &CustomerId,
        id: &VmId,
    ) -> Result<VmRecord, ServiceError> {
        let _guard = self.lock(id).await;
        let mut vm = self.load(customer, id).await?;
        next_state(vm.state(), Operation::Boot)?;
        let mut launch = self.launch(&vm)?;
        let t0 = std::time::Instant::now();
        if let Some(sb) = &self.sandboxes {
            sb.setup(&vm, &mut launch)
                .instrument(tracing::info_span!("sandbox.setup", vm_id = %id))
                .await
                .map_err(|source| ServiceError::Sandbox {
                    vm: id.clone(),
                    source,
                })?;
        }
        let sandbox_ms = t0.elapsed().as_secs_f64() * 1000.0;
        if self.sandboxes.is_some() {
            self.timings.observe(Step::Sandbox, sandbox_ms / 1000.0);
        }
        let console_offset = file_len(&launch.console_log());
        let t1 = std::time::Instant::now();
        let started = self.backend.boot(&launch).instrument(tracing::info_span!(
            "backend.boot",
            vm_id = %id,
            backend = self.backend_name()
        ));
        let process = match started.await {
            Ok(p) => p,
            Err(source) => {
                self.release_sandbox(&vm).await;
                return Err(ServiceError::Backend {
                    op: "boot",
                    vm: id.clone(),
                    source,
                });
            }
        };
        vm.life.apply(Change::Booted {
            pid: process.pid,
            start_ticks: process.start_ticks,
        })?;
        vm.backend = self.backend_name().to_string();
        self.save(&mut vm)?;
        self.track(&vm, process.pid, false);
        self.timings
            .observe(Step::VmmStart, t1.elapsed().as_secs_f64());
        tracing::info!(
            vm_id = %id,
            pid = process.pid,
            sandbox_ms,
            vmm_ms = t1.elapsed().as_secs_f64() * 1000.0,
            "vm booted"
        );
        self.watch_readiness(&vm, &launch, console_offset);
        Ok(vm)
    }

    /// Freezes the VM's vCPUs.
    pub async fn pause(&self, customer: &CustomerId, id: &VmId) -> Result<VmRecord, ServiceError> {
        self.vcpus(customer, id, Vcpus::Freeze).await
    }

    /// Unfreezes the VM's vCPUs.
    pub async fn resume(&self, customer: &CustomerId, id: &VmId) -> Result<VmRecord, ServiceError> {
        self.vcpus(customer, id, Vcpus::Thaw).await
    }

    async fn vcpus(
        &self,
        customer: &CustomerId,
        id: &VmId,
        op: Vcpus,
    ) -> Result<VmRecord, ServiceError> {
        let _guard = self.lock(id).await;
        let mut vm = self.load(customer, id).await?;
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
        let _guard = self.lock(id).await;
        let mut vm = self.load(customer, id).await?;
        next_state(vm.state(), Operation::Shutdown)?;
        self.backend
            .shutdown(id, mode)
            .await
            .map_err(|source| ServiceError::Backend {
                op: "shut down",
                vm: id.clone(),
                source,
            })?;
        self.release_sandbox(&vm).await;
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
        let _guard = self.lock(id).await;
        let mut vm = self.load(customer, id).await?;
        next_state(vm.state(), Operation::Reboot)?;
        let mut launch = self.launch(&vm)?;
        if let Some(sb) = &self.sandboxes {
            // The namespace and veth stay across a reboot; only a new jail is made.
            sb.attach(&vm, &mut launch)
                .map_err(|source| ServiceError::Sandbox {
                    vm: id.clone(),
                    source,
                })?;
        }
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
                    self.release_sandbox(&vm).await;
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

    /// Removes the VM and everything it owns.
    pub async fn delete(
        &self,
        customer: &CustomerId,
        id: &VmId,
        force: bool,
    ) -> Result<(), ServiceError> {
        let guard = self.lock(id).await;
        let vm = self.load(customer, id).await?;
        next_state(vm.state(), Operation::Delete { force })?;
        let dir = self.vm_dir(id);
        self.backend
            .delete(id, &dir)
            .await
            .map_err(|source| ServiceError::Backend {
                op: "delete",
                vm: id.clone(),
                source,
            })?;
        self.release_sandbox(&vm).await;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ServiceError::Io {
                    op: "remove VM directory",
                    path: dir,
                    source,
                })
            }
        }
        self.store.delete_vm(id)?;
        if let Some(meter) = &self.meter {
            meter.forget(id);
        }
        drop(guard);
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        tracing::info!(vm_id = %id, "vm deleted");
        Ok(())
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
        let path = self.vm_dir(id).join(crate::backend::files::CONSOLE_LOG);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ConsoleTail {
                    output: String::new(),
                    total_bytes: 0,
                    truncated: false,
                })
            }
            Err(source) => {
                return Err(ServiceError::Io {
                    op: "open",
                    path,
                    source,
                })
            }
        };
        let io = |op| {
            let path = path.clone();
            move |source| ServiceError::Io { op, path, source }
        };
        let total = file.metadata().map_err(io("stat"))?.len();
        let start = total.saturating_sub(u64::from(tail));
        file.seek(SeekFrom::Start(start)).map_err(io("seek"))?;
        let mut buf = Vec::with_capacity((total - start) as usize);
        file.take(u64::from(tail))
            .read_to_end(&mut buf)
            .map_err(io("read"))?;
        Ok(ConsoleTail {
            output: String::from_utf8_lossy(&buf).into_owned(),
            total_bytes: total,
            truncated: start > 0,
        })
    }

    /// Re-attaches to VMMs that outlived a previous metald; VMs whose VMM is gone become FAILED.
    pub async fn reconcile(&self) -> Result<(), ServiceError> {
        let mut keep = std::collections::HashSet::new();
        for mut vm in self.store.all_vms()? {
            if !vm.state().has_vmm() {
                continue;
            }
            let adopted = match (
                vm.life.vmm_pid(),
                vm.life.vmm_start_ticks(),
                self.launch(&vm),
            ) {
                (Some(pid), Some(start_ticks), Ok(launch)) if vm.backend == self.backend_name() => {
                    self.backend
                        .adopt(&launch, crate::backend::VmmProcess { pid, start_ticks })
                        .await
                        .unwrap_or(false)
                }
                _ => false,
            };
            if adopted {
                tracing::info!(vm_id = %vm.id, pid = ?vm.life.vmm_pid(), "re-attached to running VMM");
                if let Some(sb) = &self.sandboxes {
                    if let Err(e) = sb.adopt(&vm).await {
                        tracing::error!(vm_id = %vm.id, error = %Chain(&e), "re-attaching the VM's network failed");
                    }
                }
                keep.insert(vm.id.clone());
                if let Some(pid) = vm.life.vmm_pid() {
                    self.track(&vm, pid, true);
                }
                continue;
            }
            self.release_sandbox(&vm).await;
            tracing::warn!(vm_id = %vm.id, "VMM is gone after a metald restart; marking FAILED");
            vm.life.apply(Change::Failed(
                "VMM process was gone when metald restarted".into(),
            ))?;
            self.save(&mut vm)?;
        }
        // Whatever isolation is left of VMs that are not running (metald crashed mid-create
        // or mid-delete, or the records are gone) is removed.
        if let Some(sb) = &self.sandboxes {
            sb.sweep(&keep).await.map_err(ServiceError::Sweep)?;
        }
        Ok(())
    }

    /// The VM's VMM is gone: its last sample is taken, then its sandbox removed.
    async fn release_sandbox(&self, vm: &VmRecord) {
        self.untrack(vm);
        if let Some(sb) = &self.sandboxes {
            sb.release(vm).await;
        }
    }

    /// A VMM exited: if nobody asked for it, the VM is FAILED with the exit status.
    async fn handle_exit(&self, ev: ExitEvent) {
        if ev.requested {
            return;
        }
        let _guard = self.lock(&ev.vm_id).await;
        let Ok(Some(mut vm)) = self.store.get_vm_unscoped(&ev.vm_id) else {
            return;
        };
        if vm.life.vmm_pid() != Some(ev.pid) || transition(vm.state(), Operation::Fail).is_err() {
            return;
        }
        let console = file_tail(
            &self.vm_dir(&vm.id).join(crate::backend::files::CONSOLE_LOG),
            512,
        );
        tracing::warn!(vm_id = %vm.id, pid = ev.pid, status = %ev.status, "VMM exited on its own");
        self.release_sandbox(&vm).await;
        let failed = vm.life.apply(Change::Failed(format!(
            "VMM exited on its own ({}); console ends: {console}",
            ev.status
        )));
        if let Err(e) = failed
            .map_err(ServiceError::from)
            .and_then(|()| self.save(&mut vm))
        {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "recording a VMM exit failed");
        }
    }

    /// Watches the console for the rootfs's readiness line; a guest silent past the boot
    /// timeout is killed and reported FAILED with its console tail.
    fn watch_readiness(self: &Arc<Self>, vm: &VmRecord, launch: &VmLaunch, offset: u64) {
        let Ok(files) = self.boot_files(vm) else {
            return;
        };
        let Some(marker) = files.ready_marker.filter(|m| !m.is_empty()) else {
            return;
        };
        let svc = Arc::downgrade(self);
        let id = vm.id.clone();
        let pid = vm.life.vmm_pid();
        let console = launch.console_log();
        let timeout = self.cfg.boot_timeout;
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let wait = wait_for_line(&console, offset, marker.as_bytes());
            tokio::pin!(wait);
            loop {
                let found = tokio::time::timeout(timeout, &mut wait).await.is_ok();
                let Some(svc) = svc.upgrade() else { return };
                let _guard = svc.lock(&id).await;
                let Ok(Some(mut vm)) = svc.store.get_vm_unscoped(&id) else {
                    return;
                };
                if vm.life.vmm_pid() != pid || !vm.state().has_vmm() {
                    return;
                }
                if !found && vm.state() == VmState::Paused {
                    // A paused guest cannot make progress: give it another period.
                    continue;
                }
                if found {
                    vm.life.mark_guest_ready();
                    let secs = started.elapsed().as_secs_f64();
                    svc.timings.observe(Step::GuestReady, secs);
                    tracing::info!(vm_id = %id, ready_ms = secs * 1000.0, "guest is ready");
                } else {
                    let tail = file_tail(&console, 1024);
                    tracing::warn!(vm_id = %id, "guest printed no readiness line in time");
                    if let Err(e) = svc.backend.shutdown(&id, StopMode::Force).await {
                        tracing::error!(vm_id = %id, error = %Chain(&e), "killing a guest that never became ready failed");
                    }
                    svc.release_sandbox(&vm).await;
                    let failed = vm.life.apply(Change::Failed(format!(
                        "guest printed no '{marker}' line within {timeout:?}; console ends: {tail}"
                    )));
                    if let Err(e) = failed {
                        tracing::error!(vm_id = %id, error = %Chain(&e), "recording a readiness timeout failed");
                        return;
                    }
                }
                if let Err(e) = svc.save(&mut vm) {
                    tracing::error!(vm_id = %id, error = %Chain(&e), "recording readiness failed");
                }
                return;
            }
        });
    }
}

/// VM ids (of any customer) whose configuration names the asset.
pub fn vms_using_asset(store: &Store, image_id: &str) -> Result<Vec<String>, StoreError> {
    Ok(store
        .all_vms()?
        .into_iter()
        .filter(|vm| {
            vm.config.kernel_image_id == image_id
                || vm.config.rootfs_image_id == image_id
                || vm.config.drives.iter().any(|d| d.image_id == image_id)
        })
        .map(|vm| vm.id.to_string())
        .collect())
}

/// Makes a VM's private copy of a disk image. A copy without reflink support can take seconds
/// for a large image, so it runs on the blocking pool, never on an async worker.
async fn clone_disk(src: PathBuf, dst: PathBuf) -> Result<(), ServiceError> {
    let copy = tokio::task::spawn_blocking(move || {
        let method = crate::assets::clone_file(&src, &dst);
        tracing::debug!(src = %src.display(), dst = %dst.display(), ?method, "disk cloned");
        method
    });
    match copy.await {
        Ok(result) => result.map(drop).map_err(ServiceError::Asset),
        Err(join) => Err(ServiceError::Io {
            op: "copy disk (task failed)",
            path: PathBuf::new(),
            source: std::io::Error::other(join),
        }),
    }
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

fn drive_file(d: &DriveConfig) -> String {
    format!("drive-{}.img", d.drive_id)
}

fn asset_field_error(field: &str, e: AssetError) -> ServiceError {
    match e {
        AssetError::Unknown(_) | AssetError::WrongKind { .. } => invalid(field, e.to_string()),
        other => ServiceError::Asset(other),
    }
}

fn validate_metadata(m: &BTreeMap<String, String>) -> Result<(), ServiceError> {
    if m.len() > MAX_METADATA {
        return Err(invalid(
            "config.metadata",
            format!("at most {MAX_METADATA} entries, got {}", m.len()),
        ));
    }
    for (k, v) in m {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
        if !key_ok {
            return Err(invalid(
                "config.metadata",
                format!(
                    "key '{}' must be 1-63 of A-Z a-z 0-9 _ - . /",
                    crate::domain::truncate_for_message(k)
                ),
            ));
        }
        if v.len() > 256 {
            return Err(invalid(
                "config.metadata",
                format!("value of '{k}' is longer than 256 bytes"),
            ));
        }
    }
    Ok(())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Polls `path` from `offset` until `marker` appears (checks every 50 ms; reads only new bytes).
async fn wait_for_line(path: &Path, mut offset: u64, marker: &[u8]) {
    let mut window: Vec<u8> = Vec::new();
    loop {
        if let Ok(mut f) = std::fs::File::open(path) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let mut new = Vec::new();
                if let Ok(n) = f.read_to_end(&mut new) {
                    offset += n as u64;
                    window.extend_from_slice(&new);
                    if window.windows(marker.len()).any(|w| w == marker) {
                        return;
                    }
                    // Keep just enough to catch a marker split across two reads.
                    let keep = marker.len().saturating_sub(1);
                    if window.len() > keep {
                        window.drain(..window.len() - keep);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assets::ImportRequest;
    use crate::backend::{BackendKind, StopOutcome, VmmInfo, VmmProcess};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// A backend double that records calls and hands out fake pids.
    #[derive(Default)]
    struct FakeBackend {
        calls: Mutex<Vec<String>>,
        next_pid: AtomicU32,
        fail_boot: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Backend for FakeBackend {
        fn kind(&self) -> BackendKind {
            BackendKind::Qemu
        }
        fn max_vcpus(&self) -> u32 {
            4
        }
        async fn create(&self, _: &VmLaunch) -> Result<(), BackendError> {
            self.record("create");
            Ok(())
        }
        async fn boot(&self, l: &VmLaunch) -> Result<VmmProcess, BackendError> {
            self.record("boot");
            if self.fail_boot.load(Ordering::SeqCst) {
                return Err(BackendError::Unsupported("boot refused".into()));
            }
            assert!(l.disks[0].path.exists(), "rootfs copy exists at boot");
            Ok(VmmProcess {
                pid: 1000 + self.next_pid.fetch_add(1, Ordering::SeqCst),
                start_ticks: 7,
            })
        }
        async fn pause(&self, _: &VmId) -> Result<(), BackendError> {
            self.record("pause");
            Ok(())
        }
        async fn resume(&self, _: &VmId) -> Result<(), BackendError> {
            self.record("resume");
            Ok(())
        }
        async fn shutdown(&self, _: &VmId, mode: StopMode) -> Result<StopOutcome, BackendError> {
            self.record(&format!("shutdown {mode:?}"));
            Ok(StopOutcome::Clean)
        }
        async fn delete(&self, _: &VmId, _: &Path) -> Result<(), BackendError> {
            self.record("delete");
            Ok(())
        }
        async fn info(&self, _: &VmId) -> Option<VmmInfo> {
            None
        }
        async fn adopt(&self, _: &VmLaunch, _: VmmProcess) -> Result<bool, BackendError> {
            Ok(false)
        }
    }

    impl FakeBackend {
        fn record(&self, call: &str) {
            self.calls.lock().unwrap().push(call.to_string());
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        vms_dir: PathBuf,
        svc: Arc<VmService>,
        backend: Arc<FakeBackend>,
        exits: mpsc::UnboundedSender<ExitEvent>,
        who: CustomerId,
    }

    fn fixture() -> Fixture {
        fixture_with_timeout(Duration::from_secs(5))
    }

    fn fixture_with_timeout(boot_timeout: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db")).unwrap());
        let assets =
            Arc::new(AssetStore::open(dir.path().join("assets"), Arc::clone(&store)).unwrap());
        let file = dir.path().join("img");
        std::fs::write(&file, b"image").unwrap();
        for (id, kind, marker) in [
            ("k", AssetKind::Kernel, None),
            ("r", AssetKind::Rootfs, None),
            ("ready", AssetKind::Rootfs, Some("READY".to_string())),
        ] {
            assets
                .import(&ImportRequest {
                    id: id.into(),
                    kind,
                    source: file.clone(),
                    initrd_id: None,
                    ready_marker: marker,
                })
                .unwrap();
        }
        let vms_dir = dir.path().join("vms");
        std::fs::create_dir(&vms_dir).unwrap();
        let backend = Arc::new(FakeBackend::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let cfg = ServiceConfig {
            vms_dir: vms_dir.clone(),
            boot_timeout,
        };
        let svc = VmService::start(store, assets, backend.clone(), None, None, cfg, rx);
        Fixture {
            _dir: dir,
            vms_dir,
            svc,
            backend,
            exits: tx,
            who: "acme".parse().unwrap(),
        }
    }

    fn config() -> VmConfig {
        VmConfig {
            vcpu_count: 2,
            memory_bytes: 128 * MIB,
            kernel_image_id: "k".into(),
            rootfs_image_id: "r".into(),
            drives: vec![],
            kernel_args: String::new(),
            metadata: BTreeMap::new(),
            network: Default::default(),
        }
    }

    fn dirs(f: &Fixture) -> usize {
        std::fs::read_dir(&f.vms_dir).unwrap().count()
    }

    #[tokio::test]
    async fn lifecycle_drives_the_backend_in_order() {
        let f = fixture();
        let vm = f.svc.create(&f.who, config()).await.unwrap();
        assert_eq!(vm.state(), VmState::Created);
        assert_eq!(
            std::fs::read(f.vms_dir.join(vm.id.as_str()).join(ROOTFS_FILE)).unwrap(),
            b"image"
        );
        let id = vm.id;
        assert_eq!(
            f.svc.boot(&f.who, &id).await.unwrap().life.vmm_pid(),
            Some(1000)
        );
        assert_eq!(
            f.svc.pause(&f.who, &id).await.unwrap().state(),
            VmState::Paused
        );
        assert_eq!(
            f.svc.resume(&f.who, &id).await.unwrap().state(),
            VmState::Running
        );
        let rebooted = f.svc.reboot(&f.who, &id, true).await.unwrap();
        assert_eq!(rebooted.life.vmm_pid(), Some(1001));
        let req = ShutdownRequest {
            force: false,
            timeout_seconds: 3,
        };
        let down = f.svc.shutdown(&f.who, &id, req).await.unwrap();
        assert_eq!(
            (down.state(), down.life.vmm_pid()),
            (VmState::Shutdown, None)
        );
        f.svc.delete(&f.who, &id, false).await.unwrap();
        assert_eq!(dirs(&f), 0);
        assert_eq!(
            f.backend.calls(),
            [
                "create",
                "boot",
                "pause",
                "resume",
                "shutdown Force",
                "boot",
                "shutdown Graceful(3s)",
                "delete"
            ]
        );
    }

    #[tokio::test]
    async fn illegal_transitions_and_backend_failures_change_nothing() {
        let f = fixture();
        let id = f.svc.create(&f.who, config()).await.unwrap().id;
        let before = f.svc.get(&f.who, &id).await.unwrap();
        let err = f.svc.pause(&f.who, &id).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot pause a VM in state CREATED; boot it first"
        );
        f.backend.fail_boot.store(true, Ordering::SeqCst);
        assert!(matches!(
            f.svc.boot(&f.who, &id).await,
            Err(ServiceError::Backend { op: "boot", .. })
        ));
        assert_eq!(f.svc.get(&f.who, &id).await.unwrap(), before);
        assert_eq!(
            f.backend.calls(),
            ["create", "boot"],
            "pause never reached the backend"
        );
        let other: CustomerId = "other".parse().unwrap();
        assert!(matches!(
            f.svc.boot(&other, &id).await,
            Err(ServiceError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn invalid_configs_name_the_field_and_create_nothing() {
        let f = fixture();
        type Mutation = Box<dyn Fn(&mut VmConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.vcpu_count = 0), "config.cpu.vcpu_count"),
            (Box::new(|c| c.vcpu_count = 5), "config.cpu.vcpu_count"),
            (
                Box::new(|c| c.memory_bytes = 64 * MIB),
                "config.memory.size_bytes",
            ),
            (
                Box::new(|c| c.memory_bytes = 128 * MIB + 1),
                "config.memory.size_bytes",
            ),
            (
                Box::new(|c| c.kernel_image_id = "r".into()),
                "config.kernel.image_id",
            ),
            (
                Box::new(|c| c.rootfs_image_id = "nope".into()),
                "config.rootfs.image_id",
            ),
            (
                Box::new(|c| c.kernel_args = "x".repeat(MAX_KERNEL_ARGS + 1)),
                "config.kernel_args",
            ),
            (
                Box::new(|c| {
                    c.drives = vec![
                        DriveConfig {
                            drive_id: "d".into(),
                            image_id: "r".into(),
                            read_only: true,
                        },
                        DriveConfig {
                            drive_id: "d".into(),
                            image_id: "r".into(),
                            read_only: false,
                        },
                    ]
                }),
                "config.drives[1].drive_id",
            ),
            (
                Box::new(|c| {
                    c.drives = vec![DriveConfig {
                        drive_id: "d".into(),
                        image_id: "k".into(),
                        read_only: true,
                    }]
                }),
                "config.drives[0].image_id",
            ),
            (
                Box::new(|c| {
                    c.metadata.insert("bad key".into(), "v".into());
                }),
                "config.metadata",
            ),
        ];
        for (mutate, field) in cases {
            let mut c = config();
            mutate(&mut c);
            match f.svc.create(&f.who, c).await {
                Err(ServiceError::InvalidArgument { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert_eq!(dirs(&f), 0);
        assert!(f
            .svc
            .list(&f.who, None, 0, "")
            .await
            .unwrap()
            .vms
            .is_empty());
    }

    /// The adopt-failure path: VMMs that did not outlive metald leave their VMs FAILED with
    /// no process, no readiness and the reason; VMs without a VMM are left as they were.
    #[tokio::test]
    async fn vmms_gone_after_a_restart_fail_their_vms_with_the_vmm_fields_cleared() {
        let f = fixture();
        let running = f.svc.create(&f.who, config()).await.unwrap().id;
        let paused = f.svc.create(&f.who, config()).await.unwrap().id;
        let created = f.svc.create(&f.who, config()).await.unwrap().id;
        f.svc.boot(&f.who, &running).await.unwrap();
        f.svc.boot(&f.who, &paused).await.unwrap();
        f.svc.pause(&f.who, &paused).await.unwrap();
        f.svc.reconcile().await.unwrap();
        for id in [&running, &paused] {
            let vm = f.svc.get(&f.who, id).await.unwrap();
            assert_eq!(
                vm.life,
                VmLife::restore(
                    VmState::Failed,
                    None,
                    None,
                    Some("VMM process was gone when metald restarted".into()),
                    false
                )
            );
        }
        let vm = f.svc.get(&f.who, &created).await.unwrap();
        assert_eq!(vm.life, VmLife::created());
    }

    #[tokio::test]
    async fn only_an_unrequested_exit_of_the_current_vmm_fails_the_vm() {
        let f = fixture();
        let id = f.svc.create(&f.who, config()).await.unwrap().id;
        let pid = f
            .svc
            .boot(&f.who, &id)
            .await
            .unwrap()
            .life
            .vmm_pid()
            .unwrap();
        let send = |pid, requested| {
            f.exits
                .send(ExitEvent {
                    vm_id: id.clone(),
                    pid,
                    status: "exit status 0".into(),
                    requested,
                })
                .unwrap()
        };
        send(pid, true);
        send(pid + 99, false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            f.svc.get(&f.who, &id).await.unwrap().state(),
            VmState::Running
        );
        send(pid, false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let vm = f.svc.get(&f.who, &id).await.unwrap();
        assert_eq!(vm.state(), VmState::Failed);
        assert!(vm
            .life
            .failure()
            .unwrap()
            .starts_with("VMM exited on its own (exit status 0)"));
        // A FAILED VM boots again.
        assert_eq!(
            f.svc.boot(&f.who, &id).await.unwrap().state(),
            VmState::Running
        );
    }

    #[tokio::test]
    async fn listing_pages_through_everything_once() {
        let f = fixture();
        let mut ids = vec![];
        for _ in 0..5 {
            ids.push(f.svc.create(&f.who, config()).await.unwrap().id);
        }
        let mut seen = vec![];
        let mut token = String::new();
        loop {
            let page = f.svc.list(&f.who, None, 2, &token).await.unwrap();
            seen.extend(page.vms.into_iter().map(|v| v.id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, ids);
        assert!(matches!(
            f.svc.list(&f.who, None, MAX_PAGE + 1, "").await,
            Err(ServiceError::InvalidArgument { .. })
        ));
        assert!(matches!(
            f.svc.list(&f.who, None, 0, "after:x").await,
            Err(ServiceError::InvalidArgument { .. })
        ));
    }

    #[tokio::test]
    async fn readiness_is_seen_on_the_console_and_silence_fails_the_vm_but_not_while_paused() {
        let f = fixture_with_timeout(Duration::from_millis(300));
        let mut c = config();
        c.rootfs_image_id = "ready".into();
        let quiet = f.svc.create(&f.who, c.clone()).await.unwrap().id;
        let chatty = f.svc.create(&f.who, c).await.unwrap().id;
        let console = |id: &VmId| {
            f.vms_dir
                .join(id.as_str())
                .join(crate::backend::files::CONSOLE_LOG)
        };
        std::fs::write(console(&chatty), "old boot: READY\n").unwrap();
        f.svc.boot(&f.who, &chatty).await.unwrap();
        f.svc.boot(&f.who, &quiet).await.unwrap();
        std::fs::write(console(&quiet), "booting...\n").unwrap();
        f.svc.pause(&f.who, &quiet).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Only output after this boot counts; the marker is split across two writes.
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(console(&chatty))
            .unwrap();
        std::io::Write::write_all(&mut out, b"kernel... REA").unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(!f.svc.get(&f.who, &chatty).await.unwrap().life.guest_ready());
        std::io::Write::write_all(&mut out, b"DY\n").unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(f.svc.get(&f.who, &chatty).await.unwrap().life.guest_ready());
        let paused = f.svc.get(&f.who, &quiet).await.unwrap();
        assert_eq!(paused.state(), VmState::Paused, "pause time does not count");
        f.svc.resume(&f.who, &quiet).await.unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        let failed = f.svc.get(&f.who, &quiet).await.unwrap();
        assert_eq!(failed.state(), VmState::Failed);
        assert_eq!(
            failed.life.failure(),
            Some("guest printed no 'READY' line within 300ms; console ends: booting...")
        );
    }
}
