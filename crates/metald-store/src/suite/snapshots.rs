//! Snapshots: round trips, customer scoping, the snapshot and disk quotas, clones' inner
//! identities.

use super::{customer, plan, vm, Harness};
use crate::domain::VmId;
use crate::{
    InnerIdentity, SnapshotRecord, SnapshotState, SnapshotStore, StoreError, StoredLimits, VmStore,
};

fn snapshot(owner: &str, n: u32) -> SnapshotRecord {
    let source = vm(owner);
    SnapshotRecord {
        id: format!("snap-{n:08}"),
        customer: customer(owner),
        source_vm: source.id,
        state: SnapshotState::Creating,
        backend: "qemu".into(),
        config: source.config,
        inner: Some(InnerIdentity {
            ipv6: "fd00::5".parse().unwrap(),
            ipv4: Some("10.0.0.5".parse().unwrap()),
            mac: "02:00:00:00:00:05".into(),
        }),
        bytes: 0,
        created_at_ms: 7,
    }
}

const TWO: StoredLimits = StoredLimits {
    vms: None,
    disk_bytes: None,
    snapshots: Some(2),
};

/// A snapshot reads back as stored, only for its owner; another customer's id is the same
/// answer as a made-up one; finishing it marks it READY with its size; delete removes it.
pub fn snapshots_read_back_only_for_their_owner<H: Harness>(h: &H) {
    let store = h.open();
    let s = snapshot("a", 1);
    store
        .insert_snapshot_within(&s, &StoredLimits::default())
        .unwrap();
    assert_eq!(
        store.get_snapshot(&customer("a"), &s.id).unwrap(),
        Some(s.clone())
    );
    assert_eq!(store.get_snapshot(&customer("b"), &s.id).unwrap(), None);
    assert_eq!(
        store.get_snapshot(&customer("a"), "snap-nope").unwrap(),
        None
    );
    assert!(store.list_snapshots(&customer("b")).unwrap().is_empty());
    store
        .finish_snapshot(&s.id, 5 << 20, &StoredLimits::default())
        .unwrap();
    let done = store.get_snapshot(&customer("a"), &s.id).unwrap().unwrap();
    assert_eq!((done.state, done.bytes), (SnapshotState::Ready, 5 << 20));
    assert_eq!(store.list_snapshots(&customer("a")).unwrap(), vec![done]);
    drop(store);
    let store = h.open();
    assert_eq!(store.all_snapshots().unwrap().len(), 1);
    store.delete_snapshot(&s.id).unwrap();
    store.delete_snapshot(&s.id).unwrap();
    assert!(store.all_snapshots().unwrap().is_empty());
}

/// The snapshot quota admits exactly its limit per customer; a snapshot's bytes count
/// against the disk quota of VMs created later, and a snapshot past the disk quota stays
/// unfinished.
pub fn snapshot_quotas_count_snapshots_and_their_bytes<H: Harness>(h: &H) {
    let store = h.open();
    store
        .insert_snapshot_within(&snapshot("a", 1), &TWO)
        .unwrap();
    store
        .insert_snapshot_within(&snapshot("a", 2), &TWO)
        .unwrap();
    let err = store
        .insert_snapshot_within(&snapshot("a", 3), &TWO)
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::QuotaExceeded {
                quota: "UNKEY_METALD_QUOTA_SNAPSHOTS",
                used: 2,
                ..
            }
        ),
        "{err}"
    );
    store
        .insert_snapshot_within(&snapshot("b", 4), &TWO)
        .unwrap();
    let disk = StoredLimits {
        vms: None,
        disk_bytes: Some(100 << 20),
        snapshots: None,
    };
    store
        .finish_snapshot("snap-00000001", 60 << 20, &disk)
        .unwrap();
    let err = store
        .finish_snapshot("snap-00000002", 60 << 20, &disk)
        .unwrap_err();
    assert!(matches!(err, StoreError::QuotaExceeded { .. }), "{err}");
    let err = store
        .insert_vm_within(&vm("a"), None, 50 << 20, &disk)
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::QuotaExceeded {
                quota: "UNKEY_METALD_QUOTA_DISK_MIB",
                used: 60,
                ..
            }
        ),
        "{err}"
    );
    store
        .insert_vm_within(&vm("a"), None, 40 << 20, &disk)
        .unwrap();
}

/// A clone commits with its inner identity and takes the inner MAC as its own; forgetting the
/// identity leaves the VM; deleting the VM removes the identity; a snapshot outlives its
/// source VM.
pub fn a_clone_keeps_its_inner_identity_until_forgotten<H: Harness>(h: &H) {
    let store = h.open();
    let p = plan(8, "fd00::/64", Some("10.0.0.0/24"));
    let source = store.insert_vm(&vm("a"), Some(&p)).unwrap();
    let mut s = snapshot("a", 1);
    s.source_vm = source.id.clone();
    store
        .insert_snapshot_within(&s, &StoredLimits::default())
        .unwrap();
    store.delete_vm(&source.id).unwrap();
    assert!(store.get_snapshot(&customer("a"), &s.id).unwrap().is_some());
    let inner = s.inner.clone().unwrap();
    let clone = store
        .insert_clone_within(
            &vm("a"),
            Some(&p),
            0,
            &StoredLimits::default(),
            &s.id,
            Some(&inner),
        )
        .unwrap();
    assert_eq!(clone.net.as_ref().unwrap().mac, inner.mac);
    let read = store.get_vm(&customer("a"), &clone.id).unwrap().unwrap();
    assert_eq!(read.net, clone.net);
    assert_eq!(store.inner_identity(&clone.id).unwrap(), Some(inner));
    store.forget_inner_identity(&clone.id).unwrap();
    assert_eq!(store.inner_identity(&clone.id).unwrap(), None);
    assert!(store.get_vm(&customer("a"), &clone.id).unwrap().is_some());
    let other = store
        .insert_clone_within(
            &vm("a"),
            Some(&p),
            0,
            &StoredLimits::default(),
            &s.id,
            s.inner.as_ref(),
        )
        .unwrap();
    store.delete_vm(&other.id).unwrap();
    assert_eq!(store.inner_identity(&other.id).unwrap(), None);
    assert_eq!(store.inner_identity(&VmId::generate()).unwrap(), None);
}
