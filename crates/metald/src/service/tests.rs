//! Unit tests of the lifecycle service against a fake backend.

use super::*;
use crate::testing::{config, fixture, fixture_with_spares, fixture_with_timeout, Fixture, HOST};
use std::sync::atomic::Ordering;

fn dirs(f: &Fixture) -> usize {
    std::fs::read_dir(&f.vms_dir).unwrap().count()
}

/// The VMM's own metrics are polled once per interval per running VM, however often it was
/// rebooted (each reboot's run has its poll, the previous run's ends), and not once it stops.
#[tokio::test]
async fn a_reboot_does_not_add_a_poll_of_the_vmms_metrics() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.boot(&f.who, &id).await.unwrap();
    for _ in 0..4 {
        f.svc.reboot(&f.who, &id, true).await.unwrap();
    }
    let polls = || f.backend.metrics_asked.load(Ordering::Relaxed);
    let (before, t0) = (polls(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (got, elapsed) = (polls() - before, t0.elapsed());
    // One poll every 50 ms (one more for the tick in flight); five runs' polls would be 5x.
    let one_poll = elapsed.as_millis() as u32 / 50 + 1;
    assert!(
        got >= 1 && got <= 2 * one_poll,
        "{got} polls in {elapsed:?}"
    );
    let req = ShutdownRequest {
        force: true,
        timeout_seconds: 0,
    };
    f.svc.shutdown(&f.who, &id, req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let stopped = polls();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(polls(), stopped, "polled after the VM stopped");
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
    f.svc.settle().await;
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
            Box::new(|c| c.kernel_args = "quiet metald.ip6=fd00::66".into()),
            "config.kernel_args",
        ),
        (
            Box::new(|c| c.kernel_args = "quiet \"metald.gw4=10.0.0.1\"".into()),
            "config.kernel_args",
        ),
        (
            Box::new(|c| c.kernel_args = "quiet note=\"open".into()),
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
        // The fixture's host admits 15 GiB; QEMU needs 384 MiB of it.
        (
            Box::new(|c| c.memory_bytes = (15 << 30) - 383 * MIB),
            "config.memory.size_bytes",
        ),
        (
            Box::new(|c| c.memory_bytes = u64::MAX / MIB * MIB),
            "config.memory.size_bytes",
        ),
        (
            Box::new(|c| {
                c.network.rx_rate_limit = Some(crate::domain::RateLimit {
                    bandwidth_bytes_per_sec: 0,
                    burst_bytes: 0,
                })
            }),
            "config.network.rx_rate_limit.bandwidth_bytes_per_sec",
        ),
        (
            Box::new(|c| {
                c.network.tx_rate_limit = Some(crate::domain::RateLimit {
                    bandwidth_bytes_per_sec: u64::MAX,
                    burst_bytes: 0,
                })
            }),
            "config.network.tx_rate_limit.bandwidth_bytes_per_sec",
        ),
        (
            Box::new(|c| {
                c.network.tx_rate_limit = Some(crate::domain::RateLimit {
                    bandwidth_bytes_per_sec: 1,
                    burst_bytes: MAX_RATE_BYTES + 1,
                })
            }),
            "config.network.tx_rate_limit.burst_bytes",
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

// On tokio's paused clock a sleep ends only once every task is idle: the exit events sent
// before it have been handled, however slow the machine.
#[tokio::test(start_paused = true)]
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
    // Each event with a status of its own, so a failure names the event that caused it.
    let send = |pid, requested, status: &str| {
        f.exits
            .send(ExitEvent {
                vm_id: id.clone(),
                pid,
                status: status.into(),
                requested,
            })
            .unwrap()
    };
    send(pid, true, "exit status 1");
    send(pid + 99, false, "exit status 2");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        f.svc.get(&f.who, &id).await.unwrap().state(),
        VmState::Running
    );
    // What the VMM wrote as it died is in the failure.
    std::fs::write(
        f.vms_dir.join(id.as_str()).join("vmm.log"),
        "qemu: fatal: something broke\n",
    )
    .unwrap();
    send(pid, false, "exit status 0");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let vm = f.svc.get(&f.who, &id).await.unwrap();
    assert_eq!(vm.state(), VmState::Failed);
    assert!(
        vm.life.failure().unwrap().starts_with(
            "VMM exited on its own (exit status 0); its log ends: qemu: fatal: something broke;"
        ),
        "{:?}",
        vm.life.failure()
    );
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

// On tokio's paused clock: the boot timeout, the watcher's polls and the test's sleeps all run
// on one clock that only moves when every task is idle, so the order of events is the test's,
// not the machine's speed.
#[tokio::test(start_paused = true)]
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

#[tokio::test]
async fn a_failed_boot_rolls_back_isolation_and_leaves_the_vm_created() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.backend.fail_boot.store(true, Ordering::SeqCst);
    assert!(f.svc.boot(&f.who, &id).await.is_err());
    assert_eq!(
        f.isolation.calls(),
        [
            format!("setup {id}"),
            format!("open {id}"),
            format!("release {id}")
        ]
    );
    let vm = f.svc.get(&f.who, &id).await.unwrap();
    assert_eq!(vm.life, VmLife::created());
    // Isolation that cannot be set up never reaches the backend.
    f.backend.fail_boot.store(false, Ordering::SeqCst);
    f.isolation.fail_setup.store(true, Ordering::SeqCst);
    let boots = f.backend.calls().len();
    assert!(matches!(
        f.svc.boot(&f.who, &id).await,
        Err(ServiceError::Sandbox { .. })
    ));
    assert_eq!(f.backend.calls().len(), boots);
    assert_eq!(
        f.svc.get(&f.who, &id).await.unwrap().state(),
        VmState::Created
    );
}

#[tokio::test]
async fn a_firewall_that_cannot_open_stops_the_started_vmm_and_leaves_the_vm_created() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.isolation.fail_open.store(true, Ordering::SeqCst);
    let err = f.svc.boot(&f.who, &id).await.unwrap_err();
    assert!(matches!(err, ServiceError::Sandbox { .. }), "{err}");
    let calls = f.backend.calls();
    assert_eq!(&calls[calls.len() - 2..], ["boot", "shutdown Force"]);
    assert_eq!(
        f.isolation.calls().last().unwrap(),
        &format!("release {id}")
    );
    let vm = f.svc.get(&f.who, &id).await.unwrap();
    assert_eq!((vm.state(), vm.life.vmm_pid()), (VmState::Created, None));
    assert!(f.svc.meter.run_number(&id).is_none());
    // Nothing is held: the next boot goes through.
    f.isolation.fail_open.store(false, Ordering::SeqCst);
    assert_eq!(
        f.svc.boot(&f.who, &id).await.unwrap().state(),
        VmState::Running
    );
}

#[tokio::test]
async fn a_reboot_makes_a_new_jail_in_the_same_network_and_a_shutdown_releases_it() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    let first = f.svc.boot(&f.who, &id).await.unwrap();
    let again = f.svc.reboot(&f.who, &id, false).await.unwrap();
    assert_ne!(again.life.vmm_pid(), first.life.vmm_pid());
    assert_eq!(
        f.isolation.calls(),
        [
            format!("setup {id}"),
            format!("open {id}"),
            format!("attach {id}")
        ]
    );
    f.svc
        .shutdown(
            &f.who,
            &id,
            ShutdownRequest {
                force: true,
                timeout_seconds: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        f.isolation.calls().last().unwrap(),
        &format!("release {id}")
    );
}

#[tokio::test]
async fn start_up_adopts_surviving_vmms_and_sweeps_everything_else() {
    let f = fixture();
    let alive = f.svc.create(&f.who, config()).await.unwrap().id;
    let dead = f.svc.create(&f.who, config()).await.unwrap().id;
    let idle = f.svc.create(&f.who, config()).await.unwrap().id;
    let pid = f
        .svc
        .boot(&f.who, &alive)
        .await
        .unwrap()
        .life
        .vmm_pid()
        .unwrap();
    f.svc.boot(&f.who, &dead).await.unwrap();
    f.backend.survivors.lock().unwrap().insert(pid);
    f.isolation.calls.lock().unwrap().clear();
    f.backend.calls.lock().unwrap().clear();

    f.svc.reconcile().await.unwrap();

    let kept = f.svc.get(&f.who, &alive).await.unwrap();
    assert_eq!(kept.state(), VmState::Running);
    assert_eq!(kept.life.vmm_pid(), Some(pid));
    // Its vCPUs are set to run, as stored: metald may have died in the middle of a pause or
    // a suspend that had stopped them.
    assert_eq!(
        f.backend.calls(),
        vec![
            format!("adopt {pid}"),
            "resume".to_string(),
            format!("adopt {}", pid + 1)
        ]
    );
    assert_eq!(
        f.svc.get(&f.who, &dead).await.unwrap().state(),
        VmState::Failed
    );
    assert_eq!(
        f.svc.get(&f.who, &idle).await.unwrap().state(),
        VmState::Created
    );
    let mut calls = f.isolation.calls();
    let sweep = calls.pop().unwrap();
    calls.sort();
    let mut want = vec![format!("adopt {alive}"), format!("release {dead}")];
    want.sort();
    assert_eq!(calls, want);
    assert_eq!(sweep, format!("sweep keeping [{alive}]"));
}

/// Starts booting the fixture customer's VM `id` with the backend holding the boot until the
/// returned gate gets a permit; returns once the backend has the boot.
async fn held_boot(
    f: &Fixture,
    id: &VmId,
) -> (
    Arc<tokio::sync::Semaphore>,
    tokio::task::JoinHandle<Result<VmRecord, ServiceError>>,
) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *f.backend.hold_boot.lock().unwrap() = Some(Arc::clone(&gate));
    let booting = {
        let (svc, who, id) = (Arc::clone(&f.svc), f.who.clone(), id.clone());
        tokio::spawn(async move { svc.boot(&who, &id).await })
    };
    while !f.backend.calls().iter().any(|c| c == "boot") {
        tokio::task::yield_now().await;
    }
    (gate, booting)
}

#[tokio::test]
async fn a_start_is_in_flight_for_the_pools_until_it_ends_however_it_ends() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    assert_eq!(f.isolation.starts.in_flight(), 0);
    let (gate, booting) = held_boot(&f, &id).await;
    // The VMM is starting: the warm pools hold their refills.
    assert_eq!(f.isolation.starts.in_flight(), 1);
    gate.add_permits(1);
    booting.await.unwrap().unwrap();
    assert_eq!(f.isolation.starts.in_flight(), 0);
    // A failed start ends too.
    let other = f.svc.create(&f.who, config()).await.unwrap().id;
    f.backend.fail_boot.store(true, Ordering::SeqCst);
    f.backend.calls.lock().unwrap().clear();
    let (gate, booting) = held_boot(&f, &other).await;
    assert_eq!(f.isolation.starts.in_flight(), 1);
    gate.add_permits(1);
    assert!(booting.await.unwrap().is_err());
    assert_eq!(f.isolation.starts.in_flight(), 0);
}

#[tokio::test]
async fn a_delete_during_a_boot_waits_for_it_then_removes_the_vm_and_its_sandbox() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    let (gate, booting) = held_boot(&f, &id).await;
    let deleting = {
        let (svc, who, id) = (Arc::clone(&f.svc), f.who.clone(), id.clone());
        tokio::spawn(async move { svc.delete(&who, &id, true).await })
    };
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(!deleting.is_finished(), "delete went ahead of the boot");
    gate.add_permits(1);
    assert_eq!(booting.await.unwrap().unwrap().state(), VmState::Running);
    deleting.await.unwrap().unwrap();
    f.svc.settle().await;
    let calls = f.backend.calls();
    assert_eq!(&calls[calls.len() - 3..], ["boot", "boot done", "delete"]);
    assert_eq!(
        f.isolation.calls(),
        [
            format!("setup {id}"),
            format!("open {id}"),
            format!("release {id}")
        ]
    );
    assert!(matches!(
        f.svc.get(&f.who, &id).await,
        Err(ServiceError::NotFound(_))
    ));
    assert_eq!(dirs(&f), 0);
}

#[tokio::test]
async fn quota_file_overrides_take_effect_after_a_reload() {
    let f = fixture();
    let other: CustomerId = "other".parse().unwrap();
    std::fs::write(
        &f.quota_file,
        "[customers.acme]\nvms = 2\nrunning_vms = 1\n",
    )
    .unwrap();
    assert!(f.quotas.reload_if_changed().unwrap());
    let a = f.svc.create(&f.who, config()).await.unwrap().id;
    let b = f.svc.create(&f.who, config()).await.unwrap().id;
    match f.svc.create(&f.who, config()).await {
        Err(ServiceError::Store(StoreError::QuotaExceeded {
            quota: "UNKEY_METALD_QUOTA_VMS",
            used: 2,
            limit: 2,
            ..
        })) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(dirs(&f), 2, "the refused create left no directory");
    for _ in 0..3 {
        f.svc.create(&other, config()).await.unwrap();
    }
    f.svc.boot(&f.who, &a).await.unwrap();
    assert!(matches!(
        f.svc.boot(&f.who, &b).await,
        Err(ServiceError::Store(StoreError::QuotaExceeded {
            quota: "UNKEY_METALD_QUOTA_RUNNING_VMS",
            ..
        }))
    ));
    // The image is 5 bytes; in MiB (rounded up) the sum of the copies and the new copy are 1.
    std::fs::write(
        &f.quota_file,
        "[customers.acme]\nvms = 3\nrunning_vms = 2\ndisk_mib = 3\n",
    )
    .unwrap();
    assert!(f.quotas.reload_if_changed().unwrap());
    f.svc.boot(&f.who, &b).await.unwrap();
    f.svc.create(&f.who, config()).await.unwrap();
    std::fs::write(&f.quota_file, "[customers.acme]\nvms = 9\ndisk_mib = 1\n").unwrap();
    assert!(f.quotas.reload_if_changed().unwrap());
    match f.svc.create(&f.who, config()).await {
        Err(ServiceError::Store(StoreError::QuotaExceeded {
            quota: "UNKEY_METALD_QUOTA_DISK_MIB",
            used: 1,
            asked: 1,
            limit: 1,
        })) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_over_capacity_boot_is_refused_and_leaves_nothing_behind() {
    let f = fixture();
    // 1 GiB left to the host, 1 GiB admitted: two QEMU VMs of 128 MiB + 384 MiB headroom.
    f.probe
        .memory_bytes
        .store(HOST.memory_reserve_bytes + 1024 * MIB, Ordering::SeqCst);
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(f.svc.create(&f.who, config()).await.unwrap().id);
    }
    f.svc.boot(&f.who, &ids[0]).await.unwrap();
    // Another customer's VMs take the same host.
    let other: CustomerId = "other".parse().unwrap();
    let theirs = f.svc.create(&other, config()).await.unwrap().id;
    f.svc.boot(&other, &theirs).await.unwrap();
    let calls = f.backend.calls().len();
    let err = f.svc.boot(&f.who, &ids[1]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "host memory exhausted: 1024 MiB in use, 512 MiB asked, capacity 1024 MiB"
    );
    assert_eq!(
        crate::api::error::code_for(&err),
        connectrpc::ErrorCode::ResourceExhausted
    );
    assert_eq!(f.backend.calls().len(), calls, "the backend was not asked");
    assert!(!f.isolation.calls().contains(&format!("setup {}", ids[1])));
    assert_eq!(
        f.svc.get(&f.who, &ids[1]).await.unwrap().life,
        VmLife::created()
    );
    // No reservation was left: once a VM stops, the refused one fits.
    let stop = ShutdownRequest {
        force: true,
        timeout_seconds: 0,
    };
    f.svc.shutdown(&other, &theirs, stop).await.unwrap();
    f.svc.boot(&f.who, &ids[1]).await.unwrap();
    // vCPUs: 1 CPU × 4 admits 4; two VMs of 2 vCPUs run.
    f.probe.memory_bytes.store(16 << 30, Ordering::SeqCst);
    f.probe.cpus.store(1, Ordering::SeqCst);
    // A VM wider than the host admits could never boot: refused at create.
    f.probe.cpus.store(0, Ordering::SeqCst);
    match f.svc.create(&f.who, config()).await {
        Err(ServiceError::InvalidArgument { field, reason }) => {
            assert_eq!(field, "config.cpu.vcpu_count");
            assert!(reason.starts_with("at most 0 on this host"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    f.probe.cpus.store(1, Ordering::SeqCst);
    let err = f.svc.boot(&f.who, &ids[2]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "host vCPUs exhausted: 4 vCPUs in use, 2 vCPUs asked, capacity 4 vCPUs"
    );
    let capacity = f.svc.host_capacity().unwrap();
    assert_eq!(
        (
            capacity.vcpus.total,
            capacity.vcpus.used,
            capacity.vcpus.free
        ),
        (4, 4, 0)
    );
    assert_eq!(capacity.memory_bytes.used, 2 * 512 * MIB);
}

#[tokio::test]
async fn a_create_without_disk_room_is_refused_and_makes_nothing() {
    let f = fixture();
    // Exactly the reserve is free: not one more byte fits.
    f.probe
        .disk_available_bytes
        .store(HOST.disk_reserve_bytes, Ordering::SeqCst);
    let err = f.svc.create(&f.who, config()).await.unwrap_err();
    assert!(matches!(err, ServiceError::HostExhausted(_)), "{err:?}");
    assert!(
        err.to_string().starts_with("host disk exhausted: "),
        "{err}"
    );
    assert_eq!(dirs(&f), 0);
    assert!(f.backend.calls().is_empty());
    assert!(f
        .svc
        .list(&f.who, None, 0, "")
        .await
        .unwrap()
        .vms
        .is_empty());
    f.probe
        .disk_available_bytes
        .store(HOST.disk_reserve_bytes + MIB, Ordering::SeqCst);
    f.svc.create(&f.who, config()).await.unwrap();
}

#[tokio::test]
async fn other_customers_never_wait_on_or_add_to_the_vm_locks() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    let (gate, booting) = held_boot(&f, &id).await;
    // The owner's boot holds the lock; a stranger's calls answer at once, as for no VM.
    let stranger: CustomerId = "stranger".parse().unwrap();
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        f.svc.delete(&stranger, &id, true),
    )
    .await
    .expect("a stranger's call must not wait on the owner's lock");
    assert!(matches!(answer, Err(ServiceError::NotFound(_))));
    for _ in 0..100 {
        let made_up = VmId::generate();
        assert!(f.svc.boot(&stranger, &made_up).await.is_err());
    }
    assert_eq!(f.svc.locks.lock().unwrap().len(), 1, "only the owner's VM");
    gate.add_permits(1);
    booting.await.unwrap().unwrap();
    f.svc.delete(&f.who, &id, true).await.unwrap();
    assert!(
        f.svc.locks.lock().unwrap().is_empty(),
        "removed with the VM"
    );
}

#[tokio::test(start_paused = true)]
async fn a_delete_answers_before_the_sandbox_is_gone_and_retries_what_fails() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.boot(&f.who, &id).await.unwrap();
    f.isolation.fail_release.store(true, Ordering::SeqCst);
    let releases = || {
        f.isolation
            .calls()
            .iter()
            .filter(|c| **c == format!("release {id}"))
            .count()
    };
    // Gone for its owner at once, whatever its cgroup does.
    f.svc.delete(&f.who, &id, true).await.unwrap();
    assert!(matches!(
        f.svc.get(&f.who, &id).await,
        Err(ServiceError::NotFound(_))
    ));
    f.svc.settle().await;
    assert_eq!(
        releases(),
        3,
        "tried three times, then left to the start-up sweep"
    );
    assert!(
        !f.vms_dir.join(id.as_str()).exists(),
        "the directory is removed whatever the sandbox did"
    );

    // A release that works the first time: one try, and the directory is gone.
    f.isolation.fail_release.store(false, Ordering::SeqCst);
    let other = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.boot(&f.who, &other).await.unwrap();
    f.svc.delete(&f.who, &other, true).await.unwrap();
    f.svc.settle().await;
    assert!(!f.vms_dir.join(other.as_str()).exists());
    assert_eq!(
        f.isolation
            .calls()
            .iter()
            .filter(|c| **c == format!("release {other}"))
            .count(),
        1
    );
}

#[tokio::test]
async fn a_flooding_console_is_cut_to_its_cap_and_the_cut_is_reported() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.boot(&f.who, &id).await.unwrap();
    let log = f.vms_dir.join(id.as_str()).join("console.log");
    std::fs::write(
        &log,
        vec![b'x'; 4 * crate::testing::CONSOLE_MAX_BYTES as usize],
    )
    .unwrap();
    let mut tail = f.svc.console(&f.who, &id, 0).await.unwrap();
    for _ in 0..50 {
        if tail.dropped_bytes > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        tail = f.svc.console(&f.who, &id, 0).await.unwrap();
    }
    assert!(tail.dropped_bytes > 0, "{tail:?}");
    assert!(std::fs::metadata(&log).unwrap().len() <= crate::testing::CONSOLE_MAX_BYTES);
    assert_eq!(
        tail.dropped_bytes + tail.total_bytes,
        4 * crate::testing::CONSOLE_MAX_BYTES
    );
}

#[tokio::test]
async fn start_up_finishes_interrupted_deletes_and_removes_interrupted_creates() {
    let f = fixture();
    let deleting = f.svc.create(&f.who, config()).await.unwrap().id;
    let kept = f.svc.create(&f.who, config()).await.unwrap().id;
    // Killed mid-delete: the directory went, the row stayed.
    std::fs::remove_dir_all(f.vms_dir.join(deleting.as_str())).unwrap();
    // Killed mid-create: a directory with a disk copy and no row.
    let stray = f.vms_dir.join(VmId::generate().as_str());
    std::fs::create_dir(&stray).unwrap();
    std::fs::write(stray.join("rootfs.img"), b"copy").unwrap();
    let other = f.vms_dir.join("not-a-vm");
    std::fs::create_dir(&other).unwrap();
    f.svc.reconcile().await.unwrap();
    assert!(matches!(
        f.svc.get(&f.who, &deleting).await,
        Err(ServiceError::NotFound(_))
    ));
    assert!(f.svc.get(&f.who, &kept).await.is_ok());
    assert!(f.vms_dir.join(kept.as_str()).exists());
    assert!(!stray.exists());
    assert!(
        other.exists(),
        "only VM-named directories are metald's to remove"
    );
    assert!(f.isolation.calls().contains(&format!("release {deleting}")));
}

/// A new VM's disk copies are recorded on stable storage in the background; what a stop of
/// metald left unrecorded is made good at start: a never-run VM's copy is made again from its
/// image (a host crash may have lost part of it), a VM that ran keeps what its guest wrote.
#[tokio::test]
async fn disk_copies_become_durable_in_the_background_or_at_the_next_start() {
    let f = fixture();
    let fresh = f.svc.create(&f.who, config()).await.unwrap();
    f.svc.settle().await;
    assert_eq!(f.svc.store.vms_with_undurable_disks().unwrap(), vec![]);
    let image = std::fs::read(f.vms_dir.join(fresh.id.as_str()).join(ROOTFS_FILE)).unwrap();
    // As metald killed between a create and its sync leaves them: stored, never recorded.
    let stored = |state: VmState, disk: &[u8]| {
        let mut vm = fresh.clone();
        vm.id = VmId::generate();
        vm.life = VmLife::restore(state, None, None, None, false);
        let dir = f.vms_dir.join(vm.id.as_str());
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(ROOTFS_FILE), disk).unwrap();
        f.svc.store.insert_vm(&vm, None).unwrap().id
    };
    let torn = stored(VmState::Created, b"half a copy");
    let ran = stored(VmState::Shutdown, b"what the guest wrote");
    assert_eq!(
        f.svc.store.vms_with_undurable_disks().unwrap(),
        vec![torn.clone(), ran.clone()]
    );
    f.svc.reconcile().await.unwrap();
    let disk = |id: &VmId| std::fs::read(f.vms_dir.join(id.as_str()).join(ROOTFS_FILE)).unwrap();
    assert_eq!(disk(&torn), image, "made again from its image");
    assert_eq!(disk(&ran), b"what the guest wrote");
    assert_eq!(disk(&fresh.id), image);
    assert_eq!(f.svc.store.vms_with_undurable_disks().unwrap(), vec![]);
    assert_eq!(
        std::fs::read_dir(f.vms_dir.join(torn.as_str()))
            .unwrap()
            .count(),
        1,
        "no staging copy left"
    );
    // Every VM boots as before.
    for id in [&fresh.id, &torn, &ran] {
        f.svc.boot(&f.who, id).await.unwrap();
    }
}

#[tokio::test]
async fn creates_take_spare_disk_copies_made_ahead_and_a_stop_leaves_none() {
    let f = fixture_with_spares(2);
    let spare_dir = f.vms_dir.join(spare_disks::SPARE_DIR);
    let spare_files = || std::fs::read_dir(&spare_dir).unwrap().count();
    // What a killed metald left: swept at start.
    std::fs::create_dir(&spare_dir).unwrap();
    std::fs::write(spare_dir.join("0123-7.img.part"), b"torn").unwrap();
    f.svc.reconcile().await.unwrap();
    assert_eq!((spare_files(), f.svc.spare_disks()), (0, 0));
    // The first create of an image copies it; the image then gets its spares.
    let first = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.settle().await;
    assert_eq!((spare_files(), f.svc.spare_disks()), (2, 2));
    let second = f.svc.create(&f.who, config()).await.unwrap().id;
    assert_eq!(f.svc.spare_disks(), 1, "the second create took a spare");
    f.svc.settle().await;
    assert_eq!((spare_files(), f.svc.spare_disks()), (2, 2), "refilled");
    let disk = |id: &VmId| f.vms_dir.join(id.as_str()).join(ROOTFS_FILE);
    assert_eq!(std::fs::read(disk(&second)).unwrap(), b"image");
    // Its own file: what one guest writes, the other VM and the spares never see.
    std::fs::write(disk(&first), b"written by the first guest").unwrap();
    assert_eq!(std::fs::read(disk(&second)).unwrap(), b"image");
    let third = f.svc.create(&f.who, config()).await.unwrap().id;
    assert_eq!(std::fs::read(disk(&third)).unwrap(), b"image");
    f.svc.settle().await;
    assert_eq!(f.svc.store.vms_with_undurable_disks().unwrap(), vec![]);
    // Spares are no VMs: listing, the start-up sweep and booting are as before.
    assert_eq!(dirs(&f), 4, "three VMs and the spares' directory");
    f.svc.reconcile().await.unwrap();
    assert_eq!(f.svc.list(&f.who, None, 10, "").await.unwrap().vms.len(), 3);
    for id in [&first, &second, &third] {
        assert!(disk(id).exists());
        f.svc.boot(&f.who, id).await.unwrap();
    }
    // A clean stop removes the spares.
    f.svc.close().await;
    assert_eq!((spare_files(), f.svc.spare_disks()), (0, 0));
}

#[tokio::test]
async fn a_stopped_vm_reports_the_lifetime_totals_of_its_runs() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    assert_eq!(f.svc.usage(&f.who, &id, 0).await.unwrap().total.cpu_ns, 0);
    // What earlier runs used, as saved when each ended.
    let used = Counters {
        cpu_ns: 7_000_000_000,
        memory_bytes: 100 << 20,
        disk_write_bytes: 8 << 20,
        ..Counters::default()
    };
    f.svc.store.save_usage(&id, &used, None).unwrap();
    let u = f.svc.usage(&f.who, &id, 0).await.unwrap();
    assert_eq!(u.total.cpu_ns, 7_000_000_000);
    assert_eq!(u.total.disk_write_bytes, 8 << 20);
    assert_eq!(
        u.total.memory_bytes, 0,
        "nothing holds memory while stopped"
    );
    // Another customer sees nothing of it.
    let stranger: CustomerId = "stranger".parse().unwrap();
    assert!(f.svc.usage(&stranger, &id, 0).await.is_err());
}

/// A VMM that died while metald was down: its VM's lifetime totals never fall below what was
/// already billed for it, even where the counters it came from went with the process.
#[tokio::test]
async fn a_vmm_gone_at_start_keeps_at_least_its_billed_usage_in_the_totals() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.boot(&f.who, &id).await.unwrap();
    // Queued for billing before metald died: more disk reads than any counter still shows.
    let billed = Counters {
        cpu_ns: 5_000_000_000,
        disk_read_bytes: 1 << 20,
        ..Counters::default()
    };
    f.svc
        .store
        .enqueue_billing(&[], Some((&id, now_ms(), &billed, 1)))
        .unwrap();
    f.svc.reconcile().await.unwrap();
    let vm = f.svc.get(&f.who, &id).await.unwrap();
    assert_eq!(vm.state(), VmState::Failed);
    let u = f.svc.usage(&f.who, &id, 0).await.unwrap();
    assert!(u.total.cpu_ns >= billed.cpu_ns, "{:?}", u.total);
    assert_eq!(u.total.disk_read_bytes, billed.disk_read_bytes);
    assert_eq!(u.run, None, "no VMM, no run in progress");
}

/// A VM whose own disk is gone from its directory is FAILED at start, with the file named and
/// no host path, and can still be deleted; the others are as they were.
#[tokio::test]
async fn a_vm_whose_disk_is_gone_is_failed_at_start_and_can_be_deleted() {
    let f = fixture();
    let lost = f.svc.create(&f.who, config()).await.unwrap().id;
    let whole = f.svc.create(&f.who, config()).await.unwrap().id;
    std::fs::remove_file(f.vms_dir.join(lost.as_str()).join(ROOTFS_FILE)).unwrap();
    f.svc.reconcile().await.unwrap();
    let vm = f.svc.get(&f.who, &lost).await.unwrap();
    assert_eq!(vm.state(), VmState::Failed);
    let reason = vm.life.failure().unwrap();
    assert!(
        reason.contains("rootfs.img") && !reason.contains('/'),
        "{reason}"
    );
    assert_eq!(
        f.svc.get(&f.who, &whole).await.unwrap().state(),
        VmState::Created
    );
    // A second start finds it as it was left.
    f.svc.reconcile().await.unwrap();
    assert_eq!(f.svc.get(&f.who, &lost).await.unwrap().life, vm.life);
    assert!(matches!(
        f.svc.boot(&f.who, &lost).await,
        Err(ServiceError::FailedPrecondition(_))
    ));
    f.svc.delete(&f.who, &lost, false).await.unwrap();
}

/// An asset imported for one customer boots only their VMs: to another customer it is an
/// unknown image, refused in the same words as an id that was never imported.
#[tokio::test]
async fn a_customers_own_image_is_unknown_to_every_other_customer() {
    let f = fixture();
    let file = f.vms_dir.join("private.img");
    std::fs::write(&file, b"private").unwrap();
    f.svc
        .assets
        .import(&crate::assets::ImportRequest {
            id: "acme-root".into(),
            kind: AssetKind::Rootfs,
            source: file,
            initrd_id: None,
            ready_marker: None,
            owner: Some(f.who.to_string()),
        })
        .unwrap();
    let with_rootfs = |id: &str| VmConfig {
        rootfs_image_id: id.into(),
        ..config()
    };
    f.svc
        .create(&f.who, with_rootfs("acme-root"))
        .await
        .unwrap();
    let stranger: CustomerId = "stranger".parse().unwrap();
    let theirs = f
        .svc
        .create(&stranger, with_rootfs("acme-root"))
        .await
        .unwrap_err();
    let never = f
        .svc
        .create(&stranger, with_rootfs("never-imported"))
        .await
        .unwrap_err();
    assert!(
        matches!(theirs, ServiceError::InvalidArgument { .. }),
        "{theirs}"
    );
    assert_eq!(
        theirs.to_string().replace("acme-root", "X"),
        never.to_string().replace("never-imported", "X")
    );
    assert_eq!(
        f.svc.list(&stranger, None, 0, "").await.unwrap().vms.len(),
        0
    );
}

/// Suspend saves the guest and ends its VMM and sandbox; resume wakes it in a new VMM and
/// sandbox; the saved state survives a restart, and a shutdown or a delete drops it.
#[tokio::test]
async fn a_suspended_vm_holds_no_vmm_wakes_on_resume_and_survives_a_restart() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    let booted = f.svc.boot(&f.who, &id).await.unwrap();
    let saved = f
        .vms_dir
        .join(id.as_str())
        .join(crate::backend::files::SUSPEND_STATE);
    let vm = f.svc.suspend(&f.who, &id).await.unwrap();
    assert_eq!(vm.state(), VmState::Suspended);
    assert_eq!(vm.life.vmm_pid(), None);
    assert!(saved.exists());
    assert!(f.isolation.calls().contains(&format!("release {id}")));
    assert!(
        f.svc.meter.run_number(&id).is_none(),
        "a suspended VM is not metered"
    );
    // Not running: it counts against no running quota.
    assert_eq!(
        f.svc.store.count_by_state().unwrap(),
        vec![(VmState::Suspended, 1)]
    );
    // Only resume, shutdown and delete are open to it.
    for refused in [
        f.svc.boot(&f.who, &id).await,
        f.svc.pause(&f.who, &id).await,
        f.svc.suspend(&f.who, &id).await,
    ] {
        assert!(
            matches!(refused, Err(ServiceError::FailedPrecondition(_))),
            "{refused:?}"
        );
    }
    // A restart leaves it as it was.
    f.svc.reconcile().await.unwrap();
    assert_eq!(f.svc.get(&f.who, &id).await.unwrap().life, vm.life);
    let woken = f.svc.resume(&f.who, &id).await.unwrap();
    assert_eq!(woken.state(), VmState::Running);
    assert_ne!(woken.life.vmm_pid(), booted.life.vmm_pid(), "a new VMM");
    assert!(woken.life.guest_ready());
    assert!(f.svc.meter.run_number(&id).is_some());
    assert_eq!(f.backend.calls().iter().filter(|c| *c == "wake").count(), 1);
    // Suspended again, then shut down: the saved state goes, and the next start is a boot.
    f.svc.suspend(&f.who, &id).await.unwrap();
    let down = f
        .svc
        .shutdown(
            &f.who,
            &id,
            ShutdownRequest {
                force: false,
                timeout_seconds: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(down.state(), VmState::Shutdown);
    assert!(!saved.exists());
    f.svc.boot(&f.who, &id).await.unwrap();
    f.svc.suspend(&f.who, &id).await.unwrap();
    f.svc.delete(&f.who, &id, false).await.unwrap();
    f.svc.settle().await;
    assert!(!f.vms_dir.join(id.as_str()).exists());
}
