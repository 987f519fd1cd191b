//! `billaged`: a small reference implementation of `billing.v1.BillingService` that stores what
//! it receives in its own SQLite file and de-duplicates by idempotency key, so metald's retries
//! never count anything twice. metald's tests run it; operators can read it as the contract.
//!
//! Tables: `batches` (one row per key) and `metrics` (one row per interval), `gaps`, `events`,
//! `heartbeats` and `heartbeat_vms` (which VMs each heartbeat listed as running).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use clap::Parser;
use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use metald_proto::billing::v1::{self as pb, BillingServiceExt};
use rusqlite::{params, Connection};

#[derive(Parser)]
#[command(
    name = "billaged",
    version,
    about = "Reference billing service for metald"
)]
struct Cli {
    /// Listen address.
    #[arg(long, env = "BILLAGED_ADDRESS", default_value = "127.0.0.1:9090")]
    address: SocketAddr,
    /// SQLite file.
    #[arg(long, env = "BILLAGED_DB", default_value = "billaged.db")]
    db: PathBuf,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS batches (
    key TEXT PRIMARY KEY, vm_id TEXT NOT NULL, customer_id TEXT NOT NULL, received_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    key TEXT NOT NULL REFERENCES batches (key), idx INTEGER NOT NULL, vm_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL, cpu_time_nanos INTEGER NOT NULL, memory_usage_bytes INTEGER NOT NULL,
    disk_read_bytes INTEGER NOT NULL, disk_write_bytes INTEGER NOT NULL,
    network_rx_bytes INTEGER NOT NULL, network_tx_bytes INTEGER NOT NULL,
    reconstructed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, idx));
CREATE TABLE IF NOT EXISTS gaps (
    key TEXT PRIMARY KEY, vm_id TEXT NOT NULL, last_sent INTEGER NOT NULL, resume_time INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, vm_id TEXT NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeats (
    instance_id TEXT NOT NULL, active_vms INTEGER NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeat_vms (
    instance_id TEXT NOT NULL, at INTEGER NOT NULL, vm_id TEXT NOT NULL);
";

struct Billing {
    db: Mutex<Connection>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn internal(e: rusqlite::Error) -> ConnectError {
    ConnectError::internal(format!("database: {e}"))
}

fn need_key(key: &str) -> Result<(), ConnectError> {
    if key.is_empty() {
        Err(ConnectError::invalid_argument("idempotency_key: required"))
    } else {
        Ok(())
    }
}

impl Billing {
    fn db(&self) -> MutexGuard<'_, Connection> {
        // Statements are atomic; a poisoned lock leaves nothing half-written.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[allow(refining_impl_trait)]
impl pb::BillingService for Billing {
    async fn send_metrics_batch(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::SendMetricsBatchRequest>,
    ) -> ServiceResult<pb::SendMetricsBatchResponse> {
        need_key(req.idempotency_key)?;
        let mut db = self.db();
        let tx = db.transaction().map_err(internal)?;
        let inserted = tx
            .execute(
                "INSERT OR IGNORE INTO batches (key, vm_id, customer_id, received_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![req.idempotency_key, req.vm_id, req.customer_id, now_ms()],
            )
            .map_err(internal)?;
        if inserted == 1 {
            for (i, m) in req.metrics.iter().enumerate() {
                tx.execute(
                    "INSERT INTO metrics VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![
                        req.idempotency_key,
                        i as i64,
                        req.vm_id,
                        m.timestamp,
                        m.cpu_time_nanos as i64,
                        m.memory_usage_bytes as i64,
                        m.disk_read_bytes as i64,
                        m.disk_write_bytes as i64,
                        m.network_rx_bytes as i64,
                        m.network_tx_bytes as i64,
                        m.reconstructed,
                    ],
                )
                .map_err(internal)?;
            }
        }
        tx.commit().map_err(internal)?;
        Response::ok(pb::SendMetricsBatchResponse {
            duplicate: inserted == 0,
            ..Default::default()
        })
    }

    async fn send_heartbeat(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::SendHeartbeatRequest>,
    ) -> ServiceResult<pb::SendHeartbeatResponse> {
        let mut db = self.db();
        let tx = db.transaction().map_err(internal)?;
        let at = now_ms();
        tx.execute(
            "INSERT INTO heartbeats VALUES (?1, ?2, ?3)",
            params![req.instance_id, req.active_vms.len() as i64, at],
        )
        .map_err(internal)?;
        for vm in req.active_vms.iter() {
            tx.execute(
                "INSERT INTO heartbeat_vms VALUES (?1, ?2, ?3)",
                params![req.instance_id, at, vm],
            )
            .map_err(internal)?;
        }
        tx.commit().map_err(internal)?;
        Response::ok(pb::SendHeartbeatResponse::default())
    }

    async fn notify_vm_started(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::NotifyVmStartedRequest>,
    ) -> ServiceResult<pb::NotifyVmStartedResponse> {
        need_key(req.idempotency_key)?;
        self.db()
            .execute(
                "INSERT OR IGNORE INTO events VALUES (?1, 'started', ?2, ?3)",
                params![req.idempotency_key, req.vm_id, req.start_time],
            )
            .map_err(internal)?;
        Response::ok(pb::NotifyVmStartedResponse::default())
    }

    async fn notify_vm_stopped(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::NotifyVmStoppedRequest>,
    ) -> ServiceResult<pb::NotifyVmStoppedResponse> {
        need_key(req.idempotency_key)?;
        self.db()
            .execute(
                "INSERT OR IGNORE INTO events VALUES (?1, 'stopped', ?2, ?3)",
                params![req.idempotency_key, req.vm_id, req.stop_time],
            )
            .map_err(internal)?;
        Response::ok(pb::NotifyVmStoppedResponse::default())
    }

    async fn notify_possible_gap(
        &self,
        _ctx: RequestContext,
        req: ServiceRequest<'_, pb::NotifyPossibleGapRequest>,
    ) -> ServiceResult<pb::NotifyPossibleGapResponse> {
        need_key(req.idempotency_key)?;
        self.db()
            .execute(
                "INSERT OR IGNORE INTO gaps VALUES (?1, ?2, ?3, ?4)",
                params![
                    req.idempotency_key,
                    req.vm_id,
                    req.last_sent,
                    req.resume_time
                ],
            )
            .map_err(internal)?;
        Response::ok(pb::NotifyPossibleGapResponse::default())
    }
}

/// A database made before intervals could be reconstructed gets the column (its rows were not).
fn add_reconstructed_column(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('metrics') WHERE name = 'reconstructed'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch(
            "ALTER TABLE metrics ADD COLUMN reconstructed INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let conn = Connection::open(&cli.db).with_context(|| format!("open {}", cli.db.display()))?;
    conn.execute_batch(SCHEMA).context("create tables")?;
    add_reconstructed_column(&conn).context("add metrics.reconstructed")?;
    let svc = Arc::new(Billing {
        db: Mutex::new(conn),
    });
    let router = svc.register(connectrpc::Router::new());
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .fallback_service(router.into_axum_service());
    let listener = tokio::net::TcpListener::bind(cli.address)
        .await
        .with_context(|| format!("listen on {}", cli.address))?;
    tracing::info!(address = %cli.address, db = %cli.db.display(), "billaged listening");
    axum::serve(listener, app).await.context("serve")?;
    Ok(())
}
