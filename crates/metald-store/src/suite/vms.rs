//! VM records: round trips, updates, customer scoping, paging, counts.

use super::{customer, vm, Harness};
use crate::domain::{DriveConfig, VmId, VmRecord};
use crate::state::{VmLife, VmState};
use crate::{HostLimits, HostUsage, RunLimits, Shortage, StoreError, StoredLimits, VmStore};

/// No host bound: the customer-quota tests see only their quotas.
const NO_HOST: HostLimits = HostLimits {
    memory_bytes: None,
    vcpus: None,
};

/// At most ten stored VMs.
const TEN: StoredLimits = StoredLimits {
    vms: Some(10),
    disk_bytes: None,
    snapshots: None,
};

/// Every field of an inserted VM (in any state) reads back as insert returned it; the sequence
/// number is positive, grows with each insert and is not reused after a delete.
pub fn inserted_vms_read_back_as_saved<H: Harness>(h: &H) {
    let store = h.open();
    let mut rich = vm("a");
    rich.life = VmLife::restore(
        VmState::Running,
        Some(4242),
        Some(9_876_543_210),
        Some("earlier boot failed".into()),
        true,
    );
    rich.config.kernel_args = "console=ttyS0 quiet".into();
    rich.config.drives = vec![DriveConfig {
        drive_id: "data".into(),
        image_id: "disk".into(),
        read_only: true,
    }];
    rich.backend = "firecracker".into();
    rich.created_at_ms = 1_700_000_000_000;
    rich.updated_at_ms = 1_700_000_000_500;
    let mut last_seq = 0;
    let every_state = VmState::ALL.map(|s| crate::testing::record("c", s));
    for input in [vm("a"), rich, vm("b")].into_iter().chain(every_state) {
        let saved = store.insert_vm(&input, None).unwrap();
        assert!(saved.seq > last_seq, "seq {} after {last_seq}", saved.seq);
        last_seq = saved.seq;
        assert_eq!(
            VmRecord {
                seq: 0,
                ..saved.clone()
            },
            input
        );
        assert_eq!(
            store.get_vm(&input.customer, &input.id).unwrap(),
            Some(saved.clone())
        );
        assert_eq!(store.get_vm_unscoped(&input.id).unwrap(), Some(saved));
    }
    let all = store.all_vms().unwrap();
    let newest = all.last().unwrap();
    store.delete_vm(&newest.id).unwrap();
    let next = store.insert_vm(&vm("a"), None).unwrap();
    assert!(next.seq > newest.seq, "seq {} reused", next.seq);
}

/// An update writes state, process, failure, readiness and update time; the owner, config,
/// backend and creation time stay as inserted.
pub fn update_writes_only_the_mutable_fields<H: Harness>(h: &H) {
    let store = h.open();
    let saved = store.insert_vm(&vm("a"), None).unwrap();
    let mut changed = saved.clone();
    changed.life = VmLife::restore(VmState::Running, Some(7), Some(99), Some("x".into()), true);
    changed.updated_at_ms = 5_000;
    changed.config.vcpu_count = 8;
    changed.backend = "firecracker".into();
    changed.created_at_ms = 4_000;
    store.update_vm(&changed).unwrap();
    let read = store.get_vm_unscoped(&saved.id).unwrap().unwrap();
    assert_eq!(
        read,
        VmRecord {
            life: changed.life.clone(),
            updated_at_ms: 5_000,
            ..saved.clone()
        }
    );
    // Back to nothing: cleared fields are cleared, not kept.
    changed.life = VmLife::restore(VmState::Shutdown, None, None, None, false);
    store.update_vm(&changed).unwrap();
    let read = store.get_vm_unscoped(&saved.id).unwrap().unwrap();
    assert_eq!(read.life, changed.life);
}

/// Updating or deleting a VM that is not stored is not an error and stores nothing (a delete
/// can race the end of a boot).
pub fn a_missing_vm_updates_and_deletes_without_error<H: Harness>(h: &H) {
    let store = h.open();
    let ghost = vm("a");
    store.update_vm(&ghost).unwrap();
    store.delete_vm(&ghost.id).unwrap();
    assert_eq!(store.get_vm_unscoped(&ghost.id).unwrap(), None);
    assert!(store.all_vms().unwrap().is_empty());
}

/// Scoped reads of another customer's VM look exactly like reads of a VM that does not exist;
/// only the unscoped read (metald's own) sees it.
pub fn another_customers_vm_is_indistinguishable_from_a_missing_one<H: Harness>(h: &H) {
    let store = h.open();
    let theirs = store.insert_vm(&vm("b"), None).unwrap();
    let (a, b) = (customer("a"), customer("b"));
    let missing = VmId::generate();
    assert_eq!(store.get_vm(&a, &theirs.id).unwrap(), None);
    assert_eq!(store.get_vm(&a, &missing).unwrap(), None);
    assert!(store.list_vms(&a, None, 0, 100).unwrap().is_empty());
    assert!(store
        .list_vms(&a, Some(VmState::Created), 0, 100)
        .unwrap()
        .is_empty());
    assert_eq!(store.get_vm(&b, &theirs.id).unwrap(), Some(theirs.clone()));
    assert_eq!(store.get_vm_unscoped(&theirs.id).unwrap(), Some(theirs));
}

/// Listing pages through one customer's VMs by sequence number, oldest first, skipping other
/// customers' VMs in between.
pub fn list_pages_by_seq_oldest_first<H: Harness>(h: &H) {
    let store = h.open();
    let a = customer("a");
    let mut mine = vec![];
    for i in 0..5 {
        mine.push(store.insert_vm(&vm("a"), None).unwrap());
        if i % 2 == 0 {
            store.insert_vm(&vm("b"), None).unwrap();
        }
    }
    let page1 = store.list_vms(&a, None, 0, 2).unwrap();
    assert_eq!(page1, mine[0..2]);
    let page2 = store.list_vms(&a, None, page1[1].seq, 2).unwrap();
    assert_eq!(page2, mine[2..4]);
    let page3 = store.list_vms(&a, None, page2[1].seq, 2).unwrap();
    assert_eq!(page3, mine[4..5]);
    assert!(store
        .list_vms(&a, None, page3[0].seq, 2)
        .unwrap()
        .is_empty());
    assert_eq!(store.list_vms(&a, None, 0, 100).unwrap(), mine);
    assert_eq!(
        store.list_vms(&customer("b"), None, 0, 100).unwrap().len(),
        3
    );
}

/// A state filter lists only the customer's VMs in that state, still oldest first.
pub fn list_filters_by_state<H: Harness>(h: &H) {
    let store = h.open();
    let a = customer("a");
    let mut saved = vec![];
    for _ in 0..4 {
        saved.push(store.insert_vm(&vm("a"), None).unwrap());
    }
    store
        .insert_vm(&crate::testing::record("b", VmState::Running), None)
        .unwrap();
    for i in [1, 3] {
        saved[i].life = VmLife::restore(VmState::Running, Some(42), None, None, false);
        store.update_vm(&saved[i]).unwrap();
    }
    let running = store.list_vms(&a, Some(VmState::Running), 0, 10).unwrap();
    assert_eq!(running, vec![saved[1].clone(), saved[3].clone()]);
    let after = store
        .list_vms(&a, Some(VmState::Running), saved[1].seq, 10)
        .unwrap();
    assert_eq!(after, vec![saved[3].clone()]);
    let created = store.list_vms(&a, Some(VmState::Created), 0, 10).unwrap();
    assert_eq!(created, vec![saved[0].clone(), saved[2].clone()]);
    assert!(store
        .list_vms(&a, Some(VmState::Paused), 0, 10)
        .unwrap()
        .is_empty());
}

/// `all_vms` lists every customer's VMs, oldest first.
pub fn all_vms_lists_every_customer_oldest_first<H: Harness>(h: &H) {
    let store = h.open();
    assert!(store.all_vms().unwrap().is_empty());
    let saved: Vec<VmRecord> = ["a", "b", "a", "c"]
        .into_iter()
        .map(|c| store.insert_vm(&vm(c), None).unwrap())
        .collect();
    assert_eq!(store.all_vms().unwrap(), saved);
}

/// Counting by state covers every VM and leaves out states no VM is in.
pub fn count_by_state_leaves_out_empty_states<H: Harness>(h: &H) {
    let store = h.open();
    assert!(store.count_by_state().unwrap().is_empty());
    for (c, state) in [
        ("a", VmState::Running),
        ("b", VmState::Running),
        ("a", VmState::Created),
        ("c", VmState::Running),
    ] {
        store
            .insert_vm(&crate::testing::record(c, state), None)
            .unwrap();
    }
    let mut counts = store.count_by_state().unwrap();
    counts.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(counts, vec![(VmState::Created, 1), (VmState::Running, 3)]);
}

/// A second insert with a stored VM's id is refused and leaves the first as it was.
pub fn a_duplicate_vm_id_is_refused<H: Harness>(h: &H) {
    let store = h.open();
    let first = store.insert_vm(&vm("a"), None).unwrap();
    let mut again = vm("b");
    again.id = first.id.clone();
    assert!(store.insert_vm(&again, None).is_err());
    assert_eq!(store.all_vms().unwrap(), vec![first]);
}

/// A deleted VM is gone from every read; the others stay.
pub fn delete_removes_the_vm<H: Harness>(h: &H) {
    let store = h.open();
    let gone = store.insert_vm(&vm("a"), None).unwrap();
    let kept = store.insert_vm(&vm("a"), None).unwrap();
    store.delete_vm(&gone.id).unwrap();
    assert_eq!(store.get_vm(&gone.customer, &gone.id).unwrap(), None);
    assert_eq!(store.get_vm_unscoped(&gone.id).unwrap(), None);
    assert_eq!(
        store.list_vms(&gone.customer, None, 0, 10).unwrap(),
        vec![kept.clone()]
    );
    assert_eq!(store.all_vms().unwrap(), vec![kept]);
    assert_eq!(store.count_by_state().unwrap(), vec![(VmState::Created, 1)]);
}

/// VMs, their updates and deletes are still there after a restart.
pub fn vms_survive_reopen<H: Harness>(h: &H) {
    let (kept, gone) = {
        let store = h.open();
        let mut kept = store.insert_vm(&vm("a"), None).unwrap();
        let gone = store.insert_vm(&vm("a"), None).unwrap();
        kept.life = VmLife::restore(VmState::Running, Some(42), Some(7), None, true);
        kept.updated_at_ms = 2;
        store.update_vm(&kept).unwrap();
        store.delete_vm(&gone.id).unwrap();
        (kept, gone)
    };
    let store = h.open();
    assert_eq!(
        store.get_vm(&kept.customer, &kept.id).unwrap(),
        Some(kept.clone())
    );
    assert_eq!(store.get_vm_unscoped(&gone.id).unwrap(), None);
    assert_eq!(store.all_vms().unwrap(), vec![kept.clone()]);
    let next = store.insert_vm(&vm("a"), None).unwrap();
    assert!(next.seq > gone.seq, "seq {} reused after reopen", next.seq);
}

/// A new VM's disks are not durable until that is recorded, for that VM only; an update of
/// the VM keeps the record, a deleted VM leaves the list, and the list survives a restart.
pub fn disks_are_durable_only_once_recorded<H: Harness>(h: &H) {
    let (a, b) = {
        let store = h.open();
        let mut a = store.insert_vm(&vm("a"), None).unwrap();
        let b = store.insert_vm(&vm("b"), None).unwrap();
        let c = store.insert_vm(&vm("a"), None).unwrap();
        assert_eq!(
            store.vms_with_undurable_disks().unwrap(),
            vec![a.id.clone(), b.id.clone(), c.id.clone()]
        );
        store.set_disks_durable(&a.id).unwrap();
        a.life = VmLife::restore(VmState::Running, Some(42), Some(7), None, false);
        store.update_vm(&a).unwrap();
        store.delete_vm(&c.id).unwrap();
        // A VM deleted while its disks were syncing: nothing to record, no error.
        store.set_disks_durable(&c.id).unwrap();
        assert_eq!(
            store.vms_with_undurable_disks().unwrap(),
            vec![b.id.clone()]
        );
        (a, b)
    };
    let store = h.open();
    assert_eq!(
        store.vms_with_undurable_disks().unwrap(),
        vec![b.id.clone()]
    );
    store.set_disks_durable(&b.id).unwrap();
    assert_eq!(store.vms_with_undurable_disks().unwrap(), vec![]);
    assert_eq!(store.get_vm_unscoped(&a.id).unwrap(), Some(a));
}

/// A customer's stored-VM limit holds under concurrent inserts: exactly the limit succeeds,
/// every other insert is refused with the quota's numbers and stores nothing, and another
/// customer is not affected.
pub fn the_stored_vm_quota_is_never_overshot<H: Harness>(h: &H) {
    let store = h.open();
    let results: Vec<Result<VmRecord, StoreError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..5)
            .map(|_| {
                s.spawn(|| {
                    (0..10)
                        .map(|_| store.insert_vm_within(&vm("a"), None, 0, &TEN))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let stored = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(stored, 10);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(
                r,
                StoreError::QuotaExceeded {
                    used: 10,
                    limit: 10,
                    ..
                }
            ),
            "{r}"
        );
    }
    let a = customer("a");
    assert_eq!(store.list_vms(&a, None, 0, 100).unwrap().len(), 10);
    assert!(store.insert_vm_within(&vm("b"), None, 0, &TEN).is_ok());
    // Deleting one makes room for one.
    let first = store.list_vms(&a, None, 0, 1).unwrap().remove(0);
    store.delete_vm(&first.id).unwrap();
    assert!(store.insert_vm_within(&vm("a"), None, 0, &TEN).is_ok());
    assert!(store.insert_vm_within(&vm("a"), None, 0, &TEN).is_err());
}

/// Running quotas under concurrent boots: exactly the limit is admitted, each refusal names
/// its quota, and paused, saved-running and reserved VMs all count while stopped ones do not.
pub fn running_quotas_admit_exactly_the_limit_and_count_every_running_vm<H: Harness>(h: &H) {
    let store = h.open();
    let vms: Vec<VmRecord> = (0..30)
        .map(|_| store.insert_vm(&vm("a"), None).unwrap())
        .collect();
    let limits = RunLimits {
        vms: Some(10),
        ..RunLimits::default()
    };
    let admitted: usize = std::thread::scope(|s| {
        let workers: Vec<_> = vms
            .chunks(6)
            .map(|chunk| {
                let (store, limits) = (&store, &limits);
                s.spawn(move || {
                    chunk
                        .iter()
                        .filter(|v| match store.reserve_run(v, limits, &NO_HOST) {
                            Ok(()) => true,
                            Err(StoreError::QuotaExceeded {
                                quota: "UNKEY_METALD_QUOTA_RUNNING_VMS",
                                used: 10,
                                asked: 1,
                                limit: 10,
                            }) => false,
                            Err(e) => panic!("{e}"),
                        })
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(admitted, 10);
    // Reserved VMs saved as running or paused keep counting; a released one frees its place.
    let reserved: Vec<&VmRecord> = vms
        .iter()
        .filter(|v| {
            store
                .reserve_run(v, &RunLimits::default(), &NO_HOST)
                .is_ok()
        })
        .collect();
    assert_eq!(reserved.len(), 30, "no limit admits everything");
    store.release_all_runs().unwrap();
    let mut running = vms[0].clone();
    running.life = VmLife::restore(VmState::Running, Some(1), Some(1), None, false);
    store.update_vm(&running).unwrap();
    let mut paused = vms[1].clone();
    paused.life = VmLife::restore(VmState::Paused, Some(2), Some(2), None, false);
    store.update_vm(&paused).unwrap();
    let two = RunLimits {
        vms: Some(3),
        ..RunLimits::default()
    };
    store.reserve_run(&vms[2], &two, &NO_HOST).unwrap();
    assert!(store.reserve_run(&vms[3], &two, &NO_HOST).is_err());
    store.release_run(&vms[2].id).unwrap();
    store.reserve_run(&vms[3], &two, &NO_HOST).unwrap();
    // Saving the booted VM ends its reservation; it counts through its state.
    let mut booted = vms[3].clone();
    booted.life = VmLife::restore(VmState::Running, Some(4), Some(4), None, false);
    store.update_vm(&booted).unwrap();
    assert!(store.reserve_run(&vms[4], &two, &NO_HOST).is_err());
    let mut stopped = booted.clone();
    stopped.life = VmLife::restore(VmState::Shutdown, None, None, None, false);
    store.update_vm(&stopped).unwrap();
    store.reserve_run(&vms[4], &two, &NO_HOST).unwrap();
    // Another customer's running VMs count for them only.
    let b = store.insert_vm(&vm("b"), None).unwrap();
    store
        .reserve_run(
            &b,
            &RunLimits {
                vms: Some(1),
                ..RunLimits::default()
            },
            &NO_HOST,
        )
        .unwrap();
}

/// The vCPU and memory quotas add what the boot asks to what runs.
pub fn running_vcpu_and_memory_quotas_add_the_boots_own_size<H: Harness>(h: &H) {
    let store = h.open();
    let mut big = vm("a");
    big.config.vcpu_count = 4;
    big.config.memory_bytes = 1024 << 20;
    let big = store.insert_vm(&big, None).unwrap();
    let small = store.insert_vm(&vm("a"), None).unwrap(); // 1 vCPU, 128 MiB
    let limits = RunLimits {
        vms: None,
        vcpus: Some(4),
        memory_bytes: Some(2048 << 20),
    };
    store.reserve_run(&big, &limits, &NO_HOST).unwrap();
    match store.reserve_run(&small, &limits, &NO_HOST) {
        Err(StoreError::QuotaExceeded {
            quota: "UNKEY_METALD_QUOTA_RUNNING_VCPUS",
            used: 4,
            asked: 1,
            limit: 4,
        }) => {}
        other => panic!("{other:?}"),
    }
    let memory = RunLimits {
        vms: None,
        vcpus: None,
        memory_bytes: Some(1100 << 20),
    };
    match store.reserve_run(&small, &memory, &NO_HOST) {
        Err(StoreError::QuotaExceeded {
            quota: "UNKEY_METALD_QUOTA_RUNNING_MEMORY_MIB",
            used: 1024,
            asked: 128,
            limit: 1100,
        }) => {}
        other => panic!("{other:?}"),
    }
    // The same VM asking again does not count itself twice.
    store.reserve_run(&big, &limits, &NO_HOST).unwrap();
}

/// The disk quota sums the writable disks of every VM the customer stores, in any state, with
/// the new VM's; another customer's disks do not count, and a delete frees its VM's.
pub fn the_disk_quota_sums_the_customers_writable_disks<H: Harness>(h: &H) {
    let store = h.open();
    let limits = StoredLimits {
        vms: None,
        disk_bytes: Some(1000 << 20),
        snapshots: None,
    };
    let first = store
        .insert_vm_within(&vm("a"), None, 600 << 20, &limits)
        .unwrap();
    store
        .insert_vm_within(&vm("b"), None, 900 << 20, &limits)
        .unwrap();
    match store.insert_vm_within(&vm("a"), None, (400 << 20) + 1, &limits) {
        Err(StoreError::QuotaExceeded {
            quota: "UNKEY_METALD_QUOTA_DISK_MIB",
            used: 600,
            asked: 401,
            limit: 1000,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.list_vms(&customer("a"), None, 0, 10).unwrap().len(),
        1
    );
    store
        .insert_vm_within(&vm("a"), None, 400 << 20, &limits)
        .unwrap();
    assert!(store.insert_vm_within(&vm("a"), None, 1, &limits).is_err());
    store.delete_vm(&first.id).unwrap();
    store
        .insert_vm_within(&vm("a"), None, 600 << 20, &limits)
        .unwrap();
    assert_eq!(store.host_usage().unwrap().disk_bytes, 1900 << 20);
}

/// Host capacity under concurrent boots of several customers: exactly what fits is admitted,
/// each refusal names the resource with its numbers in MiB, memory counts each VMM's headroom
/// (the records name QEMU: 128 MiB guest + 384 MiB), and the figures are host-wide.
pub fn host_capacity_admits_exactly_what_fits_under_concurrent_boots<H: Harness>(h: &H) {
    let store = h.open();
    let vms: Vec<VmRecord> = (0..40)
        .map(|i| {
            store
                .insert_vm(&vm(if i % 2 == 0 { "a" } else { "b" }), None)
                .unwrap()
        })
        .collect();
    let host = HostLimits {
        memory_bytes: Some((5 * 512) << 20),
        vcpus: None,
    };
    let admitted: usize = std::thread::scope(|s| {
        let workers: Vec<_> = vms
            .chunks(5)
            .map(|chunk| {
                let store = &store;
                s.spawn(move || {
                    chunk
                        .iter()
                        .filter(
                            |v| match store.reserve_run(v, &RunLimits::default(), &host) {
                                Ok(()) => true,
                                Err(StoreError::HostExhausted(Shortage {
                                    resource: "memory",
                                    unit: "MiB",
                                    used: 2560,
                                    asked: 512,
                                    capacity: 2560,
                                })) => false,
                                Err(e) => panic!("{e}"),
                            },
                        )
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(admitted, 5);
    assert_eq!(
        store.host_usage().unwrap(),
        HostUsage {
            memory_bytes: 2560 << 20,
            vcpus: 5,
            vms: 40,
            disk_bytes: 0,
        }
    );
    let vcpus = HostLimits {
        memory_bytes: None,
        vcpus: Some(5),
    };
    let another = store.insert_vm(&vm("c"), None).unwrap();
    let err = store
        .reserve_run(&another, &RunLimits::default(), &vcpus)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "host vCPUs exhausted: 5 vCPUs in use, 1 vCPUs asked, capacity 5 vCPUs"
    );
}

/// Capacity comes back when a boot's reservation is released, when a running VM stops and
/// when it is deleted; a Firecracker VM counts Firecracker's smaller headroom.
pub fn released_stopped_and_deleted_vms_free_host_capacity<H: Harness>(h: &H) {
    let store = h.open();
    let vms: Vec<VmRecord> = (0..3)
        .map(|_| store.insert_vm(&vm("a"), None).unwrap())
        .collect();
    let host = HostLimits {
        memory_bytes: Some((2 * 512) << 20),
        vcpus: Some(2),
    };
    let none = RunLimits::default();
    store.reserve_run(&vms[0], &none, &host).unwrap();
    store.reserve_run(&vms[1], &none, &host).unwrap();
    assert!(matches!(
        store.reserve_run(&vms[2], &none, &host),
        Err(StoreError::HostExhausted(_))
    ));
    store.release_run(&vms[0].id).unwrap();
    store.reserve_run(&vms[2], &none, &host).unwrap();
    // Saved running it keeps its place; shut down, it frees it.
    let mut running = vms[2].clone();
    running.life = VmLife::restore(VmState::Running, Some(1), Some(1), None, false);
    store.update_vm(&running).unwrap();
    assert!(store.reserve_run(&vms[0], &none, &host).is_err());
    let mut stopped = running.clone();
    stopped.life = VmLife::restore(VmState::Shutdown, None, None, None, false);
    store.update_vm(&stopped).unwrap();
    store.reserve_run(&vms[0], &none, &host).unwrap();
    store.delete_vm(&vms[1].id).unwrap();
    assert_eq!(store.host_usage().unwrap().memory_bytes, 512 << 20);
    // 128 MiB + Firecracker's 64 MiB fits where a QEMU VM's 512 MiB would not.
    let mut fc = vm("b");
    fc.backend = "firecracker".into();
    let fc = store.insert_vm(&fc, None).unwrap();
    let tight = HostLimits {
        memory_bytes: Some(704 << 20),
        vcpus: None,
    };
    store.reserve_run(&fc, &none, &tight).unwrap();
    assert_eq!(store.host_usage().unwrap().memory_bytes, 704 << 20);
}

/// What admission reads (the held and owned sums the store keeps as VMs change, instead of
/// summing every VM at each boot) equals a recount of the VMs after every step of a long
/// random churn of inserts, reservations, releases, state changes and deletes.
pub fn the_kept_sums_match_the_vms_through_any_churn<H: Harness>(h: &H) {
    let store = h.open();
    // A generous host bound, so reservations are counted (without any bound they are skipped).
    let host = HostLimits {
        memory_bytes: Some(u64::MAX / 4),
        vcpus: Some(u64::MAX / 4),
    };
    let none = RunLimits::default();
    // The model: each live VM, whether it holds, and its size.
    let mut live: Vec<(VmRecord, bool, u64)> = vec![];
    let mut seed: u64 = 0x5eed;
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    // Each VM's headroom: what one holding VM adds beyond its guest memory.
    let probe = store.insert_vm(&vm("z"), None).unwrap();
    store.reserve_run(&probe, &none, &host).unwrap();
    let headroom = store.host_usage().unwrap().memory_bytes - probe.config.memory_bytes;
    store.delete_vm(&probe.id).unwrap();
    for step in 0..400 {
        match next(6) {
            0 | 1 => {
                let mut v = vm(["a", "b", "c"][next(3) as usize]);
                v.config.vcpu_count = 1 + next(4) as u32;
                v.config.memory_bytes = (128 + 128 * next(4)) << 20;
                let disk = next(1000) << 20;
                let v = store
                    .insert_vm_within(&v, None, disk, &StoredLimits::default())
                    .unwrap();
                live.push((v, false, disk));
            }
            2 if !live.is_empty() => {
                let i = next(live.len() as u64) as usize;
                store.reserve_run(&live[i].0, &none, &host).unwrap();
                live[i].1 = true;
            }
            3 if !live.is_empty() => {
                let i = next(live.len() as u64) as usize;
                let state =
                    [VmState::Running, VmState::Paused, VmState::Shutdown][next(3) as usize];
                let (pid, ticks) = if state.has_vmm() {
                    (Some(1), Some(1))
                } else {
                    (None, None)
                };
                live[i].0.life = VmLife::restore(state, pid, ticks, None, false);
                store.update_vm(&live[i].0).unwrap();
                live[i].1 = state.has_vmm();
            }
            4 if !live.is_empty() => {
                let i = next(live.len() as u64) as usize;
                store.release_run(&live[i].0.id).unwrap();
                live[i].1 = live[i].0.state().has_vmm();
            }
            5 if !live.is_empty() => {
                let i = next(live.len() as u64) as usize;
                let (gone, _, _) = live.swap_remove(i);
                if next(2) == 0 {
                    store.delete_vm(&gone.id).unwrap();
                } else {
                    store.delete_vm_holding_allocation(&gone.id).unwrap();
                }
            }
            _ => {}
        }
        let holding = live.iter().filter(|(_, held, _)| *held);
        let want = HostUsage {
            memory_bytes: holding
                .clone()
                .map(|(v, _, _)| v.config.memory_bytes + headroom)
                .sum(),
            vcpus: holding
                .map(|(v, _, _)| u64::from(v.config.vcpu_count))
                .sum(),
            vms: live.len() as u64,
            disk_bytes: live.iter().map(|(_, _, d)| *d).sum(),
        };
        assert_eq!(store.host_usage().unwrap(), want, "after step {step}");
    }
    // Per customer too: a running-VMs quota of exactly what "a" holds admits none more.
    let a_holds = live
        .iter()
        .filter(|(v, held, _)| *held && v.customer.as_str() == "a")
        .count() as u64;
    let newcomer = store.insert_vm(&vm("a"), None).unwrap();
    let full = RunLimits {
        vms: Some(a_holds),
        ..RunLimits::default()
    };
    assert!(matches!(
        store.reserve_run(&newcomer, &full, &host),
        Err(StoreError::QuotaExceeded { used, .. }) if used == a_holds
    ));
    let room = RunLimits {
        vms: Some(a_holds + 1),
        ..RunLimits::default()
    };
    store.reserve_run(&newcomer, &room, &host).unwrap();
    // Asking again never counts itself twice.
    store.reserve_run(&newcomer, &room, &host).unwrap();
}
