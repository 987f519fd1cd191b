//! Billing delivery against the real `billaged` (over loopback inside metald's test namespace)
//! with a real, busy guest: a billing outage loses and doubles nothing, and a metald killed
//! with SIGKILL drains its outbox after restart, reports its downtime as a possible gap and
//! bills the downtime's usage as one reconstructed interval spanning it.

use std::time::{Duration, Instant};

use crate::support::*;
use crate::Need;

/// The billing tests: QEMU guests and a real billaged.
pub fn tests() -> Vec<crate::E2e> {
    crate::e2e![&[Need::Root, Need::Qemu, Need::Guest, Need::Billaged];
        a_billing_outage_loses_and_doubles_nothing,
        a_metald_killed_mid_run_bills_its_downtime_as_one_reconstructed_interval,
    ]
}

/// A running metald batching every 500 ms into a running billaged (on `port`), with the spin
/// script imported.
fn billed_metald(guest: &std::path::Path) -> (Metald, u16, Billaged) {
    let port = free_port();
    let mut m = metald()
        .env("UNKEY_METALD_BILLING_ENABLED", "true")
        .env(
            "UNKEY_METALD_BILLING_ENDPOINT",
            &format!("http://127.0.0.1:{port}"),
        )
        .env("UNKEY_METALD_BILLING_BATCH_INTERVAL", "500ms")
        .env("UNKEY_METALD_BILLING_HEARTBEAT_INTERVAL", "1s")
        // Every sample of a VM's life stays in metald's series, to hold billaged's against.
        .env("UNKEY_METALD_METRICS_RETENTION_SECONDS", "3600")
        .prepare(|m| {
            m.import_default_guest(guest);
            m.import_script("spin", SPIN_SCRIPT);
        });
    m.spawn();
    let billaged = Billaged::start(&m, port);
    (m, port, billaged)
}

/// Shuts the VM down and waits until everything about it reached billaged; billaged's
/// database.
fn shut_down_and_deliver(m: &Metald, api: &Rest, id: &str) -> rusqlite::Connection {
    api.force_shutdown(id);
    let db = rusqlite::Connection::open(m.data_dir.join("billaged.db")).unwrap();
    wait_delivered(m, &db, id);
    db
}

/// Waits until metald's outbox is empty and billaged recorded the VM's stop.
fn wait_delivered(m: &Metald, db: &rusqlite::Connection, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let depth = m.metric("metald_billing_outbox_rows");
        let stopped: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM events WHERE vm_id = ?1 AND kind = 'stopped'",
                [vm],
                |r| r.get(0),
            )
            .unwrap_or(0);
        if depth == Some(0.0) && stopped == 1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "outbox never drained (depth {depth:?}, stopped {stopped})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// When billaged was told the VM's VMM started and stopped (each exactly once).
fn lifecycle_events(db: &rusqlite::Connection, vm: &str) -> (i64, i64) {
    let at = |kind: &str| -> Vec<i64> {
        let mut stmt = db
            .prepare("SELECT at FROM events WHERE vm_id = ?1 AND kind = ?2")
            .unwrap();
        stmt.query_map([vm, kind], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let (started, stopped) = (at("started"), at("stopped"));
    assert_eq!(
        (started.len(), stopped.len()),
        (1, 1),
        "started {started:?}, stopped {stopped:?}"
    );
    (started[0], stopped[0])
}

/// (sum of CPU ns, intervals, distinct timestamps, sorted timestamps) billaged stored for `vm`.
fn billed(db: &rusqlite::Connection, vm: &str) -> (u64, i64, i64, Vec<i64>) {
    let (sum, n, distinct): (i64, i64, i64) = db
        .query_row(
            "SELECT COALESCE(SUM(cpu_time_nanos), 0), COUNT(*), COUNT(DISTINCT timestamp) FROM metrics WHERE vm_id = ?1",
            [vm],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let mut stmt = db
        .prepare("SELECT timestamp FROM metrics WHERE vm_id = ?1 ORDER BY timestamp")
        .unwrap();
    let ts: Vec<i64> = stmt
        .query_map([vm], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (sum as u64, n, distinct, ts)
}

fn a_billing_outage_loses_and_doubles_nothing() {
    let guest = qemu_guest();
    let (m, port, billaged) = billed_metald(&guest);
    let api = Rest::new(&m, Some("billed"));
    let id = api.create_booted(script_request(Some("spin")));
    std::thread::sleep(Duration::from_secs(2));
    // The billing service goes away until metald has found it unreachable and kept a batch;
    // the VM keeps running and metald keeps sampling.
    billaged.kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !m
        .log_text()
        .contains("billing service unreachable; keeping the batch")
    {
        assert!(Instant::now() < deadline, "the outage was never seen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _billaged = Billaged::start(&m, port);
    std::thread::sleep(Duration::from_secs(1));
    let db = shut_down_and_deliver(&m, &api, &id);

    let usage = api.call("GET", &format!("/v1/vms/{id}/usage"), None).ok();
    let total = num(&usage["total"]["cpuTimeNanos"]);
    let (sum, n, distinct, ts) = billed(&db, &id);
    eprintln!("metald total {total} ns; billaged {sum} ns in {n} intervals");
    assert_eq!(n, distinct, "an interval arrived twice");
    assert_eq!(sum, total, "billaged's sum equals metald's total");
    // One interval per sample metald took: none missing, none invented, however far apart a
    // busy host spaced them.
    let sampled: Vec<i64> = usage["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(sample_ms)
        .collect();
    assert_eq!(ts, sampled, "billed intervals against metald's samples");
    let gaps: i64 = db
        .query_row("SELECT COUNT(*) FROM gaps", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        gaps, 0,
        "an outage of the billing service is not a gap in usage"
    );
    // The VMM's start and stop bracket every billed interval.
    let (started, stopped) = lifecycle_events(&db, &id);
    assert!(
        started <= ts[0] && stopped >= *ts.last().unwrap(),
        "started {started}, stopped {stopped}, intervals {}..{}",
        ts[0],
        ts.last().unwrap()
    );
    // Heartbeats (every second here) named this metald and listed the VM while it ran; one
    // after the stop lists nothing.
    let instance = format!("metald@{}", m.data_dir.display());
    let listed: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM heartbeat_vms WHERE instance_id = ?1 AND vm_id = ?2 AND at > ?3 AND at < ?4",
            rusqlite::params![instance, id, started, stopped],
            |r| r.get(0),
        )
        .unwrap();
    assert!(listed >= 2, "{listed} heartbeats listed the running VM");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (after, empty): (i64, i64) = db
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(active_vms = 0), 0) FROM heartbeats WHERE instance_id = ?1 AND at > ?2",
                rusqlite::params![instance, stopped + 100],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        if after > 0 {
            assert_eq!(after, empty, "a heartbeat after the stop still listed a VM");
            break;
        }
        assert!(Instant::now() < deadline, "no heartbeat after the stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    m.assert_clean();
}

fn a_metald_killed_mid_run_bills_its_downtime_as_one_reconstructed_interval() {
    let guest = qemu_guest();
    let (mut m, _, _billaged) = billed_metald(&guest);
    let api = Rest::new(&m, Some("crashy"));
    let id = api.create_booted(script_request(Some("spin")));
    let vmm = api.vm(&id)["vmmPid"].as_u64().expect("vmm pid");
    std::thread::sleep(Duration::from_secs(2));
    let pid = m.pid().unwrap();
    let killed_at = metald::domain::now_ms();
    let killed_cpu = process_cpu_secs(vmm);
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    m.stop();
    // Down until the spinning VMM used a second of CPU that no metald saw.
    let down_cpu = wait_process_cpu(vmm, killed_cpu, 1.0) - killed_cpu;
    let spawned_at = metald::domain::now_ms();
    m.spawn();
    std::thread::sleep(Duration::from_secs(2));
    let db = shut_down_and_deliver(&m, &api, &id);

    let total =
        num(&api.call("GET", &format!("/v1/vms/{id}/usage"), None).ok()["total"]["cpuTimeNanos"]);
    let (sum, n, distinct, ts) = billed(&db, &id);
    let (last_sent, resume): (i64, i64) = db
        .query_row(
            "SELECT last_sent, resume_time FROM gaps WHERE vm_id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("one gap notice for the VM");
    eprintln!("metald total {total} ns; billaged {sum} ns in {n} intervals; gap {last_sent}..{resume} ({} ms)", resume - last_sent);
    assert_eq!(n, distinct, "an interval arrived twice");
    assert!(
        last_sent <= killed_at && resume >= spawned_at,
        "the gap {last_sent}..{resume} covers the downtime {killed_at}..{spawned_at}"
    );
    // Inside the gap, one interval: the reconstructed one, ending when sampling resumed.
    let inside: Vec<&i64> = ts
        .iter()
        .filter(|t| **t > last_sent && **t <= resume)
        .collect();
    assert_eq!(
        inside,
        vec![&resume],
        "intervals inside the gap {last_sent}..{resume}"
    );
    let (reconstructed_at, reconstructed_cpu): (i64, i64) = db
        .query_row(
            "SELECT timestamp, cpu_time_nanos FROM metrics WHERE vm_id = ?1 AND reconstructed",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("one reconstructed interval");
    assert_eq!(reconstructed_at, resume);
    // It holds at least what the kernel counted for the VMM while metald was down (less its
    // 10 ms clock ticks), and with it billaged's sum is metald's total.
    assert!(
        reconstructed_cpu as f64 / 1e9 >= down_cpu - 0.02,
        "reconstructed {reconstructed_cpu} ns, the VMM used {down_cpu} s while metald was down"
    );
    assert_eq!(
        sum, total,
        "billaged's sum equals metald's total across the kill"
    );
    // A re-attached VMM did not start again: one start, one stop.
    lifecycle_events(&db, &id);
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    m.assert_clean();
}
