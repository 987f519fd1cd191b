//! Durable state: the store's interface, one trait per table ([`VmStore`], [`UsageStore`],
//! [`BillingStore`], [`AssetCatalog`], [`SnapshotStore`], [`FleetStore`], all of them together
//! [`StateStore`]), its SQLite implementation [`Store`] (one embedded file, WAL), its
//! PostgreSQL implementation [`PgStore`] (one database that several hosts may share, see
//! [`pg`]), and the asset file store ([`assets`]).
//!
//! Each table's trait and its SQLite code live in one module: `vms`, `ipam` (allocation inside
//! the VM insert), `usage`, `outbox` (billing outbox and cursors), `asset_records` and
//! `snapshots`; the PostgreSQL code of every table is in [`pg`]. The behaviour every
//! implementation must have is tested once, in `suite` (feature `testing`), which runs on SQLite
//! (`src/tests.rs`) and on PostgreSQL (`tests/postgres.rs`).
//!
//! Migrations live in `crates/metald-store/migrations/` and are applied in order at open,
//! tracked by SQLite's `user_version`; PostgreSQL's live in `migrations/pg/`, tracked in a
//! `schema_version` table.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

use metald_domain::{domain, state};

mod asset_records;
pub mod assets;
mod fleet;
mod ipam;
mod outbox;
pub mod pg;
mod snapshots;
mod usage;
mod vms;

#[cfg(any(test, feature = "testing"))]
pub mod suite;
#[cfg(test)]
mod tests;

pub use asset_records::{AssetCatalog, AssetKind, AssetRecord};
pub use fleet::FleetStore;
pub use outbox::{BillingStore, OutboxRow};
pub use pg::PgStore;
pub use snapshots::{InnerIdentity, SnapshotRecord, SnapshotState, SnapshotStore};
pub use usage::UsageStore;
pub use vms::VmStore;

/// Migrations in order; index + 1 is the schema version each one produces.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_network.sql"),
    include_str!("../migrations/0003_usage.sql"),
    include_str!("../migrations/0004_billing.sql"),
    include_str!("../migrations/0005_run_reservations.sql"),
    include_str!("../migrations/0006_disk_bytes.sql"),
    include_str!("../migrations/0007_asset_owner.sql"),
    include_str!("../migrations/0008_held_allocations.sql"),
    include_str!("../migrations/0009_totals.sql"),
    include_str!("../migrations/0010_free_numbers.sql"),
    include_str!("../migrations/0011_snapshots.sql"),
    include_str!("../migrations/0012_hosts.sql"),
    include_str!("../migrations/0013_disks_durable.sql"),
];

/// Per-customer limits on what runs at once (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunLimits {
    /// VMs running or paused.
    pub vms: Option<u64>,
    /// Their vCPUs.
    pub vcpus: Option<u64>,
    /// Their guest memory, in bytes.
    pub memory_bytes: Option<u64>,
}

/// Per-customer limits on what is stored, in any state (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredLimits {
    /// VMs.
    pub vms: Option<u64>,
    /// Their writable disks (root disk and writable drive copies) and their snapshots' files,
    /// in bytes.
    pub disk_bytes: Option<u64>,
    /// Snapshots.
    pub snapshots: Option<u64>,
}

/// What this host admits at boot, summed over every customer's VMs that run, are paused or are
/// being booted (`None`: no bound).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostLimits {
    /// Guest memory plus each VMM's headroom ([`BackendKind::memory_headroom_mib`]), in bytes.
    ///
    /// [`BackendKind::memory_headroom_mib`]: metald_domain::domain::BackendKind::memory_headroom_mib
    pub memory_bytes: Option<u64>,
    /// vCPUs.
    pub vcpus: Option<u64>,
}

/// What this host's VMs hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostUsage {
    /// Guest memory plus VMM headroom of the VMs that run, are paused or are being booted.
    pub memory_bytes: u64,
    /// Their vCPUs.
    pub vcpus: u64,
    /// VMs stored, in any state.
    pub vms: u64,
    /// Their writable disks, in bytes.
    pub disk_bytes: u64,
}

/// A host resource a call would take past its capacity; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host {resource} exhausted: {used} {unit} in use, {asked} {unit} asked, capacity {capacity} {unit}")]
pub struct Shortage {
    /// The resource: `memory`, `vCPUs`, `disk`.
    pub resource: &'static str,
    /// The unit the figures are in.
    pub unit: &'static str,
    /// What is held now.
    pub used: u64,
    /// What the refused call would have added.
    pub asked: u64,
    /// What the host admits.
    pub capacity: u64,
}

impl Shortage {
    /// `used + asked` against `capacity` (all in bytes, or all counts), reported in units of
    /// `scale` (1 for counts, [`MIB`](domain::MIB) for bytes shown in MiB).
    pub fn check(
        resource: &'static str,
        unit: &'static str,
        scale: u64,
        used: u64,
        asked: u64,
        capacity: Option<u64>,
    ) -> Result<(), Shortage> {
        match capacity {
            Some(capacity) if used.saturating_add(asked) > capacity => Err(Shortage {
                resource,
                unit,
                used: used.div_ceil(scale),
                asked: asked.div_ceil(scale),
                capacity: capacity / scale,
            }),
            _ => Ok(()),
        }
    }
}

/// `used + asked` against `limit`, as a quota error naming `quota`.
fn within(
    quota: &'static str,
    used: u64,
    asked: u64,
    limit: Option<u64>,
) -> Result<(), StoreError> {
    match limit {
        Some(limit) if used.saturating_add(asked) > limit => Err(StoreError::QuotaExceeded {
            quota,
            used,
            asked,
            limit,
        }),
        _ => Ok(()),
    }
}

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
    /// PostgreSQL refused an operation, or the connection to it failed.
    #[error("database {op}")]
    Postgres {
        /// What was being done.
        op: &'static str,
        /// The client's error.
        #[source]
        source: postgres::Error,
    },
    /// A thread for a PostgreSQL connection could not be started.
    #[error("starting a database connection thread")]
    PgWorker {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The PostgreSQL store's connection threads are gone (one panicked running the call).
    #[error("database connection threads are gone")]
    PgWorkersGone,
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
    /// The host has no room for a boot; nothing was reserved.
    #[error(transparent)]
    HostExhausted(#[from] Shortage),
    /// The customer would exceed a quota; nothing was stored.
    #[error("quota {quota} exceeded: {used} in use, {asked} more asked, limit {limit}")]
    QuotaExceeded {
        /// The quota's name, as its variable says it.
        quota: &'static str,
        /// What the customer holds now.
        used: u64,
        /// What the refused call would have added.
        asked: u64,
        /// The limit.
        limit: u64,
    },
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

/// The whole store: every table's trait. The daemon needs all of them; a part of it that
/// needs one table names that table's trait instead.
pub trait StateStore:
    VmStore + UsageStore + BillingStore + AssetCatalog + SnapshotStore + FleetStore
{
}

impl<
        T: VmStore + UsageStore + BillingStore + AssetCatalog + SnapshotStore + FleetStore + ?Sized,
    > StateStore for T
{
}

/// The SQLite-backed store. Calls are short and synchronous; one connection behind a mutex
/// is plenty for a per-host daemon and keeps writes serialized.
pub struct Store {
    conn: Mutex<Connection>,
}

/// Statements kept parsed per connection: more than the store has.
const STATEMENT_CACHE: usize = 128;

/// `execute` and `query_row` through the connection's statement cache: SQLite parses a
/// statement once per connection instead of at every call (parsing was 7 % of metald's CPU
/// during 1000 boots, `perf` with frame pointers).
pub(crate) trait Cached {
    /// [`Connection::execute`], with the statement cached.
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    /// [`Connection::query_row`], with the statement cached.
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
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
        // Room for every statement the store runs ([`Cached`]).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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
}

/// A database at schema `found` is refused by a binary that knows `known` versions if it is
/// newer: its data may mean what this binary cannot read.
pub(crate) fn not_newer(found: i64, known: i64) -> Result<(), StoreError> {
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    Ok(())
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("read schema version"))?;
    let known = MIGRATIONS.len() as i64;
    not_newer(version, known)?;
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

/// Records for other crates' unit tests (feature `testing`).
#[cfg(any(test, feature = "testing"))]
// Test builders: a literal that does not parse is a bug in the calling test.
#[allow(clippy::unwrap_used)]
pub mod testing {
    pub mod pg;

    use std::collections::BTreeMap;

    use crate::domain::{VmConfig, VmId, VmRecord};
    use crate::state::{VmLife, VmState};

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
