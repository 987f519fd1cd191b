//! Unit tests of the lifecycle service against a fake backend.

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
    let assets = Arc::new(AssetStore::open(dir.path().join("assets"), Arc::clone(&store)).unwrap());
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
