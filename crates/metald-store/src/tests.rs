//! The SQLite store's tests: the shared [`crate::suite`] on real files, then what only SQLite
//! has (migrations, WAL, rows it cannot parse).

use std::path::PathBuf;

use rusqlite::Connection;

use crate::domain::{VmId, VmRecord};
use crate::state::VmState;
use crate::suite::Harness;
use crate::testing::record;
use crate::*;

/// A fresh database file in a temporary directory of its own.
struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("metald.db")
    }

    /// A second connection, for what the store's interface cannot do (breaking rows).
    fn raw(&self) -> Connection {
        Connection::open(self.path()).unwrap()
    }
}

impl Harness for Sqlite {
    type Store = Store;

    fn open(&self) -> Store {
        Store::open(&self.path()).unwrap()
    }
}

mod suite {
    use super::Sqlite;

    crate::store_suite!(Sqlite::new());
}

fn schema_version(conn: &Connection) -> i64 {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_new_database_is_at_the_latest_schema_in_wal_mode() {
    let h = Sqlite::new();
    drop(h.open());
    // Opening again applies nothing twice.
    let _store = h.open();
    let raw = h.raw();
    assert_eq!(schema_version(&raw), MIGRATIONS.len() as i64);
    let mode: String = raw
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn refuses_a_newer_schema() {
    let h = Sqlite::new();
    drop(h.open());
    h.raw().pragma_update(None, "user_version", 99).unwrap();
    assert!(matches!(
        Store::open(&h.path()),
        Err(StoreError::TooNew { found: 99, .. })
    ));
}

#[test]
fn an_old_database_is_migrated_forward_keeping_its_rows() {
    let h = Sqlite::new();
    let vm = record("a", VmState::Created);
    {
        let raw = h.raw();
        raw.execute_batch(MIGRATIONS[0]).unwrap();
        raw.pragma_update(None, "user_version", 1).unwrap();
        raw.execute(
            "INSERT INTO vms (id, customer_id, state, config_json, backend, created_at_ms,
                              updated_at_ms)
             VALUES (?1, ?2, 'CREATED', ?3, 'qemu', 1, 1)",
            rusqlite::params![
                vm.id.as_str(),
                vm.customer.as_str(),
                serde_json::to_string(&vm.config).unwrap()
            ],
        )
        .unwrap();
    }
    let store = h.open();
    assert_eq!(schema_version(&h.raw()), MIGRATIONS.len() as i64);
    let read = store.get_vm_unscoped(&vm.id).unwrap().unwrap();
    assert_eq!(
        VmRecord {
            seq: vm.seq,
            ..read
        },
        vm
    );
    // The later migrations' tables are there for the old VM; its disks were synced when it
    // was created, before disks became durable in the background.
    assert_eq!(store.vms_with_undurable_disks().unwrap(), vec![]);
    store.save_usage(&vm.id, &Default::default(), None).unwrap();
    store
        .enqueue_billing(&[], Some((&vm.id, 1, &Default::default(), 1)))
        .unwrap();
}

/// A database from before the free-number lists: its allocations' gaps (and what a deleted
/// VM's leftovers hold) become the free numbers, so the next VM still gets the lowest free.
#[test]
fn allocations_made_before_the_free_lists_leave_their_gaps_free() {
    let h = Sqlite::new();
    {
        let raw = h.raw();
        for (i, m) in MIGRATIONS[..9].iter().enumerate() {
            raw.execute_batch(m).unwrap();
            raw.pragma_update(None, "user_version", i as i64 + 1)
                .unwrap();
        }
        // Slots 0 1 3 taken and 5 held; IPv6 indexes 2 3 5 and 7 held; IPv4 2 and 4.
        for (n, (slot, ip6, ip4)) in [(0, 2, Some(2)), (1, 3, None), (3, 5, Some(4))]
            .into_iter()
            .enumerate()
        {
            let vm = record("a", VmState::Created);
            raw.execute(
                "INSERT INTO vms (id, customer_id, state, config_json, backend, created_at_ms,
                                  updated_at_ms)
                 VALUES (?1, 'a', 'CREATED', ?2, 'qemu', 1, 1)",
                rusqlite::params![vm.id.as_str(), serde_json::to_string(&vm.config).unwrap()],
            )
            .unwrap();
            raw.execute(
                "INSERT INTO vm_network (vm_id, slot, ip6_index, ipv6, ip4_index, ipv4, mac)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'm')",
                rusqlite::params![
                    vm.id.as_str(),
                    slot,
                    ip6,
                    format!("fd00::{n}"),
                    ip4,
                    ip4.map(|i| format!("10.0.0.{i}"))
                ],
            )
            .unwrap();
        }
        raw.execute(
            "INSERT INTO held_allocations (vm_id, slot, ip6_index, ip4_index)
             VALUES ('vm-gone', 5, 7, NULL)",
            [],
        )
        .unwrap();
    }
    let store = h.open();
    let plan = metald_domain::ipam::AllocationPlan {
        slots: 100,
        ipv6: "fd00:1::/64".parse().unwrap(),
        ipv4: Some("10.9.0.0/24".parse().unwrap()),
    };
    let net = |v: VmRecord| {
        let n = v.net.unwrap();
        (n.slot, n.ipv6.to_string(), n.ipv4.unwrap().to_string())
    };
    let first = store
        .insert_vm(&record("b", VmState::Created), Some(&plan))
        .unwrap();
    assert_eq!(net(first), (2, "fd00:1::4".into(), "10.9.0.3".into()));
    let second = store
        .insert_vm(&record("b", VmState::Created), Some(&plan))
        .unwrap();
    assert_eq!(net(second), (4, "fd00:1::6".into(), "10.9.0.5".into()));
    let third = store
        .insert_vm(&record("b", VmState::Created), Some(&plan))
        .unwrap();
    assert_eq!(
        net(third),
        (6, "fd00:1::8".into(), "10.9.0.6".into()),
        "the held 5 and 7 are skipped"
    );
    store.free_held_allocations().unwrap();
    let fourth = store
        .insert_vm(&record("b", VmState::Created), Some(&plan))
        .unwrap();
    assert_eq!(net(fourth), (5, "fd00:1::7".into(), "10.9.0.7".into()));
}

#[test]
fn a_corrupt_vm_row_is_reported_with_its_id() {
    let h = Sqlite::new();
    let store = h.open();
    let vm = store
        .insert_vm(&record("a", VmState::Created), None)
        .unwrap();
    let raw = h.raw();
    let break_with = |set: &str| {
        raw.execute(&format!("UPDATE vms SET {set}"), []).unwrap();
    };
    let corrupt_reason = |r: Result<Option<VmRecord>, StoreError>| match r {
        Err(StoreError::Corrupt { id, reason }) => {
            assert_eq!(id, vm.id.as_str());
            reason
        }
        other => panic!("expected corrupt, got {other:?}"),
    };

    break_with("state = 'LOST'");
    let err = store.get_vm(&vm.customer, &vm.id).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("stored row for {} is corrupt: state LOST", vm.id)
    );
    assert!(store.list_vms(&vm.customer, None, 0, 10).is_err());
    assert!(store.all_vms().is_err());
    assert!(matches!(
        store.count_by_state(),
        Err(StoreError::Corrupt { id, .. }) if id == "vms"
    ));

    break_with("state = 'CREATED', config_json = '{\"vcpu_count\":'");
    let reason = corrupt_reason(store.get_vm_unscoped(&vm.id));
    assert!(reason.starts_with("config: "), "{reason}");

    break_with("config_json = '{}', customer_id = 'not a customer'");
    corrupt_reason(store.get_vm_unscoped(&vm.id));
    // Unscoped only: no customer can name the broken one.
    assert_eq!(store.count_by_state().unwrap(), vec![(VmState::Created, 1)]);
}

#[test]
fn a_corrupt_address_is_reported_with_its_vm() {
    let h = Sqlite::new();
    let store = h.open();
    let plan = metald_domain::ipam::AllocationPlan {
        slots: 2,
        ipv6: "fd00:1::/64".parse().unwrap(),
        ipv4: None,
    };
    let vm = store
        .insert_vm(&record("a", VmState::Created), Some(&plan))
        .unwrap();
    h.raw()
        .execute("UPDATE vm_network SET ipv6 = 'fd00::zz'", [])
        .unwrap();
    match store.get_vm_unscoped(&vm.id) {
        Err(StoreError::Corrupt { id, reason }) => {
            assert_eq!(
                (id.as_str(), reason.as_str()),
                (vm.id.as_str(), "network: ipv6 fd00::zz")
            );
        }
        other => panic!("expected corrupt, got {other:?}"),
    }
}

#[test]
fn corrupt_usage_and_billing_cursor_are_reported_with_their_vm() {
    let h = Sqlite::new();
    let store = h.open();
    let vm = store
        .insert_vm(&record("a", VmState::Created), None)
        .unwrap();
    store.save_usage(&vm.id, &Default::default(), None).unwrap();
    store
        .enqueue_billing(&[], Some((&vm.id, 1, &Default::default(), 1)))
        .unwrap();
    let raw = h.raw();
    raw.execute("UPDATE vm_usage SET carried_json = 'nope'", [])
        .unwrap();
    raw.execute("UPDATE billing_cursor SET last_total_json = '{'", [])
        .unwrap();
    let is_vm = |e: StoreError| matches!(e, StoreError::Corrupt { id, .. } if id == vm.id.as_str());
    assert!(is_vm(store.load_usage(&vm.id).unwrap_err()));
    assert!(is_vm(store.billing_cursor(&vm.id).unwrap_err()));
}

#[test]
fn a_corrupt_asset_kind_is_reported_with_its_id() {
    let h = Sqlite::new();
    let store = h.open();
    store
        .insert_asset(&AssetRecord {
            id: "r".into(),
            kind: AssetKind::Rootfs,
            file_name: "r".into(),
            size_bytes: 1,
            sha256: String::new(),
            initrd_id: None,
            ready_marker: None,
            created_at_ms: 1,
            owner: None,
        })
        .unwrap();
    // The schema's CHECK keeps bad kinds out; only a hand edit gets one in.
    let raw = h.raw();
    raw.pragma_update(None, "ignore_check_constraints", true)
        .unwrap();
    raw.execute("UPDATE assets SET kind = 'floppy'", [])
        .unwrap();
    let err = store.get_asset("r").unwrap_err();
    assert_eq!(
        err.to_string(),
        "stored row for r is corrupt: asset kind floppy"
    );
    assert!(store.list_assets().is_err());
}

#[test]
fn sqlite_errors_name_the_operation_and_keep_the_cause_as_source() {
    let h = Sqlite::new();
    let store = h.open();
    let vm = store
        .insert_vm(&record("a", VmState::Created), None)
        .unwrap();
    let err = store.insert_vm(&vm, None).unwrap_err();
    assert_eq!(err.to_string(), "database insert vm");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("UNIQUE"), "{source}");
    // The refused insert left no trace.
    assert_eq!(store.all_vms().unwrap().len(), 1);
    assert_eq!(store.get_vm_unscoped(&VmId::generate()).unwrap(), None);
}
