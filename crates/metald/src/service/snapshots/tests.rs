//! Unit tests of snapshots and clones against the fake backend.

use super::*;
use crate::testing::{config, fixture, Fixture, QUOTA_SNAPSHOTS};

fn snapshots_dir(f: &Fixture) -> PathBuf {
    f.vms_dir.parent().unwrap().join("snapshots")
}

/// A running VM is paused for its snapshot and runs on; the snapshot holds its state and a
/// copy of its disk. A clone gets its own disk copy and the state as a suspended state, and
/// its first boot restores it (a wake), its next a cold boot. The snapshot outlives its VM,
/// and its delete removes its files and leaves the clone be.
#[tokio::test]
async fn a_snapshot_starts_clones_and_outlives_its_vm() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.boot(&f.who, &id).await.unwrap();
    let before = f.backend.calls().len();
    let snap = f.svc.create_snapshot(&f.who, &id).await.unwrap();
    assert_eq!(snap.state, SnapshotState::Ready);
    assert_eq!(
        f.backend.calls()[before..],
        ["pause", "snapshot", "resume"].map(String::from)
    );
    assert_eq!(
        f.svc.get(&f.who, &id).await.unwrap().state(),
        VmState::Running
    );
    let dir = snapshots_dir(&f).join(&snap.id);
    assert!(dir.join(files::SNAPSHOT_STATE).is_file());
    assert_eq!(std::fs::read(dir.join(ROOTFS_FILE)).unwrap(), b"image");
    assert!(snap.bytes >= 10);
    f.svc.delete(&f.who, &id, true).await.unwrap();
    assert_eq!(
        f.svc.list_snapshots(&f.who).await.unwrap(),
        vec![snap.clone()]
    );
    // Its images stay in use while the snapshot exists: its clones boot from them.
    assert_eq!(
        crate::service::asset_users(&*f.svc.store, &config().kernel_image_id).unwrap(),
        vec![format!("snapshot {}", snap.id)]
    );

    let clone = f
        .svc
        .create_from_snapshot(
            &f.who,
            &snap.id,
            [("k".to_string(), "v".to_string())].into(),
        )
        .await
        .unwrap();
    assert_eq!(clone.state(), VmState::Created);
    assert_eq!(clone.config.metadata["k"], "v");
    assert_eq!(clone.config.memory_bytes, config().memory_bytes);
    let clone_dir = f.vms_dir.join(clone.id.as_str());
    assert!(clone_dir.join(files::SUSPEND_STATE).is_file());
    assert!(clone_dir.join(ROOTFS_FILE).is_file());
    let booted = f.svc.boot(&f.who, &clone.id).await.unwrap();
    assert_eq!(booted.state(), VmState::Running);
    assert!(booted.life.guest_ready(), "restored, not booted");
    assert_eq!(f.backend.calls().last().unwrap(), "wake");
    f.svc
        .shutdown(
            &f.who,
            &clone.id,
            ShutdownRequest {
                force: true,
                timeout_seconds: 0,
            },
        )
        .await
        .unwrap();
    f.svc.boot(&f.who, &clone.id).await.unwrap();
    assert_eq!(
        f.backend.calls().last().unwrap(),
        "boot",
        "the next start is cold"
    );

    f.svc.delete_snapshot(&f.who, &snap.id).await.unwrap();
    assert!(!dir.exists());
    assert!(f.svc.list_snapshots(&f.who).await.unwrap().is_empty());
    assert_eq!(
        f.svc.get(&f.who, &clone.id).await.unwrap().state(),
        VmState::Running
    );
}

/// Another customer's snapshot is the same answer as a made-up id, for every call; only a VM
/// with a guest can be snapshotted; the snapshot quota refuses one more.
#[tokio::test]
async fn snapshots_are_scoped_bounded_and_need_a_guest() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    let refused = f.svc.create_snapshot(&f.who, &id).await;
    assert!(
        matches!(refused, Err(ServiceError::Precondition(_))),
        "{refused:?}"
    );
    f.svc.boot(&f.who, &id).await.unwrap();
    let snap = f.svc.create_snapshot(&f.who, &id).await.unwrap();
    let stranger: CustomerId = "stranger".parse().unwrap();
    let made_up = "snap-made-up";
    let msg = |r: Result<(), ServiceError>, sid: &str| match r {
        Err(e @ ServiceError::SnapshotNotFound(_)) => e.to_string().replace(sid, "ID"),
        other => panic!("{other:?}"),
    };
    for sid in [snap.id.as_str(), made_up] {
        assert_eq!(
            msg(f.svc.delete_snapshot(&stranger, sid).await, sid),
            "snapshot ID not found"
        );
        assert_eq!(
            msg(
                f.svc
                    .create_from_snapshot(&stranger, sid, Default::default())
                    .await
                    .map(drop),
                sid
            ),
            "snapshot ID not found"
        );
    }
    assert!(f.svc.list_snapshots(&stranger).await.unwrap().is_empty());
    for _ in 1..QUOTA_SNAPSHOTS {
        f.svc.create_snapshot(&f.who, &id).await.unwrap();
    }
    let over = f.svc.create_snapshot(&f.who, &id).await;
    assert!(
        matches!(
            over,
            Err(ServiceError::Store(
                crate::store::StoreError::QuotaExceeded {
                    quota: "UNKEY_METALD_QUOTA_SNAPSHOTS",
                    ..
                }
            ))
        ),
        "{over:?}"
    );
    assert_eq!(
        std::fs::read_dir(snapshots_dir(&f)).unwrap().count() as u64,
        QUOTA_SNAPSHOTS,
        "a refused snapshot leaves no files"
    );
}

/// Start-up removes a snapshot whose create was interrupted (its row and files) and files
/// without a snapshot; a complete one stays.
#[tokio::test]
async fn start_up_sweeps_half_made_snapshots() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.boot(&f.who, &id).await.unwrap();
    let kept = f.svc.create_snapshot(&f.who, &id).await.unwrap();
    let half = SnapshotRecord {
        id: "snap-half".into(),
        state: SnapshotState::Creating,
        ..kept.clone()
    };
    f.svc
        .store
        .insert_snapshot_within(&half, &Default::default())
        .unwrap();
    let root = snapshots_dir(&f);
    for d in ["snap-half", "snap-orphan"] {
        std::fs::create_dir(root.join(d)).unwrap();
    }
    f.svc.reconcile().await.unwrap();
    let left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, vec![kept.id.clone()]);
    assert_eq!(f.svc.list_snapshots(&f.who).await.unwrap(), vec![kept]);
}

/// A suspended VM has no VMM: its saved state is copied as the snapshot's, and it stays
/// suspended.
#[tokio::test]
async fn a_suspended_vm_is_snapshotted_from_its_saved_state() {
    let f = fixture();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.boot(&f.who, &id).await.unwrap();
    f.svc.suspend(&f.who, &id).await.unwrap();
    let calls = f.backend.calls().len();
    let snap = f.svc.create_snapshot(&f.who, &id).await.unwrap();
    assert_eq!(f.backend.calls().len(), calls, "no VMM was asked");
    let dir = snapshots_dir(&f).join(&snap.id);
    assert_eq!(
        std::fs::read(dir.join(files::SNAPSHOT_STATE)).unwrap(),
        b"state"
    );
    assert!(!dir.join(files::SNAPSHOT_MEMORY).exists());
    assert_eq!(
        f.svc.get(&f.who, &id).await.unwrap().state(),
        VmState::Suspended
    );
}

/// A clone's address map loads while its VMM restores: one that fails (here: the host end it
/// pins neighbours on is not there) stops the VMM that started, releases the sandbox and the
/// running reservation, and leaves the clone as it was, to be booted again or deleted.
#[tokio::test]
async fn a_clone_whose_address_map_fails_is_stopped_and_left_as_it_was() {
    let f = crate::testing::fixture_with_clone_maps();
    let id = f.svc.create(&f.who, config()).await.unwrap().id;
    f.svc.boot(&f.who, &id).await.unwrap();
    let snap = f.svc.create_snapshot(&f.who, &id).await.unwrap();
    // The source runs on, holding its addresses: the clone's are others.
    let clone = f
        .svc
        .create_from_snapshot(&f.who, &snap.id, Default::default())
        .await
        .unwrap();
    assert_ne!(
        clone.net.as_ref().unwrap().ipv6,
        snap.inner.as_ref().unwrap().ipv6,
        "the clone has addresses of its own to map"
    );
    let before = f.backend.calls().len();
    let err = f.svc.boot(&f.who, &clone.id).await.unwrap_err();
    assert!(matches!(err, ServiceError::CloneMap { .. }), "{err:?}");
    assert_eq!(
        f.backend.calls()[before..],
        ["wake", "shutdown Force"].map(String::from),
        "the VMM started beside the map, and was stopped"
    );
    let released = format!("release {}", clone.id);
    assert!(f.isolation.calls().contains(&released));
    let now = f.svc.get(&f.who, &clone.id).await.unwrap();
    assert_eq!(now.state(), VmState::Created);
    assert!(
        f.vms_dir
            .join(clone.id.as_str())
            .join(files::SUSPEND_STATE)
            .is_file(),
        "its saved state stays for the next try"
    );
    // Nothing of the failed start holds it: a second try starts its VMM again (and fails
    // the same way), and the clone goes like any VM that never ran.
    let err = f.svc.boot(&f.who, &clone.id).await.unwrap_err();
    assert!(matches!(err, ServiceError::CloneMap { .. }), "{err:?}");
    assert_eq!(
        f.backend.calls()[before..],
        ["wake", "shutdown Force", "wake", "shutdown Force"].map(String::from)
    );
    f.svc.delete(&f.who, &clone.id, false).await.unwrap();
    f.svc.delete(&f.who, &id, true).await.unwrap();
}
