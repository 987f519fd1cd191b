//! Durable state in one embedded SQLite file (WAL): VMs and the asset catalog.
//!
//! Migrations live in `crates/metald-store/migrations/` and are applied in order at open, tracked by
//! SQLite's `user_version`.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::domain::{CustomerId, VmConfig, VmId, VmNet, VmRecord};
use crate::state::{VmLife, VmState};
use metald_domain::ipam::{lowest_free, mac_for, AllocationPlan, FIRST_VM_INDEX};
use metald_domain::usage::Counters;
use metald_domain::{domain, state};

pub mod assets;

/// Migrations in order; index + 1 is the schema version each one produces.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_network.sql"),
    include_str!("../migrations/0003_usage.sql"),
    include_str!("../migrations/0004_billing.sql"),
];

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused an operation.
    #[error("database {op}")]
    Sqlite {
        /// What was being done.
        op: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored row could not be understood.
    #[error("stored row for {id} is corrupt: {reason}")]
    Corrupt {
        /// The row's id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The database was written by a newer metald.
    #[error("database schema version {found} is newer than this metald knows ({known})")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Latest version this binary knows.
        known: i64,
    },
    /// Every slot or address of a pool is taken by a live VM.
    #[error("no free {0} left on this host")]
    Exhausted(&'static str),
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

/// Kinds of asset files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    /// A guest kernel (ELF vmlinux or bzImage).
    Kernel,
    /// An initial ramdisk.
    Initrd,
    /// A disk image (root filesystem or extra drive).
    Rootfs,
}

impl AssetKind {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            AssetKind::Kernel => "kernel",
            AssetKind::Initrd => "initrd",
            AssetKind::Rootfs => "rootfs",
        }
    }

    /// Parses a stable name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kernel" => Some(AssetKind::Kernel),
            "initrd" => Some(AssetKind::Initrd),
            "rootfs" => Some(AssetKind::Rootfs),
            _ => None,
        }
    }
}

/// One asset in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetRecord {
    /// The image id callers use.
    pub id: String,
    /// What it is.
    pub kind: AssetKind,
    /// File name under the asset directory.
    pub file_name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Hex sha256 of the content.
    pub sha256: String,
    /// For kernels: the initrd booted with it.
    pub initrd_id: Option<String>,
    /// For root filesystems: the console line that shows the guest is up.
    pub ready_marker: Option<String>,
    /// Import time, Unix milliseconds.
    pub created_at_ms: i64,
}

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

/// The SQLite-backed store. Calls are short and synchronous; one connection behind a mutex
/// is plenty for a per-host daemon and keeps writes serialized.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(sql("open"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql("enable foreign keys"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("set busy timeout"))?;
        migrate(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (statements are
        // atomic), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a new VM; returns it with its sequence number. With a `plan`, the VM also gets
    /// the lowest free jail slot, IPv6 (and IPv4) address, in the same transaction.
    pub fn insert_vm(
        &self,
        vm: &VmRecord,
        plan: Option<&AllocationPlan>,
    ) -> Result<VmRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        tx.execute(
            "INSERT INTO vms (id, customer_id, state, config_json, backend, created_at_ms,
                              updated_at_ms, vmm_pid, vmm_start_ticks, failure, guest_ready)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
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
            ],
        )
        .map_err(sql("insert vm"))?;
        let mut saved = vm.clone();
        saved.seq = tx.last_insert_rowid();
        if let Some(plan) = plan {
            saved.net = Some(allocate(&tx, &vm.id, plan)?);
        }
        tx.commit().map_err(sql("commit vm"))?;
        Ok(saved)
    }

    /// Writes a VM's mutable fields (state, process, failure, readiness).
    pub fn update_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE vms SET state = ?2, updated_at_ms = ?3, vmm_pid = ?4, vmm_start_ticks = ?5,
                            failure = ?6, guest_ready = ?7
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

    /// The customer's VM with this id, if it exists and is theirs.
    pub fn get_vm(&self, customer: &CustomerId, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM {VMS} WHERE id = ?1 AND customer_id = ?2"),
                params![id.as_str(), customer.as_str()],
                read_vm_row,
            )
            .optional()
            .map_err(sql("read vm"))?
            .transpose()
    }

    /// A VM by id whoever owns it (for metald's own bookkeeping, never for API callers).
    pub fn get_vm_unscoped(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM {VMS} WHERE id = ?1"),
                params![id.as_str()],
                read_vm_row,
            )
            .optional()
            .map_err(sql("read vm"))?
            .transpose()
    }

    /// Up to `limit` of the customer's VMs after sequence number `after_seq`, oldest first.
    pub fn list_vms(
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

    /// Every VM on this host (start-up reconciliation).
    pub fn all_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {VM_COLUMNS} FROM {VMS} ORDER BY seq"))
            .map_err(sql("list all vms"))?;
        let rows = stmt
            .query_map([], read_vm_row)
            .map_err(sql("list all vms"))?;
        collect_vm_rows(rows)
    }

    /// Records a VM's usage totals of finished runs and, while a run is counted, where its
    /// counters started.
    pub fn save_usage(
        &self,
        id: &VmId,
        carried: &Counters,
        base: Option<&Counters>,
    ) -> Result<(), StoreError> {
        let json = |c: &Counters| {
            serde_json::to_string(c).map_err(|e| StoreError::Corrupt {
                id: id.to_string(),
                reason: format!("usage does not serialize: {e}"),
            })
        };
        let base = base.map(json).transpose()?;
        self.conn()
            .execute(
                "INSERT INTO vm_usage (vm_id, carried_json, base_json) VALUES (?1, ?2, ?3)
                 ON CONFLICT (vm_id) DO UPDATE SET carried_json = ?2, base_json = ?3",
                params![id.as_str(), json(carried)?, base],
            )
            .map_err(sql("save usage"))?;
        Ok(())
    }

    /// A VM's saved usage: (carried, base of the running VMM's run).
    pub fn load_usage(
        &self,
        id: &VmId,
    ) -> Result<Option<(Counters, Option<Counters>)>, StoreError> {
        let row: Option<(String, Option<String>)> = self
            .conn()
            .query_row(
                "SELECT carried_json, base_json FROM vm_usage WHERE vm_id = ?1",
                params![id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("load usage"))?;
        let parse = |t: &str| {
            serde_json::from_str::<Counters>(t).map_err(|e| StoreError::Corrupt {
                id: id.to_string(),
                reason: format!("usage: {e}"),
            })
        };
        match row {
            None => Ok(None),
            Some((c, b)) => Ok(Some((parse(&c)?, b.as_deref().map(parse).transpose()?))),
        }
    }

    /// A VM's billing cursor: (end of the last interval queued, totals there, batch number).
    pub fn billing_cursor(&self, id: &VmId) -> Result<Option<(i64, Counters, u64)>, StoreError> {
        let row: Option<(i64, String, i64)> = self
            .conn()
            .query_row(
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

    /// Queues outbox rows and moves the VM's cursor, atomically.
    pub fn enqueue_billing(
        &self,
        rows: &[OutboxRow],
        cursor: Option<(&VmId, i64, &Counters, u64)>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("begin"))?;
        for r in rows {
            tx.execute(
                "INSERT OR IGNORE INTO billing_outbox (key, kind, vm_id, customer_id, payload_json, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.key, r.kind, r.vm_id, r.customer_id, r.payload_json, crate::domain::now_ms()],
            )
            .map_err(sql("queue billing"))?;
        }
        if let Some((vm, last_ms, total, seq)) = cursor {
            let json = serde_json::to_string(total).map_err(|e| StoreError::Corrupt {
                id: vm.to_string(),
                reason: format!("billing cursor: {e}"),
            })?;
            tx.execute(
                "INSERT INTO billing_cursor (vm_id, last_ms, last_total_json, seq) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (vm_id) DO UPDATE SET last_ms = ?2, last_total_json = ?3, seq = ?4",
                params![vm.as_str(), last_ms, json, seq as i64],
            )
            .map_err(sql("move billing cursor"))?;
        }
        tx.commit().map_err(sql("commit billing"))
    }

    /// The oldest `limit` outbox rows.
    pub fn outbox_peek(&self, limit: u32) -> Result<Vec<(i64, OutboxRow)>, StoreError> {
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

    /// Removes an acknowledged outbox row.
    pub fn outbox_delete(&self, id: i64) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM billing_outbox WHERE id = ?1", params![id])
            .map_err(sql("delete outbox row"))?;
        Ok(())
    }

    /// Rows waiting in the outbox.
    pub fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM billing_outbox", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(sql("count outbox"))
    }

    /// Number of VMs per state (states with none are left out).
    pub fn count_by_state(&self) -> Result<Vec<(VmState, u64)>, StoreError> {
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

    /// Removes a VM's row.
    pub fn delete_vm(&self, id: &VmId) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM vms WHERE id = ?1", params![id.as_str()])
            .map_err(sql("delete vm"))?;
        Ok(())
    }

    /// Adds an asset to the catalog.
    pub fn insert_asset(&self, a: &AssetRecord) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO assets (id, kind, file_name, size_bytes, sha256, initrd_id,
                                     ready_marker, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    a.id,
                    a.kind.as_str(),
                    a.file_name,
                    a.size_bytes as i64,
                    a.sha256,
                    a.initrd_id,
                    a.ready_marker,
                    a.created_at_ms
                ],
            )
            .map_err(sql("insert asset"))?;
        Ok(())
    }

    /// One asset by id.
    pub fn get_asset(&self, id: &str) -> Result<Option<AssetRecord>, StoreError> {
        self.conn()
            .query_row(
                &format!("SELECT {ASSET_COLUMNS} FROM assets WHERE id = ?1"),
                params![id],
                read_asset_row,
            )
            .optional()
            .map_err(sql("read asset"))?
            .transpose()
    }

    /// The whole catalog, by id.
    pub fn list_assets(&self) -> Result<Vec<AssetRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {ASSET_COLUMNS} FROM assets ORDER BY id"))
            .map_err(sql("list assets"))?;
        let rows = stmt
            .query_map([], read_asset_row)
            .map_err(sql("list assets"))?;
        rows.map(|r| r.map_err(sql("list assets")).and_then(|x| x))
            .collect()
    }

    /// Removes an asset row.
    pub fn delete_asset(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM assets WHERE id = ?1", params![id])
            .map_err(sql("delete asset"))?;
        Ok(())
    }

    /// Ids of assets (kernels) that name `id` as their initrd.
    pub fn assets_using_initrd(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id FROM assets WHERE initrd_id = ?1 ORDER BY id")
            .map_err(sql("find initrd users"))?;
        let rows = stmt
            .query_map(params![id], |r| r.get::<_, String>(0))
            .map_err(sql("find initrd users"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("find initrd users"))
    }
}

const VM_COLUMNS: &str = "seq, id, customer_id, state, config_json, backend, created_at_ms, \
                          updated_at_ms, vmm_pid, vmm_start_ticks, failure, guest_ready, \
                          slot, ipv6, ipv4, mac";
/// Every VM query reads its allocation with it.
const VMS: &str = "vms LEFT JOIN vm_network ON vm_network.vm_id = vms.id";

/// Picks the lowest free slot and addresses for `vm` and records them (inside the caller's
/// transaction, under the store's lock, so nobody else can pick the same ones).
fn allocate(
    tx: &rusqlite::Transaction<'_>,
    vm: &VmId,
    plan: &AllocationPlan,
) -> Result<VmNet, StoreError> {
    let used = |column: &str| -> Result<Vec<u64>, StoreError> {
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {column} FROM vm_network WHERE {column} IS NOT NULL ORDER BY {column}"
            ))
            .map_err(sql("read allocations"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(sql("read allocations"))?;
        rows.map(|r| r.map(|v| v as u64).map_err(sql("read allocations")))
            .collect()
    };
    let exhausted = |what: &'static str| StoreError::Exhausted(what);
    let slot = lowest_free(&used("slot")?, 0, u64::from(plan.slots).saturating_sub(1))
        .ok_or(exhausted("jail uid/gid slots"))?;
    let ip6_index = lowest_free(&used("ip6_index")?, FIRST_VM_INDEX, plan.ipv6.last_index())
        .ok_or(exhausted("IPv6 addresses"))?;
    let ip4_index = match &plan.ipv4 {
        Some(s) => Some(
            lowest_free(&used("ip4_index")?, FIRST_VM_INDEX, s.last_index())
                .ok_or(exhausted("IPv4 addresses"))?,
        ),
        None => None,
    };
    let net = VmNet {
        slot: slot as u32,
        ipv6: plan.ipv6.at(ip6_index),
        ipv4: plan.ipv4.zip(ip4_index).map(|(s, i)| s.at(i)),
        mac: mac_for(vm),
    };
    tx.execute(
        "INSERT INTO vm_network (vm_id, slot, ip6_index, ipv6, ip4_index, ipv4, mac)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            vm.as_str(),
            slot as i64,
            ip6_index as i64,
            net.ipv6.to_string(),
            ip4_index.map(|i| i as i64),
            net.ipv4.map(|a| a.to_string()),
            net.mac,
        ],
    )
    .map_err(sql("record allocation"))?;
    Ok(net)
}
const ASSET_COLUMNS: &str =
    "id, kind, file_name, size_bytes, sha256, initrd_id, ready_marker, created_at_ms";

fn config_json(vm: &VmRecord) -> Result<String, StoreError> {
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

fn read_asset_row(row: &Row<'_>) -> rusqlite::Result<Result<AssetRecord, StoreError>> {
    let id: String = row.get(0)?;
    let kind: String = row.get(1)?;
    let Some(kind) = AssetKind::parse(&kind) else {
        return Ok(Err(StoreError::Corrupt {
            id,
            reason: format!("asset kind {kind}"),
        }));
    };
    Ok(Ok(AssetRecord {
        id,
        kind,
        file_name: row.get(2)?,
        size_bytes: row.get::<_, i64>(3)? as u64,
        sha256: row.get(4)?,
        initrd_id: row.get(5)?,
        ready_marker: row.get(6)?,
        created_at_ms: row.get(7)?,
    }))
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("read schema version"))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            found: version,
            known,
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        // Each migration and its version bump commit together, so a crash never half-applies one.
        let batch = format!(
            "BEGIN; {migration}\nPRAGMA user_version = {}; COMMIT;",
            i + 1
        );
        conn.execute_batch(&batch).map_err(sql("migrate"))?;
    }
    Ok(())
}

/// Records for other modules' tests.
/// Records for other crates' unit tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
// Test builders: a literal that does not parse is a bug in the calling test.
#[allow(clippy::unwrap_used)]
pub mod testing {
    use super::*;
    use std::collections::BTreeMap;

    /// A VM record owned by `customer`, in `state`.
    pub fn record(customer: &str, state: VmState) -> VmRecord {
        VmRecord {
            id: VmId::generate(),
            customer: customer.parse().unwrap(),
            life: VmLife::restore(state, None, None, None, false),
            config: VmConfig {
                vcpu_count: 1,
                memory_bytes: 128 << 20,
                kernel_image_id: "k".into(),
                rootfs_image_id: "r".into(),
                drives: vec![],
                kernel_args: String::new(),
                metadata: BTreeMap::from([("team".into(), "a".into())]),
                network: Default::default(),
            },
            backend: "qemu".into(),
            created_at_ms: 1,
            updated_at_ms: 1,
            seq: 0,
            net: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::record;
    use super::*;

    #[test]
    fn allocations_are_unique_lowest_free_freed_on_delete_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let plan = AllocationPlan {
            slots: 3,
            ipv6: "fd00:1::/64".parse().unwrap(),
            ipv4: Some("10.9.0.0/29".parse().unwrap()),
        };
        let store = Store::open(&path).unwrap();
        let a = store
            .insert_vm(&record("a", VmState::Created), Some(&plan))
            .unwrap();
        let b = store
            .insert_vm(&record("b", VmState::Created), Some(&plan))
            .unwrap();
        let (na, nb) = (a.net.clone().unwrap(), b.net.clone().unwrap());
        assert_eq!(
            (na.slot, na.ipv6.to_string(), na.ipv4.unwrap().to_string()),
            (0, "fd00:1::2".into(), "10.9.0.2".into())
        );
        assert_eq!(
            (nb.slot, nb.ipv6.to_string(), nb.ipv4.unwrap().to_string()),
            (1, "fd00:1::3".into(), "10.9.0.3".into())
        );
        assert_eq!(na.mac, mac_for(&a.id));
        // Read back with the VM, scoped or not.
        assert_eq!(
            store.get_vm(&a.customer, &a.id).unwrap().unwrap().net,
            Some(na.clone())
        );
        // Deleting frees the lowest slot and addresses for the next VM.
        store.delete_vm(&a.id).unwrap();
        let c = store
            .insert_vm(&record("c", VmState::Created), Some(&plan))
            .unwrap();
        assert_eq!(c.net.as_ref().unwrap().ipv6, na.ipv6);
        assert_eq!(c.net.as_ref().unwrap().slot, 0);
        drop(store);
        // Survives a restart; a full pool is an error and records nothing.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get_vm_unscoped(&b.id).unwrap().unwrap().net, Some(nb));
        store
            .insert_vm(&record("d", VmState::Created), Some(&plan))
            .unwrap();
        let full = record("e", VmState::Created);
        let err = store.insert_vm(&full, Some(&plan)).unwrap_err();
        assert!(
            matches!(err, StoreError::Exhausted("jail uid/gid slots")),
            "{err}"
        );
        assert!(
            store.get_vm_unscoped(&full.id).unwrap().is_none(),
            "rolled back"
        );
    }

    #[test]
    fn vms_are_scoped_paged_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metald.db");
        let a: CustomerId = "a".parse().unwrap();
        let b: CustomerId = "b".parse().unwrap();
        let ids: Vec<VmRecord> = {
            let store = Store::open(&path).unwrap();
            let mut saved = vec![];
            for _ in 0..3 {
                saved.push(
                    store
                        .insert_vm(&record("a", VmState::Created), None)
                        .unwrap(),
                );
            }
            store
                .insert_vm(&record("b", VmState::Running), None)
                .unwrap();
            let mut running = saved[1].clone();
            running.life = VmLife::restore(VmState::Running, Some(42), None, None, false);
            store.update_vm(&running).unwrap();
            saved[1] = running;
            saved
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get_vm(&a, &ids[1].id).unwrap().unwrap(), ids[1]);
        assert_eq!(store.get_vm(&b, &ids[1].id).unwrap(), None);
        let page1 = store.list_vms(&a, None, 0, 2).unwrap();
        assert_eq!(page1.len(), 2);
        let page2 = store.list_vms(&a, None, page1[1].seq, 2).unwrap();
        assert_eq!(page2, vec![ids[2].clone()]);
        let running = store.list_vms(&a, Some(VmState::Running), 0, 10).unwrap();
        assert_eq!(running, vec![ids[1].clone()]);
        assert_eq!(store.list_vms(&b, None, 0, 10).unwrap().len(), 1);
        store.delete_vm(&ids[0].id).unwrap();
        assert_eq!(store.get_vm(&a, &ids[0].id).unwrap(), None);
        assert_eq!(store.all_vms().unwrap().len(), 3);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metald.db");
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
