//! The `billing_outbox` and `billing_cursor` tables: billing messages waiting for delivery,
//! and how far each VM's usage has been queued.

use crate::Cached as _;
use rusqlite::{params, OptionalExtension};

use crate::domain::VmId;
use crate::{sql, Store, StoreError};
use metald_domain::usage::Counters;

/// One message waiting for the billing service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Idempotency key (unique).
    pub key: String,
    /// `metrics`, `started`, `stopped` or `gap`.
    pub kind: String,
    /// The VM.
    pub vm_id: String,
    /// Its owner.
    pub customer_id: String,
    /// The message's fields (JSON).
    pub payload_json: String,
}

/// The billing outbox and each VM's billing cursor, which move together.
///
/// Outbox rows outlive their VM (the usage in them is still owed); a cursor goes with its VM.
pub trait BillingStore: Send + Sync {
    /// A VM's billing cursor: (end of the last interval queued, totals there, batch number).
    fn billing_cursor(&self, id: &VmId) -> Result<Option<(i64, Counters, u64)>, StoreError>;

    /// Queues outbox rows and moves the VM's cursor to batch `seq`, atomically: on error
    /// neither happened. A row whose key is already queued is left as it is, so a retried batch
    /// is queued once. The cursor only moves forward: when it is already at `seq` or past it,
    /// nothing is written and the answer is `false` (the batch was queued already, or another
    /// batcher read the same cursor and queued first: its samples and these overlap). The
    /// cursor's VM must be stored.
    fn enqueue_billing(
        &self,
        rows: &[OutboxRow],
        cursor: Option<(&VmId, i64, &Counters, u64)>,
    ) -> Result<bool, StoreError>;

    /// The oldest `limit` outbox rows with their ids, in the order they were queued (ids grow
    /// and are never reused).
    fn outbox_peek(&self, limit: u32) -> Result<Vec<(i64, OutboxRow)>, StoreError>;

    /// Removes an acknowledged outbox row (one already gone is not an error).
    fn outbox_delete(&self, id: i64) -> Result<(), StoreError>;

    /// Rows waiting in the outbox.
    fn outbox_depth(&self) -> Result<u64, StoreError>;
}

impl BillingStore for Store {
    fn billing_cursor(&self, id: &VmId) -> Result<Option<(i64, Counters, u64)>, StoreError> {
        let row: Option<(i64, String, i64)> = self
            .conn()
            .row(
                "SELECT last_ms, last_total_json, seq FROM billing_cursor WHERE vm_id = ?1",
                params![id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql("read billing cursor"))?;
        row.map(|(ms, json, seq)| {
            let total = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                id: id.to_string(),
                reason: format!("billing cursor: {e}"),
            })?;
            Ok((ms, total, seq as u64))
        })
        .transpose()
    }

    fn enqueue_billing(
        &self,
        rows: &[OutboxRow],
        cursor: Option<(&VmId, i64, &Counters, u64)>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        if let Some((vm, last_ms, total, seq)) = cursor {
            let json = serde_json::to_string(total).map_err(|e| StoreError::Corrupt {
                id: vm.to_string(),
                reason: format!("billing cursor: {e}"),
            })?;
            let moved = tx
                .exec(
                    "INSERT INTO billing_cursor (vm_id, last_ms, last_total_json, seq) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (vm_id) DO UPDATE SET last_ms = ?2, last_total_json = ?3, seq = ?4
                     WHERE billing_cursor.seq < ?4",
                    params![vm.as_str(), last_ms, json, seq as i64],
                )
                .map_err(sql("move billing cursor"))?;
            if moved == 0 {
                // Dropping the transaction rolls it back: nothing of this batch is written.
                return Ok(false);
            }
        }
        for r in rows {
            tx.exec(
                "INSERT OR IGNORE INTO billing_outbox (key, kind, vm_id, customer_id, payload_json, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.key, r.kind, r.vm_id, r.customer_id, r.payload_json, crate::domain::now_ms()],
            )
            .map_err(sql("queue billing"))?;
        }
        tx.commit().map_err(sql("commit billing"))?;
        Ok(true)
    }

    fn outbox_peek(&self, limit: u32) -> Result<Vec<(i64, OutboxRow)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, key, kind, vm_id, customer_id, payload_json FROM billing_outbox ORDER BY id LIMIT ?1",
            )
            .map_err(sql("read outbox"))?;
        let rows = stmt
            .query_map(params![limit], |r| {
                Ok((
                    r.get(0)?,
                    OutboxRow {
                        key: r.get(1)?,
                        kind: r.get(2)?,
                        vm_id: r.get(3)?,
                        customer_id: r.get(4)?,
                        payload_json: r.get(5)?,
                    },
                ))
            })
            .map_err(sql("read outbox"))?;
        rows.map(|r| r.map_err(sql("read outbox"))).collect()
    }

    fn outbox_delete(&self, id: i64) -> Result<(), StoreError> {
        self.conn()
            .exec("DELETE FROM billing_outbox WHERE id = ?1", params![id])
            .map_err(sql("delete outbox row"))?;
        Ok(())
    }

    fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.conn()
            .row("SELECT COUNT(*) FROM billing_outbox", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(sql("count outbox"))
    }
}
