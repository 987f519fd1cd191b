//! What the usage sampler costs: with N real running (jailed) VMs, the CPU time metald's
//! sampler spends per second (its own `metald_meter_busy_seconds` counter, over a measured
//! window), per VM, and extrapolated to 1000 VMs at the 100 ms interval. Beside it, the whole
//! metald process's CPU over the same window (`/proc/<pid>/stat`): that includes everything
//! else metering costs (Firecracker's once-a-second metrics flush round trips, the billing
//! batcher) and the idle daemon. Prints a table.
//!
//! `cargo bench -p metald --bench metering` (`BENCH_SIZES=10,50,100`, `BENCH_WINDOW_SECS=10`).
//! Firecracker's tiny guest when a firecracker binary is installed, else QEMU's default guest
//! (then sizes above 20 are skipped: 2 cores cannot run that many TCG guests).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

fn scrape(m: &Metald, name: &str) -> f64 {
    m.metric(name).unwrap_or(0.0)
}

/// utime + stime of a process, seconds.
fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on every Linux ABI metald runs on.
    ticks / 100.0
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "10,50,100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let window = Duration::from_secs(
        std::env::var("BENCH_WINDOW_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    let fc = firecracker_bin().is_some();
    let (m, body, marker) = if fc {
        (
            metald_with_backend("firecracker").start_with(Metald::import_tiny_guest),
            json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
                "kernel": {"image_id": "tiny-elf"}, "rootfs": {"image_id": "tiny-disk"}}}),
            TINY_MARKER,
        )
    } else {
        let Some(guest) = guest_dir() else {
            eprintln!("no guest image and no firecracker: nothing to run");
            std::process::exit(2);
        };
        (
            metald().start(&guest),
            readme_request(1, 128 << 20),
            READY_MARKER,
        )
    };
    let api = Rest::new(&m, Some("bench"));
    println!(
        "sampler cost, interval 100 ms, {} guests, {}-s windows",
        if fc {
            "firecracker tiny"
        } else {
            "QEMU default"
        },
        window.as_secs()
    );
    println!("\n| running VMs | sampler CPU (% of one core) | per VM per tick (µs) | extrapolated: 1000 VMs (% of one core) | whole metald process (% of one core) | whole process per VM per tick (µs) |");
    println!("|---|---|---|---|---|---|");
    let mut ids: Vec<String> = vec![];
    for n in sizes {
        if !fc && n > 20 {
            println!("| {n} | skipped (QEMU TCG guests) | | | | |");
            continue;
        }
        while ids.len() < n {
            let id = api.create(body.clone());
            api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
            ids.push(id);
        }
        let t = Instant::now();
        for id in &ids {
            wait_for_console(
                &api,
                id,
                marker,
                t,
                Duration::from_secs(600),
                Duration::from_millis(20),
            );
        }
        // Settle, then measure over the window.
        std::thread::sleep(Duration::from_secs(1));
        let pid = m.pid().unwrap();
        let (b0, k0, p0, t0) = (
            scrape(&m, "metald_meter_busy_seconds_total"),
            scrape(&m, "metald_meter_ticks_total"),
            process_cpu_secs(pid),
            Instant::now(),
        );
        std::thread::sleep(window);
        let (b1, k1, p1, secs) = (
            scrape(&m, "metald_meter_busy_seconds_total"),
            scrape(&m, "metald_meter_ticks_total"),
            process_cpu_secs(pid),
            t0.elapsed().as_secs_f64(),
        );
        let ticks = (k1 - k0).max(1.0);
        let share = (b1 - b0) / secs;
        let per_vm_tick_us = (b1 - b0) / ticks / n as f64 * 1e6;
        let process_share = (p1 - p0) / secs;
        let process_per_vm_tick_us = (p1 - p0) / ticks / n as f64 * 1e6;
        let at_1000 = per_vm_tick_us * 1e-6 * 1000.0 * 10.0;
        println!(
            "| {n} | {:.3} | {per_vm_tick_us:.2} | {:.2} | {:.2} | {process_per_vm_tick_us:.2} |",
            share * 100.0,
            at_1000 * 100.0,
            process_share * 100.0,
        );
    }
    for id in &ids {
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
    }
    m.assert_clean();
}
