//! The `snapshots` table (customer-owned snapshots, independent of their source VM) and the
//! `vm_inner_identity` table (a clone's guest's idea of its addresses, until its next cold
//! boot).

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::Cached as _;
use rusqlite::{params, OptionalExtension, Row};

use crate::domain::{CustomerId, VmConfig, VmId, VmRecord};
use crate::vms::{count, insert_vm_tx};
use crate::{sql, within, Store, StoreError, StoredLimits};
use metald_domain::ipam::AllocationPlan;

/// Where a snapshot is in its making.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// Its files are being written; a row left so at start is an interrupted create.
    Creating,
    /// Complete: VMs can be created from it.
    Ready,
}

impl SnapshotState {
    /// Stable name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "CREATING",
            SnapshotState::Ready => "READY",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "CREATING" => Some(SnapshotState::Creating),
            "READY" => Some(SnapshotState::Ready),
            _ => None,
        }
    }
}

/// The addresses and MAC a restored guest believes are its own (its snapshot's source VM's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InnerIdentity {
    /// The guest's IPv6 address.
    pub ipv6: Ipv6Addr,
    /// The guest's IPv4 address, if it had one.
    pub ipv4: Option<Ipv4Addr>,
    /// The guest's MAC.
    pub mac: String,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Its id (`snap-<uuid>`).
    pub id: String,
    /// Its owner.
    pub customer: CustomerId,
    /// The VM it was made from (which may be gone since).
    pub source_vm: VmId,
    /// Where it is in its making.
    pub state: SnapshotState,
    /// The VMM that wrote it; only that VMM can restore it.
    pub backend: String,
    /// The source VM's configuration, which clones get.
    pub config: VmConfig,
    /// The source VM's network identity, if it had one.
    pub inner: Option<InnerIdentity>,
    /// Bytes its files take (disks and memory), counted against the disk quota.
    pub bytes: u64,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
}

/// Snapshots and clones' inner identities.
pub trait SnapshotStore: Send + Sync {
    /// Records a new snapshot in state CREATING, refused with [`StoreError::QuotaExceeded`]
    /// (nothing stored) when the customer would hold more than `limits.snapshots`. Count and
    /// insert are one transaction.
    fn insert_snapshot_within(
        &self,
        snap: &SnapshotRecord,
        limits: &StoredLimits,
    ) -> Result<(), StoreError>;

    /// Marks a snapshot READY with its size; refused with [`StoreError::QuotaExceeded`] (the
    /// row stays CREATING) when its bytes would take the customer past `limits.disk_bytes`.
    fn finish_snapshot(
        &self,
        id: &str,
        bytes: u64,
        limits: &StoredLimits,
    ) -> Result<(), StoreError>;

    /// The customer's snapshot with this id, in any state (another customer's is
    /// indistinguishable from a missing one).
    fn get_snapshot(
        &self,
        customer: &CustomerId,
        id: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError>;

    /// The customer's snapshots, oldest first.
    fn list_snapshots(&self, customer: &CustomerId) -> Result<Vec<SnapshotRecord>, StoreError>;

    /// Every snapshot on this host, oldest first (start-up reconciliation).
    fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError>;

    /// Removes a snapshot; a missing one is not an error. Its clones keep running.
    fn delete_snapshot(&self, id: &str) -> Result<(), StoreError>;

    /// [`crate::VmStore::insert_vm_within`] of a clone whose guest believes it is `inner`:
    /// the VM, its allocation (with `inner.mac` as its MAC, the one its guest uses) and its
    /// inner identity commit together.
    fn insert_clone_within(
        &self,
        vm: &VmRecord,
        plan: Option<&AllocationPlan>,
        disk_bytes: u64,
        limits: &StoredLimits,
        snapshot_id: &str,
        inner: Option<&InnerIdentity>,
    ) -> Result<VmRecord, StoreError>;

    /// The identity the VM's guest believes it has, when it is not the VM's own.
    fn inner_identity(&self, vm: &VmId) -> Result<Option<InnerIdentity>, StoreError>;

    /// Forgets the VM's inner identity (its guest cold-booted with its own addresses).
    fn forget_inner_identity(&self, vm: &VmId) -> Result<(), StoreError>;
}

const SNAPSHOT_COLUMNS: &str = "id, customer_id, source_vm_id, state, backend, config_json, \
                                ipv6, ipv4, mac, bytes, created_at_ms";

impl SnapshotStore for Store {
    fn insert_snapshot_within(
        &self,
        snap: &SnapshotRecord,
        limits: &StoredLimits,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        if limits.snapshots.is_some() {
            let n: i64 = tx
                .row(
                    "SELECT COUNT(*) FROM snapshots WHERE customer_id = ?1",
                    params![snap.customer.as_str()],
                    |r| r.get(0),
                )
                .map_err(sql("count snapshots"))?;
            within(
                "UNKEY_METALD_QUOTA_SNAPSHOTS",
                count(n),
                1,
                limits.snapshots,
            )?;
        }
        let config = serde_json::to_string(&snap.config).map_err(|e| StoreError::Corrupt {
            id: snap.id.clone(),
            reason: format!("config does not serialize: {e}"),
        })?;
        tx.exec(
            "INSERT INTO snapshots (id, customer_id, source_vm_id, state, backend, config_json,
                                    ipv6, ipv4, mac, bytes, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                snap.id,
                snap.customer.as_str(),
                snap.source_vm.as_str(),
                snap.state.as_str(),
                snap.backend,
                config,
                snap.inner.as_ref().map(|i| i.ipv6.to_string()),
                snap.inner
                    .as_ref()
                    .and_then(|i| i.ipv4)
                    .map(|a| a.to_string()),
                snap.inner.as_ref().map(|i| i.mac.clone()),
                i64::try_from(snap.bytes).unwrap_or(i64::MAX),
                snap.created_at_ms,
            ],
        )
        .map_err(sql("insert snapshot"))?;
        tx.commit().map_err(sql("commit snapshot"))
    }

    fn finish_snapshot(
        &self,
        id: &str,
        bytes: u64,
        limits: &StoredLimits,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        if let Some(limit) = limits.disk_bytes {
            let used: i64 = tx
                .row(
                    "SELECT (SELECT COALESCE(SUM(disk_bytes), 0) FROM vms WHERE customer_id = c)
                          + (SELECT COALESCE(SUM(bytes), 0) FROM snapshots WHERE customer_id = c)
                     FROM (SELECT customer_id AS c FROM snapshots WHERE id = ?1)",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("sum disk"))?
                .unwrap_or(0);
            within(
                "UNKEY_METALD_QUOTA_DISK_MIB",
                count(used).div_ceil(crate::domain::MIB),
                bytes.div_ceil(crate::domain::MIB),
                Some(limit / crate::domain::MIB),
            )?;
        }
        tx.exec(
            "UPDATE snapshots SET state = ?2, bytes = ?3 WHERE id = ?1",
            params![
                id,
                SnapshotState::Ready.as_str(),
                i64::try_from(bytes).unwrap_or(i64::MAX)
            ],
        )
        .map_err(sql("finish snapshot"))?;
        tx.commit().map_err(sql("commit snapshot"))
    }

    fn get_snapshot(
        &self,
        customer: &CustomerId,
        id: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        self.conn()
            .row(
                &format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?1 AND customer_id = ?2"
                ),
                params![id, customer.as_str()],
                read_snapshot_row,
            )
            .optional()
            .map_err(sql("read snapshot"))?
            .transpose()
    }

    fn list_snapshots(&self, customer: &CustomerId) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE customer_id = ?1 ORDER BY seq"
            ))
            .map_err(sql("list snapshots"))?;
        let rows = stmt
            .query_map(params![customer.as_str()], read_snapshot_row)
            .map_err(sql("list snapshots"))?;
        rows.map(|r| r.map_err(sql("read snapshot")).and_then(|x| x))
            .collect()
    }

    fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots ORDER BY seq"
            ))
            .map_err(sql("list snapshots"))?;
        let rows = stmt
            .query_map([], read_snapshot_row)
            .map_err(sql("list snapshots"))?;
        rows.map(|r| r.map_err(sql("read snapshot")).and_then(|x| x))
            .collect()
    }

    fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .exec("DELETE FROM snapshots WHERE id = ?1", params![id])
            .map_err(sql("delete snapshot"))?;
        Ok(())
    }

    fn insert_clone_within(
        &self,
        vm: &VmRecord,
        plan: Option<&AllocationPlan>,
        disk_bytes: u64,
        limits: &StoredLimits,
        snapshot_id: &str,
        inner: Option<&InnerIdentity>,
    ) -> Result<VmRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let mut saved = insert_vm_tx(&tx, vm, plan, disk_bytes, limits)?;
        if let (Some(inner), Some(net)) = (inner, saved.net.as_mut()) {
            // The guest's MAC is in its memory: the clone's interface keeps it, so host-side
            // neighbour entries stay right across its later cold boots too.
            tx.exec(
                "UPDATE vm_network SET mac = ?2 WHERE vm_id = ?1",
                params![vm.id.as_str(), inner.mac],
            )
            .map_err(sql("record clone MAC"))?;
            net.mac = inner.mac.clone();
            tx.exec(
                "INSERT INTO vm_inner_identity (vm_id, snapshot_id, ipv6, ipv4, mac)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    vm.id.as_str(),
                    snapshot_id,
                    inner.ipv6.to_string(),
                    inner.ipv4.map(|a| a.to_string()),
                    inner.mac
                ],
            )
            .map_err(sql("record inner identity"))?;
        }
        tx.commit().map_err(sql("commit clone"))?;
        Ok(saved)
    }

    fn inner_identity(&self, vm: &VmId) -> Result<Option<InnerIdentity>, StoreError> {
        let row: Option<(String, Option<String>, String)> = self
            .conn()
            .row(
                "SELECT ipv6, ipv4, mac FROM vm_inner_identity WHERE vm_id = ?1",
                params![vm.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql("read inner identity"))?;
        let Some((ipv6, ipv4, mac)) = row else {
            return Ok(None);
        };
        parse_identity(Some(ipv6), ipv4, Some(mac)).map_err(|reason| StoreError::Corrupt {
            id: vm.to_string(),
            reason,
        })
    }

    fn forget_inner_identity(&self, vm: &VmId) -> Result<(), StoreError> {
        self.conn()
            .exec(
                "DELETE FROM vm_inner_identity WHERE vm_id = ?1",
                params![vm.as_str()],
            )
            .map_err(sql("forget inner identity"))?;
        Ok(())
    }
}

fn parse_identity(
    ipv6: Option<String>,
    ipv4: Option<String>,
    mac: Option<String>,
) -> Result<Option<InnerIdentity>, String> {
    let (Some(ipv6), Some(mac)) = (ipv6, mac) else {
        return Ok(None);
    };
    Ok(Some(InnerIdentity {
        ipv6: ipv6.parse().map_err(|_| format!("ipv6 {ipv6}"))?,
        ipv4: ipv4
            .map(|a| a.parse().map_err(|_| format!("ipv4 {a}")))
            .transpose()?,
        mac,
    }))
}

fn read_snapshot_row(row: &Row<'_>) -> rusqlite::Result<Result<SnapshotRecord, StoreError>> {
    let id: String = row.get(0)?;
    let customer: String = row.get(1)?;
    let source: String = row.get(2)?;
    let state: String = row.get(3)?;
    let config: String = row.get(5)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let parsed = (|| {
        Ok(SnapshotRecord {
            id: id.clone(),
            customer: customer.parse().map_err(|e| corrupt(format!("{e}")))?,
            source_vm: source.parse().map_err(|e| corrupt(format!("{e}")))?,
            state: SnapshotState::parse(&state).ok_or_else(|| corrupt(format!("state {state}")))?,
            backend: row.get(4).map_err(sql("read snapshot"))?,
            config: serde_json::from_str::<VmConfig>(&config)
                .map_err(|e| corrupt(format!("config: {e}")))?,
            inner: parse_identity(
                row.get(6).map_err(sql("read snapshot"))?,
                row.get(7).map_err(sql("read snapshot"))?,
                row.get(8).map_err(sql("read snapshot"))?,
            )
            .map_err(corrupt)?,
            bytes: count(row.get(9).map_err(sql("read snapshot"))?),
            created_at_ms: row.get(10).map_err(sql("read snapshot"))?,
        })
    })();
    Ok(parsed)
}
