//! The PostgreSQL store, [`PgStore`]: the same five traits as the SQLite [`crate::Store`], on a
//! database that several metald hosts may share.
//!
//! # One database, several hosts
//! Each store is opened with its host's id. What is a host's own resource is scoped to it:
//! VM rows carry the `host_id` of the store that inserted them, and
//! - [`all_vms`](crate::VmStore::all_vms) and [`count_by_state`](crate::VmStore::count_by_state)
//!   see this host's VMs only (start-up reconciliation and metrics are about the VMs whose
//!   processes run here);
//! - host capacity (the [`HostLimits`](crate::HostLimits) of
//!   [`reserve_run`](crate::VmStore::reserve_run), [`host_usage`](crate::VmStore::host_usage),
//!   [`release_all_runs`](crate::VmStore::release_all_runs)) counts this host's VMs;
//! - jail slots and addresses are numbered per host (the IPAM tables are keyed by host), and
//!   held allocations are freed per host;
//! - the billing outbox is drained per host (each host peeks, counts and deletes its own rows);
//! - snapshot rows carry the host that wrote their files:
//!   [`all_snapshots`](crate::SnapshotStore::all_snapshots) lists this host's.
//!
//! What belongs to a customer is fleet-wide: [`get_vm`](crate::VmStore::get_vm),
//! [`get_vm_unscoped`](crate::VmStore::get_vm_unscoped), [`list_vms`](crate::VmStore::list_vms),
//! the stored and running quotas (summed over every host), and
//! [`get_snapshot`](crate::SnapshotStore::get_snapshot) and
//! [`list_snapshots`](crate::SnapshotStore::list_snapshots). The asset catalog is the fleet's
//! (assets are addressed by content). Calls by VM id (update, delete, usage, billing cursor) act
//! on that VM wherever it lives: ids are unique fleet-wide.
//!
//! A VM's sequence number comes from a PostgreSQL sequence, taken at insert, not at commit: it
//! grows and is never reused, but with inserts committing out of order a page of
//! [`list_vms`](crate::VmStore::list_vms) read at that moment can pass a VM whose insert
//! commits just after it.
//!
//! # Concurrency
//! Transactions run at READ COMMITTED. What must not interleave takes row locks: an admission
//! locks the customer's `customer_owning` row and, for host capacity, the host's `host_owning`
//! row (`SELECT … FOR UPDATE`, created first if missing), then reads the sums kept by triggers
//! (`customer_holding`, `host_holding`, as SQLite's 0009 keeps them): a few rows however many VMs
//! exist. An IPAM allocation locks its host's `ipam_next` row per pool. Locks are taken in one
//! order (customer, host, IPAM); a deadlock or serialization failure (40P01, 40001) that happens
//! anyway is retried a bounded number of times.
//!
//! # Connections
//! See `pool.rs`: a few threads of the store's own each hold one connection, so the synchronous
//! client works when the store is called from inside tokio. A broken connection is made again
//! (a few paced attempts) and the call run again. An insert whose COMMIT may have gone through
//! before the connection broke, run again, takes a row with its (pre-generated) id and the same
//! content as its own and succeeds instead of failing as a duplicate; every other write is
//! idempotent when repeated (updates set values, deletes and outbox keys are idempotent).
//!
//! # Migrations
//! `crates/metald-store/migrations/pg/`, applied at open in one transaction under a
//! transaction-level advisory lock, so metalds starting together apply each once; the version
//! is kept in `schema_version`. A database newer than this binary is refused
//! ([`StoreError::TooNew`]).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::StoreError;

mod fleet;
mod pool;
mod tables;
mod vms;

use pool::Pool;

/// PostgreSQL migrations in order; index + 1 is the schema version each one produces.
pub(crate) const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/pg/0001_init.sql"),
    include_str!("../../migrations/pg/0002_hosts.sql"),
    include_str!("../../migrations/pg/0003_placement.sql"),
    include_str!("../../migrations/pg/0004_disks_durable.sql"),
];

/// Connections (and threads) per store.
const POOL_SIZE: usize = 4;

/// The advisory lock key that serializes migrations (any constant; "metald" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d65_7461_6c64;

/// The PostgreSQL-backed store of one host (see the module documentation).
pub struct PgStore {
    pool: Pool,
    host: Arc<str>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host/db`, or a Unix socket
    /// directory as `postgres:///db?host=/run/postgresql`) as host `host` and applies pending
    /// migrations.
    pub fn open(url: &str, host: &str) -> Result<Self, StoreError> {
        Self::open_with(url, host, None)
    }

    /// [`PgStore::open`] over TLS with `tls` (its roots: the CA the server's certificate
    /// chains to), for a database reached over a network; `None`: plain (a Unix socket, or a
    /// network the operator trusts). A URL with `sslmode=require` then fails to connect.
    pub fn open_with(
        url: &str,
        host: &str,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self, StoreError> {
        let mut config = postgres::Config::from_str(url).map_err(pg("parse database URL"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let tls = tls.map(tokio_postgres_rustls::MakeRustlsConnect::new);
        let store = Self {
            pool: Pool::start(config, tls, POOL_SIZE)?,
            host: Arc::from(host),
        };
        store.pool.run(|client, _| migrate(client))?;
        Ok(store)
    }

    /// The host id this store scopes host resources by.
    pub fn host(&self) -> &str {
        &self.host
    }
}

/// Applies pending migrations, one transaction, under the migration lock.
fn migrate(client: &mut postgres::Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(pg("begin"))?;
    // Held until this transaction ends: another metald migrating waits here, then finds the
    // versions this one applied.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg("lock migrations"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    BIGINT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .map_err(pg("create schema_version"))?;
    let version: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .and_then(|r| r.try_get(0))
        .map_err(pg("read schema version"))?;
    let known = MIGRATIONS.len() as i64;
    crate::not_newer(version, known)?;
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(migration).map_err(pg("migrate"))?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(i as i64 + 1)],
        )
        .map_err(pg("migrate"))?;
    }
    tx.commit().map_err(pg("commit migrations"))
}

fn pg(op: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { op, source }
}

/// A size as PostgreSQL's BIGINT (sizes past `i64::MAX` do not exist).
fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
