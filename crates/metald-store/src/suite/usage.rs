//! Usage totals kept across restarts.

use super::{counters, vm, Harness};
use crate::{UsageStore, VmStore};

/// Nothing is loaded before a save; a save loads back as written, with or without a base, and
/// a later save replaces it.
pub fn usage_round_trips_and_is_replaced<H: Harness>(h: &H) {
    let store = h.open();
    let a = store.insert_vm(&vm("a"), None).unwrap();
    assert_eq!(store.load_usage(&a.id).unwrap(), None);
    store
        .save_usage(&a.id, &counters(100), Some(&counters(7)))
        .unwrap();
    assert_eq!(
        store.load_usage(&a.id).unwrap(),
        Some((counters(100), Some(counters(7))))
    );
    // The run ended: its usage is carried and there is no base any more.
    store.save_usage(&a.id, &counters(250), None).unwrap();
    assert_eq!(
        store.load_usage(&a.id).unwrap(),
        Some((counters(250), None))
    );
    store
        .save_usage(&a.id, &counters(250), Some(&counters(u64::MAX - 9)))
        .unwrap();
    assert_eq!(
        store.load_usage(&a.id).unwrap(),
        Some((counters(250), Some(counters(u64::MAX - 9))))
    );
}

/// Each VM has its own totals, and they go with the VM's delete.
pub fn usage_is_per_vm_and_goes_with_it<H: Harness>(h: &H) {
    let store = h.open();
    let a = store.insert_vm(&vm("a"), None).unwrap();
    let b = store.insert_vm(&vm("a"), None).unwrap();
    store.save_usage(&a.id, &counters(1), None).unwrap();
    store
        .save_usage(&b.id, &counters(2), Some(&counters(3)))
        .unwrap();
    assert_eq!(store.load_usage(&a.id).unwrap(), Some((counters(1), None)));
    store.delete_vm(&b.id).unwrap();
    assert_eq!(store.load_usage(&b.id).unwrap(), None);
    assert_eq!(store.load_usage(&a.id).unwrap(), Some((counters(1), None)));
}

/// Saved usage is still there after a restart.
pub fn usage_survives_reopen<H: Harness>(h: &H) {
    let id = {
        let store = h.open();
        let a = store.insert_vm(&vm("a"), None).unwrap();
        store
            .save_usage(&a.id, &counters(40), Some(&counters(4)))
            .unwrap();
        a.id
    };
    let store = h.open();
    assert_eq!(
        store.load_usage(&id).unwrap(),
        Some((counters(40), Some(counters(4))))
    );
}
