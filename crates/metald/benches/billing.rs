//! Outbox throughput: how fast metald's billing sender drains a backlog into the real
//! `billaged` over loopback (what happens after a billing outage). The outbox is filled first
//! with `BENCH_BATCHES` batches of 10 intervals each (default 2000), then the sender starts;
//! prints batches and intervals delivered per second. Needs `target/release/billaged`
//! (`make bench` builds it).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use metald::billing::{Billing, BillingConfig};
use metald::domain::{CustomerId, VmId};
use metald::metering::{Meter, MeterConfig};
use metald::store::{OutboxRow, Store};

fn main() {
    let batches: usize = std::env::var("BENCH_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let billaged =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/billaged");
    if !billaged.exists() {
        eprintln!(
            "{} missing: cargo build --release -p billaged",
            billaged.display()
        );
        std::process::exit(2);
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new(&billaged)
        .args(["--address", &format!("127.0.0.1:{port}")])
        .args(["--db", dir.path().join("billaged.db").to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let store: Arc<dyn metald::store::StateStore> =
        Arc::new(Store::open(&dir.path().join("metald.db")).unwrap());
    let vm = VmId::generate();
    let customer: CustomerId = "bench".parse().unwrap();
    let intervals: Vec<serde_json::Value> = (0..10)
        .map(|i| serde_json::json!({"timestamp": i, "usage": {"cpu_ns": 1000, "memory_bytes": 1, "disk_read_bytes": 0, "disk_write_bytes": 0, "disk_read_ops": 0, "disk_write_ops": 0, "net_rx_bytes": 10, "net_tx_bytes": 10, "net_rx_packets": 1, "net_tx_packets": 1}}))
        .collect();
    let payload = serde_json::json!({ "Metrics": intervals }).to_string();
    let rows: Vec<OutboxRow> = (0..batches)
        .map(|i| OutboxRow {
            key: format!("{vm}:{i}"),
            kind: "metrics".into(),
            vm_id: vm.to_string(),
            customer_id: customer.to_string(),
            payload_json: payload.clone(),
        })
        .collect();
    let t_fill = Instant::now();
    for chunk in rows.chunks(100) {
        store.enqueue_billing(chunk, None).unwrap();
    }
    let fill = t_fill.elapsed();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let drained = rt.block_on(async {
        let meter = Meter::start(MeterConfig {
            interval: Duration::from_millis(100),
            retained_samples: 10,
            vmm_metrics_interval: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        let _billing = Billing::start(
            Arc::clone(&store),
            meter,
            BillingConfig {
                endpoint: format!("http://127.0.0.1:{port}").parse().unwrap(),
                batch_interval: Duration::from_secs(1),
                heartbeat_interval: Duration::from_secs(10),
                instance_id: "bench".into(),
            },
        );
        while store.outbox_depth().unwrap() > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "outbox never drained"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        t0.elapsed()
    });
    let _ = server.kill();
    let _ = server.wait();
    let secs = drained.as_secs_f64();
    println!("\n| outbox ({batches} batches x 10 intervals) | value |");
    println!("|---|---|");
    println!(
        "| enqueue (SQLite, 100 rows per transaction) | {:.0} batches/s |",
        batches as f64 / fill.as_secs_f64()
    );
    println!("| drain to billaged over loopback, one batch per request | {:.0} batches/s ({:.0} intervals/s) |", batches as f64 / secs, batches as f64 * 10.0 / secs);
    println!("| drain time | {secs:.2} s |");
}
