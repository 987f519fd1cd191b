//! The `vms` table (read with its `vm_network` allocation): VM records, scoped by customer
//! for API callers.

use std::collections::BTreeMap;

use crate::Cached as _;
use rusqlite::{params, OptionalExtension, Row};

use crate::domain::{BackendKind, CustomerId, VmConfig, VmId, VmNet, VmRecord, MIB};
use crate::ipam::allocate;
use crate::state::{VmLife, VmState};
use crate::{
    sql, within, HostLimits, HostUsage, RunLimits, Shortage, Store, StoreError, StoredLimits,
};
use metald_domain::ipam::AllocationPlan;

/// VM records and, with them, each VM's jail slot and addresses.
///
/// Allocation is part of [`VmStore::insert_vm`] rather than a trait of its own: the addresses
/// must commit with the VM and go with its delete, so no caller ever holds an address without
/// a VM or races another create for one.
pub trait VmStore: Send + Sync {
    /// Inserts a new VM; returns it with its sequence number, greater than any VM's before it
    /// and never reused. With a `plan`, the VM also gets the lowest free jail slot, IPv6 (and
    /// IPv4) address, atomically with the insert: no two stored VMs share one, and a full pool
    /// is [`StoreError::Exhausted`] with nothing stored. A VM id already stored is refused.
    fn insert_vm(
        &self,
        vm: &VmRecord,
        plan: Option<&AllocationPlan>,
    ) -> Result<VmRecord, StoreError> {
        self.insert_vm_within(vm, plan, 0, &StoredLimits::default())
    }

    /// [`VmStore::insert_vm`] of a VM whose writable disks take `disk_bytes`, refused with
    /// [`StoreError::QuotaExceeded`] (nothing stored) when the customer's VMs, or their
    /// writable disks with this VM's, would exceed `limits`. The sums and the insert are one
    /// transaction: concurrent inserts never take a customer past a limit.
    fn insert_vm_within(
        &self,
        vm: &VmRecord,
        plan: Option<&AllocationPlan>,
        disk_bytes: u64,
        limits: &StoredLimits,
    ) -> Result<VmRecord, StoreError>;

    /// Writes a VM's mutable fields (state, process, failure, readiness, update time); the
    /// rest is fixed at insert. A VM that is not stored stays not stored, without error.
    fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError>;

    /// The customer's VM with this id, if it exists and is theirs (another customer's VM is
    /// indistinguishable from a missing one).
    fn get_vm(&self, customer: &CustomerId, id: &VmId) -> Result<Option<VmRecord>, StoreError>;

    /// A VM by id whoever owns it (for metald's own bookkeeping, never for API callers).
    fn get_vm_unscoped(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError>;

    /// Up to `limit` of the customer's VMs (in `state`, if given) after sequence number
    /// `after_seq`, oldest first.
    fn list_vms(
        &self,
        customer: &CustomerId,
        state: Option<VmState>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<VmRecord>, StoreError>;

    /// Every VM on this host, oldest first (start-up reconciliation).
    fn all_vms(&self) -> Result<Vec<VmRecord>, StoreError>;

    /// Number of VMs per state (states with none are left out).
    fn count_by_state(&self) -> Result<Vec<(VmState, u64)>, StoreError>;

    /// Admits a boot of `vm` against the customer's running quotas and the host's capacity:
    /// with it, the customer's VMs that run, are paused or are being booted, their vCPUs and
    /// their memory must stay within `limits` ([`StoreError::QuotaExceeded`] otherwise), and
    /// every customer's such VMs within `host` ([`StoreError::HostExhausted`]). Host memory
    /// counts each VM's guest memory plus the headroom of the backend it names (`vm.backend`
    /// for this boot). Admitted, the VM counts as being booted until [`VmStore::update_vm`]
    /// saves it or [`VmStore::release_run`] drops it. Count and mark are one transaction:
    /// concurrent boots never take a customer past a limit nor the host past its capacity.
    /// With no limit and no bound at all, nothing is counted or marked.
    fn reserve_run(
        &self,
        vm: &VmRecord,
        limits: &RunLimits,
        host: &HostLimits,
    ) -> Result<(), StoreError>;

    /// What this host's VMs hold now (reservations included).
    fn host_usage(&self) -> Result<HostUsage, StoreError>;

    /// Drops a boot's reservation (the boot failed).
    fn release_run(&self, id: &VmId) -> Result<(), StoreError>;

    /// Drops every reservation (at start: no boot outlives metald).
    fn release_all_runs(&self) -> Result<(), StoreError>;

    /// Removes a VM with its allocation (free for the next VM), usage and billing cursor; its
    /// outbox rows stay, as the usage in them is still owed. A missing VM is not an error.
    fn delete_vm(&self, id: &VmId) -> Result<(), StoreError>;

    /// Removes a VM like [`VmStore::delete_vm`], but its jail slot and addresses stay taken
    /// until [`VmStore::free_held_allocation`]: its network and jail are still being removed.
    fn delete_vm_holding_allocation(&self, id: &VmId) -> Result<(), StoreError>;

    /// Frees what [`VmStore::delete_vm_holding_allocation`] held for `id`.
    fn free_held_allocation(&self, id: &VmId) -> Result<(), StoreError>;

    /// Frees every held allocation (at start, once every leftover of deleted VMs is swept).
    fn free_held_allocations(&self) -> Result<u64, StoreError>;

    /// Records that the VM's own disk copies are on stable storage. A new VM's copies are not
    /// (they are synced in the background, off the boot path). A missing VM is not an error.
    fn set_disks_durable(&self, id: &VmId) -> Result<(), StoreError>;

    /// This host's VMs whose disk copies were never recorded on stable storage, oldest first
    /// (at start: metald stopped before it synced them).
    fn vms_with_undurable_disks(&self) -> Result<Vec<VmId>, StoreError>;
}

impl VmStore for Store {
    fn insert_vm_within(
        &self,
        vm: &VmRecord,
        plan: Option<&AllocationPlan>,
        disk_bytes: u64,
        limits: &StoredLimits,
    ) -> Result<VmRecord, StoreError> {
        let mut conn = self.conn();
        // IMMEDIATE: the write lock is taken before the sums, so no other writer (another
        // process on this file included) can insert between them and this insert.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let saved = insert_vm_tx(&tx, vm, plan, disk_bytes, limits)?;
        tx.commit().map_err(sql("commit vm"))?;
        Ok(saved)
    }

    fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.conn()
            .exec(
                "UPDATE vms SET state = ?2, updated_at_ms = ?3, vmm_pid = ?4, vmm_start_ticks = ?5,
                            failure = ?6, guest_ready = ?7, run_reserved = 0
                 WHERE id = ?1",
                params![
                    vm.id.as_str(),
                    vm.life.state().as_str(),
                    vm.updated_at_ms,
                    vm.life.vmm_pid(),
                    vm.life.vmm_start_ticks().map(|t| t as i64),
                    vm.life.failure(),
                    vm.life.guest_ready(),
                ],
            )
            .map_err(sql("update vm"))?;
        Ok(())
    }

    fn get_vm(&self, customer: &CustomerId, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        self.conn()
            .row(
                &format!("SELECT {VM_COLUMNS} FROM {VMS} WHERE id = ?1 AND customer_id = ?2"),
                params![id.as_str(), customer.as_str()],
                read_vm_row,
            )
            .optional()
            .map_err(sql("read vm"))?
            .transpose()
    }

    fn get_vm_unscoped(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        self.conn()
            .row(
                &format!("SELECT {VM_COLUMNS} FROM {VMS} WHERE id = ?1"),
                params![id.as_str()],
                read_vm_row,
            )
            .optional()
            .map_err(sql("read vm"))?
            .transpose()
    }

    fn list_vms(
        &self,
        customer: &CustomerId,
        state: Option<VmState>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<VmRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {VM_COLUMNS} FROM {VMS}
                 WHERE customer_id = ?1 AND seq > ?2 AND (?3 IS NULL OR state = ?3)
                 ORDER BY seq LIMIT ?4"
            ))
            .map_err(sql("list vms"))?;
        let rows = stmt
            .query_map(
                params![
                    customer.as_str(),
                    after_seq,
                    state.map(|s| s.as_str()),
                    limit
                ],
                read_vm_row,
            )
            .map_err(sql("list vms"))?;
        collect_vm_rows(rows)
    }

    fn all_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {VM_COLUMNS} FROM {VMS} ORDER BY seq"))
            .map_err(sql("list all vms"))?;
        let rows = stmt
            .query_map([], read_vm_row)
            .map_err(sql("list all vms"))?;
        collect_vm_rows(rows)
    }

    fn count_by_state(&self) -> Result<Vec<(VmState, u64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT state, COUNT(*) FROM vms GROUP BY state")
            .map_err(sql("count vms"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(sql("count vms"))?;
        let mut out = Vec::new();
        for row in rows {
            let (state, n) = row.map_err(sql("count vms"))?;
            let state = VmState::parse(&state).ok_or_else(|| StoreError::Corrupt {
                id: "vms".into(),
                reason: format!("state {state}"),
            })?;
            out.push((state, n as u64));
        }
        Ok(out)
    }

    fn reserve_run(
        &self,
        vm: &VmRecord,
        limits: &RunLimits,
        host: &HostLimits,
    ) -> Result<(), StoreError> {
        // Without a limit nobody counts reservations: a boot costs no write and no scan of the
        // VMs. Limits come from the configuration, and a restart clears every reservation, so
        // none is missing once a limit is set.
        if *limits == RunLimits::default() && *host == HostLimits::default() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        if *limits != RunLimits::default() {
            let mine = running(&tx, Some(&vm.customer), vm.id.as_str())?;
            mine.admit_quota(vm, limits)?;
        }
        if *host != HostLimits::default() {
            running(&tx, None, vm.id.as_str())?.admit_host(vm, host)?;
        }
        tx.exec(
            "UPDATE vms SET run_reserved = 1 WHERE id = ?1",
            params![vm.id.as_str()],
        )
        .map_err(sql("reserve run"))?;
        tx.commit().map_err(sql("commit run reservation"))
    }

    fn host_usage(&self) -> Result<HostUsage, StoreError> {
        let conn = self.conn();
        // No VM id is `-`: every VM counts.
        let run = running(&conn, None, "-")?;
        let (vms, disk) = owning(&conn, "")?;
        Ok(HostUsage {
            memory_bytes: run.memory_bytes,
            vcpus: run.vcpus,
            vms: count(vms),
            disk_bytes: count(disk),
        })
    }

    fn release_run(&self, id: &VmId) -> Result<(), StoreError> {
        self.conn()
            .exec(
                "UPDATE vms SET run_reserved = 0 WHERE id = ?1",
                params![id.as_str()],
            )
            .map_err(sql("release run"))?;
        Ok(())
    }

    fn release_all_runs(&self) -> Result<(), StoreError> {
        self.conn()
            .exec("UPDATE vms SET run_reserved = 0 WHERE run_reserved = 1", [])
            .map_err(sql("release runs"))?;
        Ok(())
    }

    fn delete_vm(&self, id: &VmId) -> Result<(), StoreError> {
        self.conn()
            .exec("DELETE FROM vms WHERE id = ?1", params![id.as_str()])
            .map_err(sql("delete vm"))?;
        Ok(())
    }

    fn delete_vm_holding_allocation(&self, id: &VmId) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        tx.exec(
            "INSERT OR REPLACE INTO held_allocations (vm_id, slot, ip6_index, ip4_index)
             SELECT vm_id, slot, ip6_index, ip4_index FROM vm_network WHERE vm_id = ?1",
            params![id.as_str()],
        )
        .map_err(sql("hold allocation"))?;
        tx.exec("DELETE FROM vms WHERE id = ?1", params![id.as_str()])
            .map_err(sql("delete vm"))?;
        tx.commit().map_err(sql("commit"))
    }

    fn free_held_allocation(&self, id: &VmId) -> Result<(), StoreError> {
        self.conn()
            .exec(
                "DELETE FROM held_allocations WHERE vm_id = ?1",
                params![id.as_str()],
            )
            .map_err(sql("free held allocation"))?;
        Ok(())
    }

    fn free_held_allocations(&self) -> Result<u64, StoreError> {
        let n = self
            .conn()
            .exec("DELETE FROM held_allocations", [])
            .map_err(sql("free held allocations"))?;
        Ok(n as u64)
    }

    fn set_disks_durable(&self, id: &VmId) -> Result<(), StoreError> {
        self.conn()
            .exec(
                "UPDATE vms SET disks_durable = 1 WHERE id = ?1",
                params![id.as_str()],
            )
            .map_err(sql("record disks durable"))?;
        Ok(())
    }

    fn vms_with_undurable_disks(&self) -> Result<Vec<VmId>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id FROM vms WHERE disks_durable = 0 ORDER BY seq")
            .map_err(sql("list vms with undurable disks"))?;
        let ids = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql("list vms with undurable disks"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("list vms with undurable disks"))?;
        ids.into_iter().map(|id| parse_vm_id(&id)).collect()
    }
}

/// A stored VM id, [`StoreError::Corrupt`] if it does not parse.
pub(crate) fn parse_vm_id(id: &str) -> Result<VmId, StoreError> {
    id.parse().map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        reason: format!("{e}"),
    })
}

/// How many VMs `customer` (every customer with `""`) has and the bytes of their writable
/// disks, from the `owning` sums the schema's triggers keep.
fn owning(conn: &rusqlite::Connection, customer: &str) -> Result<(i64, i64), StoreError> {
    Ok(conn
        .prepare_cached("SELECT vms, disk_bytes FROM owning WHERE customer_id = ?1")
        .map_err(sql("count vms"))?
        .query_row(params![customer], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(sql("count vms"))?
        .unwrap_or((0, 0)))
}

/// The insert of [`VmStore::insert_vm_within`] inside the caller's IMMEDIATE transaction (a
/// clone's insert adds its own rows to the same one).
pub(crate) fn insert_vm_tx(
    tx: &rusqlite::Transaction<'_>,
    vm: &VmRecord,
    plan: Option<&AllocationPlan>,
    disk_bytes: u64,
    limits: &StoredLimits,
) -> Result<VmRecord, StoreError> {
    if limits.vms.is_some() || limits.disk_bytes.is_some() {
        let (vms, vm_disk) = owning(tx, vm.customer.as_str())?;
        // A customer's snapshots take disk like their VMs do (a few rows: the snapshot quota
        // bounds them).
        let snapshot_bytes: i64 = tx
            .prepare_cached("SELECT COALESCE(SUM(bytes), 0) FROM snapshots WHERE customer_id = ?1")
            .map_err(sql("count snapshots"))?
            .query_row(params![vm.customer.as_str()], |r| r.get(0))
            .map_err(sql("count snapshots"))?;
        let disk = vm_disk.saturating_add(snapshot_bytes);
        within("UNKEY_METALD_QUOTA_VMS", count(vms), 1, limits.vms)?;
        // Compared in MiB, rounded up, as the quota is set and reported.
        within(
            "UNKEY_METALD_QUOTA_DISK_MIB",
            count(disk).div_ceil(MIB),
            disk_bytes.div_ceil(MIB),
            limits.disk_bytes.map(|b| b / MIB),
        )?;
    }
    tx.exec(
        "INSERT INTO vms (id, customer_id, state, config_json, backend, created_at_ms,
                          updated_at_ms, vmm_pid, vmm_start_ticks, failure, guest_ready,
                          disk_bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            vm.id.as_str(),
            vm.customer.as_str(),
            vm.life.state().as_str(),
            config_json(vm)?,
            vm.backend,
            vm.created_at_ms,
            vm.updated_at_ms,
            vm.life.vmm_pid(),
            vm.life.vmm_start_ticks().map(|t| t as i64),
            vm.life.failure(),
            vm.life.guest_ready(),
            i64::try_from(disk_bytes).unwrap_or(i64::MAX),
        ],
    )
    .map_err(sql("insert vm"))?;
    let mut saved = vm.clone();
    saved.seq = tx.last_insert_rowid();
    if let Some(plan) = plan {
        saved.net = Some(allocate(tx, &vm.id, plan)?);
    }
    Ok(saved)
}

/// A SQLite count or sum as a `u64` (they are never negative).
pub(crate) fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// What VMs that run, are paused or are being booted hold (both engines).
pub(crate) struct Running {
    pub(crate) vms: u64,
    pub(crate) vcpus: u64,
    pub(crate) guest_memory_bytes: u64,
    /// Guest memory plus each VMM's headroom.
    pub(crate) memory_bytes: u64,
}

impl Running {
    /// A boot of `vm` against the customer's running quotas `limits`, this being what the
    /// customer's other VMs hold.
    pub(crate) fn admit_quota(&self, vm: &VmRecord, limits: &RunLimits) -> Result<(), StoreError> {
        within("UNKEY_METALD_QUOTA_RUNNING_VMS", self.vms, 1, limits.vms)?;
        within(
            "UNKEY_METALD_QUOTA_RUNNING_VCPUS",
            self.vcpus,
            u64::from(vm.config.vcpu_count),
            limits.vcpus,
        )?;
        within(
            "UNKEY_METALD_QUOTA_RUNNING_MEMORY_MIB",
            self.guest_memory_bytes / MIB,
            vm.config.memory_bytes / MIB,
            limits.memory_bytes.map(|b| b / MIB),
        )
    }

    /// `vm` (with its VMM's headroom) against the host's `bounds`, this being what the host's
    /// other VMs hold.
    pub(crate) fn admit_host(&self, vm: &VmRecord, bounds: &HostLimits) -> Result<(), StoreError> {
        let asked = vm
            .config
            .memory_bytes
            .saturating_add(headroom_mib(&vm.backend) * MIB);
        Shortage::check(
            "memory",
            "MiB",
            MIB,
            self.memory_bytes,
            asked,
            bounds.memory_bytes,
        )?;
        Shortage::check(
            "vCPUs",
            "vCPUs",
            1,
            self.vcpus,
            u64::from(vm.config.vcpu_count),
            bounds.vcpus,
        )?;
        Ok(())
    }
}

impl From<BTreeMap<String, (i64, i64, i64)>> for Running {
    /// The totals of per-VMM (VMs, vCPUs, guest memory) sums, each VMM's headroom added.
    fn from(per_backend: BTreeMap<String, (i64, i64, i64)>) -> Self {
        let mut out = Running {
            vms: 0,
            vcpus: 0,
            guest_memory_bytes: 0,
            memory_bytes: 0,
        };
        for (backend, (vms, vcpus, memory)) in per_backend {
            let (vms, memory) = (count(vms), count(memory));
            out.vms = out.vms.saturating_add(vms);
            out.vcpus = out.vcpus.saturating_add(count(vcpus));
            out.guest_memory_bytes = out.guest_memory_bytes.saturating_add(memory);
            out.memory_bytes = out
                .memory_bytes
                .saturating_add(memory)
                .saturating_add(vms.saturating_mul(headroom_mib(&backend) * MIB));
        }
        out
    }
}

/// The VMs that run, are paused or are being booted, of `customer` (every customer's with
/// `None`), leaving out `except` (a VM asking again never counts itself twice). Read from the
/// `holding` sums the schema's triggers keep, plus `except`'s own row: a few rows whatever runs.
fn running(
    conn: &rusqlite::Connection,
    customer: Option<&CustomerId>,
    except: &str,
) -> Result<Running, StoreError> {
    let mut per_backend: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    let mut stmt = conn
        .prepare_cached(
            "SELECT backend, vms, vcpus, memory_bytes FROM holding WHERE customer_id = ?1",
        )
        .map_err(sql("count running vms"))?;
    let rows = stmt
        .query_map(params![customer.map_or("", |c| c.as_str())], |r| {
            Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .map_err(sql("count running vms"))?;
    for row in rows {
        let (backend, vms, vcpus, memory) = row.map_err(sql("count running vms"))?;
        per_backend.insert(backend, (vms, vcpus, memory));
    }
    let mut own = conn
        .prepare_cached(
            "SELECT backend, json_extract(config_json, '$.vcpu_count'),
                    json_extract(config_json, '$.memory_bytes')
             FROM vms
             WHERE id = ?1 AND (?2 IS NULL OR customer_id = ?2)
               AND (state IN ('RUNNING', 'PAUSED') OR run_reserved = 1)",
        )
        .map_err(sql("count running vms"))?;
    let mine = own
        .query_map(params![except, customer.map(|c| c.as_str())], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(sql("count running vms"))?;
    for row in mine {
        let (backend, vcpus, memory) = row.map_err(sql("count running vms"))?;
        if let Some(t) = per_backend.get_mut(&backend) {
            *t = (t.0 - 1, t.1 - vcpus, t.2 - memory);
        }
    }
    Ok(Running::from(per_backend))
}

/// The headroom of the VMM a VM names; a name this metald does not know counts as the largest,
/// so it never lets the host be overbooked.
pub(crate) fn headroom_mib(backend: &str) -> u64 {
    BackendKind::parse(backend).map_or(
        BackendKind::Qemu.memory_headroom_mib(),
        BackendKind::memory_headroom_mib,
    )
}

const VM_COLUMNS: &str = "seq, id, customer_id, state, config_json, backend, created_at_ms, \
                          updated_at_ms, vmm_pid, vmm_start_ticks, failure, guest_ready, \
                          slot, ipv6, ipv4, mac";
/// Every VM query reads its allocation with it.
const VMS: &str = "vms LEFT JOIN vm_network ON vm_network.vm_id = vms.id";

pub(crate) fn config_json(vm: &VmRecord) -> Result<String, StoreError> {
    serde_json::to_string(&vm.config).map_err(|e| StoreError::Corrupt {
        id: vm.id.to_string(),
        reason: format!("config does not serialize: {e}"),
    })
}

/// Reads one row; the outer `Result` is SQLite's, the inner one is ours (row contents).
fn read_vm_row(row: &Row<'_>) -> rusqlite::Result<Result<VmRecord, StoreError>> {
    let id: String = row.get(1)?;
    let customer: String = row.get(2)?;
    let state: String = row.get(3)?;
    let config: String = row.get(4)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        id: id.clone(),
        reason,
    };
    let parsed = (|| {
        Ok(VmRecord {
            seq: row.get(0).map_err(sql("read vm"))?,
            id: id.parse().map_err(|e| corrupt(format!("{e}")))?,
            customer: customer.parse().map_err(|e| corrupt(format!("{e}")))?,
            config: serde_json::from_str::<VmConfig>(&config)
                .map_err(|e| corrupt(format!("config: {e}")))?,
            backend: row.get(5).map_err(sql("read vm"))?,
            created_at_ms: row.get(6).map_err(sql("read vm"))?,
            updated_at_ms: row.get(7).map_err(sql("read vm"))?,
            life: VmLife::restore(
                VmState::parse(&state).ok_or_else(|| corrupt(format!("state {state}")))?,
                row.get(8).map_err(sql("read vm"))?,
                row.get::<_, Option<i64>>(9)
                    .map_err(sql("read vm"))?
                    .map(|t| t as u64),
                row.get(10).map_err(sql("read vm"))?,
                row.get(11).map_err(sql("read vm"))?,
            ),
            net: read_net(row).map_err(|e| corrupt(format!("network: {e}")))?,
        })
    })();
    Ok(parsed)
}

/// The allocation columns of a VM row (`None` for a VM created without a plan).
fn read_net(row: &Row<'_>) -> Result<Option<VmNet>, String> {
    let slot: Option<i64> = row.get(12).map_err(|e| e.to_string())?;
    let Some(slot) = slot else { return Ok(None) };
    let ipv6: String = row.get(13).map_err(|e| e.to_string())?;
    let ipv4: Option<String> = row.get(14).map_err(|e| e.to_string())?;
    Ok(Some(VmNet {
        slot: u32::try_from(slot).map_err(|e| e.to_string())?,
        ipv6: ipv6.parse().map_err(|_| format!("ipv6 {ipv6}"))?,
        ipv4: ipv4
            .map(|a| a.parse().map_err(|_| format!("ipv4 {a}")))
            .transpose()?,
        mac: row.get(15).map_err(|e| e.to_string())?,
    }))
}

fn collect_vm_rows(
    rows: impl Iterator<Item = rusqlite::Result<Result<VmRecord, StoreError>>>,
) -> Result<Vec<VmRecord>, StoreError> {
    rows.map(|r| r.map_err(sql("read vm")).and_then(|x| x))
        .collect()
}
