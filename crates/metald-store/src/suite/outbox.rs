//! The billing outbox and cursors.

use super::{counters, vm, Harness};
use crate::domain::{VmId, VmRecord};
use crate::{BillingStore, OutboxRow, VmStore};

fn row(key: &str, kind: &str, vm: &VmRecord) -> OutboxRow {
    OutboxRow {
        key: key.into(),
        kind: kind.into(),
        vm_id: vm.id.to_string(),
        customer_id: vm.customer.to_string(),
        payload_json: format!(r#"{{"key":"{key}"}}"#),
    }
}

fn queued<S: BillingStore>(store: &S) -> Vec<OutboxRow> {
    store
        .outbox_peek(1000)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// Rows come out in the order they were queued, across batches, with growing ids; `limit`
/// takes the oldest.
pub fn outbox_keeps_queue_order_and_limit<H: Harness>(h: &H) {
    let store = h.open();
    assert!(store.outbox_peek(10).unwrap().is_empty());
    assert_eq!(store.outbox_depth().unwrap(), 0);
    let a = store.insert_vm(&vm("a"), None).unwrap();
    let b = store.insert_vm(&vm("b"), None).unwrap();
    let rows = [
        row("k3", "started", &a),
        row("k1", "metrics", &a),
        row("k2", "gap", &b),
        row("k0", "stopped", &b),
    ];
    store.enqueue_billing(&rows[..3], None).unwrap();
    store.enqueue_billing(&rows[3..], None).unwrap();
    let peeked = store.outbox_peek(10).unwrap();
    assert_eq!(
        peeked.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
        rows
    );
    assert!(
        peeked.windows(2).all(|w| w[0].0 < w[1].0),
        "ids grow: {peeked:?}"
    );
    let oldest = store.outbox_peek(2).unwrap();
    assert_eq!(oldest, peeked[..2]);
    assert_eq!(store.outbox_depth().unwrap(), 4);
}

/// A key already queued is not queued again, whether it comes in a later batch or twice in
/// one: the first row stays as it was (a retried batch is delivered once).
pub fn a_repeated_key_is_queued_once<H: Harness>(h: &H) {
    let store = h.open();
    let a = store.insert_vm(&vm("a"), None).unwrap();
    let first = row("k1", "metrics", &a);
    store
        .enqueue_billing(std::slice::from_ref(&first), None)
        .unwrap();
    let mut retried = first.clone();
    retried.payload_json = r#"{"other":true}"#.into();
    let fresh = row("k2", "metrics", &a);
    store
        .enqueue_billing(&[retried.clone(), fresh.clone()], None)
        .unwrap();
    store
        .enqueue_billing(&[row("k3", "gap", &a), row("k3", "stopped", &a)], None)
        .unwrap();
    assert_eq!(queued(&store), vec![first, fresh, row("k3", "gap", &a)]);
    assert_eq!(store.outbox_depth().unwrap(), 3);
}

/// Deleting an acknowledged row removes that row only; deleting one already gone is fine; ids
/// are not reused, even once the outbox is empty.
pub fn delete_removes_only_that_row_and_ids_are_not_reused<H: Harness>(h: &H) {
    let store = h.open();
    let a = store.insert_vm(&vm("a"), None).unwrap();
    let rows = [
        row("k1", "metrics", &a),
        row("k2", "metrics", &a),
        row("k3", "metrics", &a),
    ];
    store.enqueue_billing(&rows, None).unwrap();
    let ids: Vec<i64> = store
        .outbox_peek(10)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    store.outbox_delete(ids[1]).unwrap();
    assert_eq!(queued(&store), vec![rows[0].clone(), rows[2].clone()]);
    assert_eq!(store.outbox_depth().unwrap(), 2);
    store.outbox_delete(ids[1]).unwrap();
    store.outbox_delete(ids[2] + 1000).unwrap();
    store.outbox_delete(ids[2]).unwrap();
    store.outbox_delete(ids[0]).unwrap();
    assert_eq!(store.outbox_depth().unwrap(), 0);
    store
        .enqueue_billing(&[row("k4", "metrics", &a)], None)
        .unwrap();
    let (id, _) = store.outbox_peek(1).unwrap().remove(0);
    assert!(id > ids[2], "id {id} reused");
}

/// A VM has no cursor until one is written; each write replaces it, with or without rows,
/// and leaves other VMs' cursors alone.
pub fn cursor_moves_with_the_rows<H: Harness>(h: &H) {
    let store = h.open();
    let a = store.insert_vm(&vm("a"), None).unwrap();
    let b = store.insert_vm(&vm("a"), None).unwrap();
    assert_eq!(store.billing_cursor(&a.id).unwrap(), None);
    store
        .enqueue_billing(
            &[row("k1", "metrics", &a)],
            Some((&a.id, 1_000, &counters(5), 1)),
        )
        .unwrap();
    assert_eq!(
        store.billing_cursor(&a.id).unwrap(),
        Some((1_000, counters(5), 1))
    );
    assert_eq!(store.outbox_depth().unwrap(), 1);
    store
        .enqueue_billing(&[], Some((&a.id, 2_000, &counters(9), 2)))
        .unwrap();
    store
        .enqueue_billing(&[], Some((&b.id, 1_500, &counters(1), 7)))
        .unwrap();
    assert_eq!(
        store.billing_cursor(&a.id).unwrap(),
        Some((2_000, counters(9), 2))
    );
    assert_eq!(
        store.billing_cursor(&b.id).unwrap(),
        Some((1_500, counters(1), 7))
    );
    assert_eq!(store.outbox_depth().unwrap(), 1);
}

/// The cursor only moves forward: a batch numbered at or below it (a retry, or a second
/// batcher that read the same cursor and lost the race) writes neither its rows nor the cursor.
pub fn a_batch_the_cursor_passed_writes_nothing<H: Harness>(h: &H) {
    let store = h.open();
    let a = store.insert_vm(&vm("a"), None).unwrap();
    assert!(store
        .enqueue_billing(
            &[row("a:1", "metrics", &a)],
            Some((&a.id, 1_000, &counters(5), 1)),
        )
        .unwrap());
    assert!(store
        .enqueue_billing(
            &[row("a:2", "metrics", &a)],
            Some((&a.id, 2_000, &counters(9), 2)),
        )
        .unwrap());
    // Overtaken: read the cursor at batch 1, ends earlier than the batch 2 already queued.
    let racing = [row("a:2", "metrics", &a), row("a:gap:1500", "gap", &a)];
    assert!(!store
        .enqueue_billing(&racing, Some((&a.id, 1_500, &counters(7), 2)))
        .unwrap());
    // Older still: never moves the cursor back.
    assert!(!store
        .enqueue_billing(&[], Some((&a.id, 500, &counters(1), 1)))
        .unwrap());
    assert_eq!(
        store.billing_cursor(&a.id).unwrap(),
        Some((2_000, counters(9), 2))
    );
    assert_eq!(
        queued(&store),
        vec![row("a:1", "metrics", &a), row("a:2", "metrics", &a)]
    );
}

/// Rows and cursor are one write: when the cursor is refused (its VM is not stored), none of
/// the batch's rows are queued.
pub fn a_refused_cursor_queues_nothing<H: Harness>(h: &H) {
    let store = h.open();
    let a = store.insert_vm(&vm("a"), None).unwrap();
    let ghost = VmId::generate();
    let err = store.enqueue_billing(
        &[row("k1", "metrics", &a), row("k2", "metrics", &a)],
        Some((&ghost, 1_000, &counters(5), 1)),
    );
    assert!(err.is_err(), "{err:?}");
    assert_eq!(store.outbox_depth().unwrap(), 0);
    assert_eq!(store.billing_cursor(&ghost).unwrap(), None);
    // The same rows go in once the batch is right.
    store
        .enqueue_billing(
            &[row("k1", "metrics", &a)],
            Some((&a.id, 1_000, &counters(5), 1)),
        )
        .unwrap();
    assert_eq!(queued(&store), vec![row("k1", "metrics", &a)]);
}

/// Deleting a VM drops its cursor but not its queued rows: the usage in them is still owed.
pub fn outbox_rows_outlive_their_vm_but_the_cursor_does_not<H: Harness>(h: &H) {
    let store = h.open();
    let a = store.insert_vm(&vm("a"), None).unwrap();
    let rows = [row("k1", "metrics", &a), row("k2", "stopped", &a)];
    store
        .enqueue_billing(&rows, Some((&a.id, 1_000, &counters(5), 1)))
        .unwrap();
    store.delete_vm(&a.id).unwrap();
    assert_eq!(store.billing_cursor(&a.id).unwrap(), None);
    assert_eq!(queued(&store), rows);
}

/// Queued rows and cursors are still there after a restart, in order.
pub fn outbox_and_cursor_survive_reopen<H: Harness>(h: &H) {
    let (a, rows) = {
        let store = h.open();
        let a = store.insert_vm(&vm("a"), None).unwrap();
        let rows = vec![row("k1", "started", &a), row("k2", "metrics", &a)];
        store
            .enqueue_billing(&rows, Some((&a.id, 3_000, &counters(8), 4)))
            .unwrap();
        (a, rows)
    };
    let store = h.open();
    assert_eq!(queued(&store), rows);
    assert_eq!(
        store.billing_cursor(&a.id).unwrap(),
        Some((3_000, counters(8), 4))
    );
}
