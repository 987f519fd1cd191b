//! Test doubles shared by the daemon's unit tests: a backend and an isolation that record
//! their calls (in the style of youki's recording fakes), and a lifecycle service over a real
//! SQLite file and asset store in a temporary directory, with a real meter.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::assets::{AssetStore, ImportRequest};
use crate::backend::{
    Backend, BackendError, BackendKind, ExitEvent, StopMode, StopOutcome, VmLaunch, VmmInfo,
    VmmProcess,
};
use crate::domain::{CustomerId, VmConfig, VmId, VmRecord, MIB};
use crate::metering::sources::Sources;
use crate::metering::{Meter, MeterConfig};
use crate::network::ipam::AllocationPlan;
use crate::network::VmNetworkPlan;
use crate::probe::{DiskSpace, HostProbe, ProbeError};
use crate::quota::{QuotaBook, QuotaTable, Quotas};
use crate::sandbox::{Isolation, SandboxError};
use crate::service::{HostSettings, Ratio, ServiceConfig, VmService};
use crate::store::{AssetKind, RunLimits, Store, StoredLimits};

/// A fleet of one host, `local`, on the test's SQLite store.
pub fn fleet_of_one() -> crate::config::FleetSettings {
    crate::config::FleetSettings {
        host_id: crate::fleet::HostId::local(),
        advertise_url: None,
        labels: Default::default(),
        lease: Duration::from_secs(10),
        database_url: None,
        database_ca_file: None,
        prefixes: None,
        asset_source: None,
    }
}

/// The fixture's console cap.
pub(crate) const CONSOLE_MAX_BYTES: u64 = 64 * 1024;

/// The fixture's stored-VM quota per customer.
pub(crate) const QUOTA_VMS: u64 = 10;
/// Snapshots each test customer may keep.
pub(crate) const QUOTA_SNAPSHOTS: u64 = 2;
/// The fixture's running quotas per customer: the memory of four default VMs.
pub(crate) const RUN_LIMITS: RunLimits = RunLimits {
    vms: None,
    vcpus: None,
    memory_bytes: Some(4 * 128 * MIB),
};

/// The fixture's host settings: 1 GiB of memory and of disk left to the host, no memory
/// overcommit, vCPUs 4 to 1.
pub(crate) const HOST: HostSettings = HostSettings {
    memory_reserve_bytes: 1024 * MIB,
    memory_overcommit: Ratio::ONE,
    cpu_overcommit: Ratio::from_hundredths(400),
    disk_reserve_bytes: 1024 * MIB,
};

/// A host of made-up size (16 GiB, 8 CPUs, a 100 GiB disk half free); tests shrink it.
pub(crate) struct FakeProbe {
    pub(crate) memory_bytes: AtomicU64,
    pub(crate) cpus: AtomicU64,
    pub(crate) disk_available_bytes: AtomicU64,
}

impl Default for FakeProbe {
    fn default() -> Self {
        Self {
            memory_bytes: AtomicU64::new(16 << 30),
            cpus: AtomicU64::new(8),
            disk_available_bytes: AtomicU64::new(50 << 30),
        }
    }
}

impl HostProbe for FakeProbe {
    fn memory_bytes(&self) -> Result<u64, ProbeError> {
        Ok(self.memory_bytes.load(Ordering::SeqCst))
    }
    fn cpus(&self) -> Result<u64, ProbeError> {
        Ok(self.cpus.load(Ordering::SeqCst))
    }
    fn disk(&self, _: &Path) -> Result<DiskSpace, ProbeError> {
        Ok(DiskSpace {
            total_bytes: 100 << 30,
            available_bytes: self.disk_available_bytes.load(Ordering::SeqCst),
        })
    }
}

/// A backend double that records calls and hands out fake pids.
#[derive(Default)]
pub(crate) struct FakeBackend {
    pub(crate) calls: Mutex<Vec<String>>,
    pub(crate) next_pid: AtomicU32,
    pub(crate) fail_boot: AtomicBool,
    /// Pids whose VMM "outlived" a metald restart: adopt answers true for them.
    pub(crate) survivors: Mutex<HashSet<u32>>,
    /// While set, boot waits for a permit after recording "boot".
    pub(crate) hold_boot: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// Times the VMM's own metrics were asked for (not in `calls`: they come by the clock).
    pub(crate) metrics_asked: AtomicU32,
}

/// An isolation double in the style of youki's recording fakes: every call is recorded as
/// "step vm-id", and setup can be made to fail.
#[derive(Default)]
pub(crate) struct FakeIsolation {
    pub(crate) calls: Mutex<Vec<String>>,
    pub(crate) fail_setup: AtomicBool,
    /// While set, release fails (processes left in the VM's cgroup).
    pub(crate) fail_release: AtomicBool,
    /// While set, opening the firewall fails.
    pub(crate) fail_open: AtomicBool,
    /// The starts it was told of (see [`Isolation::starting`]).
    pub(crate) starts: Arc<crate::starts::Starts>,
    /// While set, VMs get addresses and each start a network plan (whose host interface does
    /// not exist on the host).
    pub(crate) with_network: AtomicBool,
}

impl FakeIsolation {
    fn record(&self, step: &str, vm: &VmId) {
        self.calls.lock().unwrap().push(format!("{step} {vm}"));
    }
    pub(crate) fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Isolation for FakeIsolation {
    fn allocation(&self) -> Option<AllocationPlan> {
        self.with_network
            .load(Ordering::SeqCst)
            .then(|| AllocationPlan {
                slots: 16,
                ipv6: "fd00:6d74::/64".parse().unwrap(),
                ipv4: None,
            })
    }
    async fn setup(&self, vm: &VmRecord, launch: &mut VmLaunch) -> Result<(), SandboxError> {
        self.record("setup", &vm.id);
        if self.fail_setup.load(Ordering::SeqCst) {
            return Err(SandboxError::NotAllocated(vm.id.clone()));
        }
        if let Some(net) = vm
            .net
            .as_ref()
            .filter(|_| self.with_network.load(Ordering::SeqCst))
        {
            launch.net = Some(crate::network::VmNetworkPlan {
                netns: "/nonexistent/netns".into(),
                tap: "tap0".into(),
                bridge: "br0".into(),
                peer_if: "veth0".into(),
                host_if: "mvnotthere0".into(),
                mac: net.mac.clone(),
                ipv6: net.ipv6,
                ipv4: net.ipv4,
                gateway6: "fd00:6d74::1".parse().unwrap(),
                gateway4: None,
                rx_rate_limit: None,
                tx_rate_limit: None,
            });
        }
        Ok(())
    }
    fn starting(&self) -> Option<crate::starts::Starting> {
        Some(self.starts.begin())
    }
    async fn open(&self, vm: &VmRecord) -> Result<(), SandboxError> {
        self.record("open", &vm.id);
        if self.fail_open.load(Ordering::SeqCst) {
            return Err(SandboxError::NotAllocated(vm.id.clone()));
        }
        Ok(())
    }
    fn attach(&self, vm: &VmRecord, _: &mut VmLaunch) -> Result<(), SandboxError> {
        self.record("attach", &vm.id);
        Ok(())
    }
    async fn release(&self, vm: &VmRecord) -> Result<(), SandboxError> {
        self.record("release", &vm.id);
        if self.fail_release.load(Ordering::SeqCst) {
            return Err(SandboxError::NotAllocated(vm.id.clone()));
        }
        Ok(())
    }
    async fn adopt(&self, vm: &VmRecord) -> Result<(), SandboxError> {
        self.record("adopt", &vm.id);
        Ok(())
    }
    async fn sweep(&self, keep: &HashSet<VmId>) -> Result<(), SandboxError> {
        let mut kept: Vec<&str> = keep.iter().map(|k| k.as_str()).collect();
        kept.sort();
        self.calls
            .lock()
            .unwrap()
            .push(format!("sweep keeping [{}]", kept.join(",")));
        Ok(())
    }
    fn meter_sources(&self, _: &VmRecord, pid: u32) -> (Sources, Option<String>) {
        (Sources::for_process(Path::new("/proc"), pid), None)
    }
    fn network_of(&self, _: &VmRecord) -> Option<VmNetworkPlan> {
        None
    }
    fn control_dir(&self, _: &VmId) -> Option<PathBuf> {
        None
    }
}

#[async_trait::async_trait]
impl Backend for FakeBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }
    fn max_vcpus(&self) -> u32 {
        4
    }
    async fn vmm_metrics(
        &self,
        _: &VmId,
        ask: bool,
    ) -> Result<Option<metald_vmm::VmmMetrics>, BackendError> {
        if ask {
            self.metrics_asked.fetch_add(1, Ordering::Relaxed);
        }
        Ok(None)
    }
    async fn create(&self, _: &VmLaunch) -> Result<(), BackendError> {
        self.record("create");
        Ok(())
    }
    async fn boot(&self, l: &VmLaunch) -> Result<VmmProcess, BackendError> {
        self.record("boot");
        let gate = self.hold_boot.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
            self.record("boot done");
        }
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
    async fn suspend(&self, _: &VmId, dir: &Path) -> Result<(), BackendError> {
        self.record("suspend");
        // What a VMM saves: the state the wake needs.
        std::fs::write(dir.join(crate::backend::files::SUSPEND_STATE), b"state").unwrap();
        Ok(())
    }
    async fn snapshot(&self, _: &VmId, _: &Path, out: &Path, _: bool) -> Result<(), BackendError> {
        self.record("snapshot");
        std::fs::write(out.join(crate::backend::files::SNAPSHOT_STATE), b"state").unwrap();
        Ok(())
    }
    async fn wake(&self, l: &VmLaunch) -> Result<VmmProcess, BackendError> {
        self.record("wake");
        assert!(
            l.dir.join(crate::backend::files::SUSPEND_STATE).exists(),
            "the saved state exists at wake"
        );
        Ok(VmmProcess {
            pid: 1000 + self.next_pid.fetch_add(1, Ordering::SeqCst),
            start_ticks: 7,
        })
    }
    async fn delete(&self, _: &VmId, _: &Path) -> Result<(), BackendError> {
        self.record("delete");
        Ok(())
    }
    async fn info(&self, _: &VmId) -> Option<VmmInfo> {
        None
    }
    async fn adopt(&self, _: &VmLaunch, p: VmmProcess) -> Result<bool, BackendError> {
        self.record(&format!("adopt {}", p.pid));
        Ok(self.survivors.lock().unwrap().contains(&p.pid))
    }
}

impl FakeBackend {
    pub(crate) fn record(&self, call: &str) {
        self.calls.lock().unwrap().push(call.to_string());
    }
    pub(crate) fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

pub(crate) struct Fixture {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) vms_dir: PathBuf,
    pub(crate) svc: Arc<VmService>,
    pub(crate) backend: Arc<FakeBackend>,
    pub(crate) isolation: Arc<FakeIsolation>,
    pub(crate) exits: mpsc::UnboundedSender<ExitEvent>,
    pub(crate) who: CustomerId,
    pub(crate) probe: Arc<FakeProbe>,
    pub(crate) quotas: Arc<QuotaTable>,
    /// The quota file the service's quotas reload from (absent until a test writes it).
    pub(crate) quota_file: PathBuf,
}

pub(crate) fn fixture() -> Fixture {
    fixture_with_timeout(Duration::from_secs(5))
}

pub(crate) fn fixture_with_timeout(boot_timeout: Duration) -> Fixture {
    fixture_with(boot_timeout, 0)
}

/// A fixture whose service keeps `warm_disks` spare disk copies per image.
pub(crate) fn fixture_with_spares(warm_disks: usize) -> Fixture {
    fixture_with(Duration::from_secs(5), warm_disks)
}

/// A fixture whose VMs get addresses and network plans, and whose clones get address maps
/// (which fail: the plans' host interface is not on the host).
pub(crate) fn fixture_with_clone_maps() -> Fixture {
    let isolation = FakeIsolation::default();
    isolation.with_network.store(true, Ordering::SeqCst);
    fixture_full(
        Duration::from_secs(5),
        0,
        isolation,
        Some(crate::service::CloneNet {
            jail_exe: "/nonexistent/metald-jail".into(),
            nft_bin: "/nonexistent/nft".into(),
        }),
    )
}

fn fixture_with(boot_timeout: Duration, warm_disks: usize) -> Fixture {
    fixture_full(boot_timeout, warm_disks, FakeIsolation::default(), None)
}

fn fixture_full(
    boot_timeout: Duration,
    warm_disks: usize,
    isolation: FakeIsolation,
    clone_net: Option<crate::service::CloneNet>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("db")).unwrap());
    let assets = Arc::new(AssetStore::open(dir.path().join("assets"), store.clone()).unwrap());
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
                owner: None,
            })
            .unwrap();
    }
    let vms_dir = dir.path().join("vms");
    std::fs::create_dir(&vms_dir).unwrap();
    let snapshots_dir = dir.path().join("snapshots");
    std::fs::create_dir(&snapshots_dir).unwrap();
    let backend = Arc::new(FakeBackend::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let quota_file = dir.path().join("quotas.toml");
    let quotas = Arc::new(QuotaTable::new(
        QuotaBook::new(Quotas {
            stored: StoredLimits {
                vms: Some(QUOTA_VMS),
                disk_bytes: None,
                snapshots: Some(QUOTA_SNAPSHOTS),
            },
            run: RUN_LIMITS,
        }),
        Some(quota_file.clone()),
    ));
    let probe = Arc::new(FakeProbe::default());
    let cfg = ServiceConfig {
        vms_dir: vms_dir.clone(),
        boot_timeout,
        quotas: Arc::clone(&quotas),
        host: HOST,
        probe: probe.clone(),
        console_max_bytes: CONSOLE_MAX_BYTES,
        snapshots_dir: snapshots_dir.clone(),
        clone_net,
        membership: crate::membership::Membership::join(store.clone(), &fleet_of_one())
            .unwrap()
            .0,
        warm_disks,
        warm_disk_max_bytes: 1 << 20,
    };
    let isolation = Arc::new(isolation);
    let meter = Meter::start(MeterConfig {
        interval: Duration::from_millis(100),
        retained_samples: 100,
        // Short, so a test sees the VMM's metrics polled (the fake answers at once).
        vmm_metrics_interval: Duration::from_millis(50),
    });
    let svc = VmService::start(
        store,
        assets,
        backend.clone(),
        isolation.clone(),
        meter,
        cfg,
        rx,
    );
    Fixture {
        _dir: dir,
        vms_dir,
        svc,
        backend,
        isolation,
        exits: tx,
        who: "acme".parse().unwrap(),
        probe,
        quotas,
        quota_file,
    }
}

pub(crate) fn config() -> VmConfig {
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

// One JWT issuer for the unit tests and the e2e tests (which include the same file).
#[path = "../tests/support/issuer.rs"]
mod issuer;
pub(crate) use issuer::{Issuer, AUDIENCE, ISSUER};
