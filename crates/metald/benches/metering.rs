//! What the usage sampler costs: with N real running (jailed) VMs, the CPU time metald's
//! sampler spends per second (its own `metald_meter_busy_seconds` counter, over a measured
//! window), per VM, and extrapolated to 1000 VMs at the 100 ms interval by the line through
//! the measured sizes. Beside it, the whole metald process's CPU over the same window
//! (`/proc/<pid>/stat`): that includes everything else metering costs (Firecracker's metrics
//! flush round trips, the billing batcher) and the idle daemon. Prints a table per guest kind.
//!
//! `cargo bench -p metald --bench metering` (`BENCH_SIZES=10,50,100`, `BENCH_WINDOW_SECS=10`,
//! `BENCH_GUESTS=busy,idle`). Firecracker's tiny guests when a firecracker binary is installed
//! (`busy`: every vCPU polling, `idle`: every vCPU halted), else QEMU's default guest (then
//! sizes above 20 are skipped: 2 cores cannot run that many TCG guests).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// A counter from metald's /metrics. A missing one ends the bench: a 0 printed in its place
/// would read as a result.
fn scrape(m: &Metald, name: &str) -> f64 {
    m.metric(name)
        .unwrap_or_else(|| panic!("{name} is not on metald's /metrics"))
}

/// Least-squares line through (running VMs, sampler µs per tick): (fixed µs per tick, µs per
/// added VM).
fn fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    (points.len() >= 2 && sxx > 0.0).then(|| {
        let slope = sxy / sxx;
        (my - slope * mx, slope)
    })
}

/// Median and largest gap (ms) between the VM's samples taken since host time `since_ms`: how
/// close to its interval the sampler keeps under this load (the e2e tests assert no speed).
fn sample_gaps(api: &Rest, id: &str, since_ms: i64) -> (f64, f64) {
    let u = api.call("GET", &format!("/v1/vms/{id}/usage"), None).ok();
    let mono: Vec<u64> = u["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(|s| sample_ms(s) >= since_ms)
        .map(|s| num(&s["monotonicNanos"]))
        .collect();
    let mut gaps: Vec<f64> = mono
        .windows(2)
        .map(|w| (w[1] - w[0]) as f64 / 1e6)
        .collect();
    assert!(
        !gaps.is_empty(),
        "fewer than two samples in the window: {u}"
    );
    gaps.sort_by(f64::total_cmp);
    (gaps[gaps.len() / 2], gaps[gaps.len() - 1])
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "10,50,100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let window = Duration::from_secs(env_num("BENCH_WINDOW_SECS", 10));
    let fc = firecracker_bin().is_some();
    // Firecracker's tiny guests: every vCPU busy polling (each poll an exit to the VMM, the
    // worst case for the sampler's caches on 2 cores), or every vCPU halted.
    let guests: Vec<String> = std::env::var("BENCH_GUESTS")
        .unwrap_or_else(|_| "busy,idle".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let m = if fc {
        // Room for 1000 VMs: the tests' /24 has addresses for 126.
        metald_with_backend("firecracker")
            .env("UNKEY_METALD_IPV4_SUBNET", "10.213.0.0/20")
            .env("UNKEY_METALD_JAILER_ID_COUNT", "4000")
            .start_with(Metald::import_tiny_guest)
    } else {
        let Some(guest) = guest_dir() else {
            eprintln!("no guest image and no firecracker: nothing to run");
            std::process::exit(2);
        };
        metald().start(&guest)
    };
    let api = Rest::new(&m, Some("bench"));
    println!(
        "sampler cost, interval 100 ms, {}-s windows",
        window.as_secs()
    );
    for guest in if fc { guests } else { vec!["qemu".into()] } {
        let (body, marker) = match guest.as_str() {
            "qemu" => (readme_request(1, 128 << 20), READY_MARKER),
            kind => {
                let kernel = match kind {
                    "busy" => "tiny-elf",
                    "idle" => "tiny-idle-elf",
                    other => panic!("BENCH_GUESTS: unknown guest {other:?} (busy, idle)"),
                };
                (
                    json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
                        "kernel": {"image_id": kernel}, "rootfs": {"image_id": "tiny-disk"}}}),
                    TINY_MARKER,
                )
            }
        };
        println!(
            "\n{}",
            match guest.as_str() {
                "busy" => "Firecracker tiny guests, every vCPU busy (polling the keyboard controller)",
                "idle" => "Firecracker tiny guests, every vCPU halted",
                _ => "QEMU default guests (sizes above 20 skipped: 2 cores cannot run more TCG guests)",
            }
        );
        println!("\n| running VMs | sampler CPU (% of one core) | per VM per tick (µs) | whole metald process (% of one core) | whole process per VM per tick (µs) | one VM's sample gaps, median / max (ms; target 100) |");
        println!("|---|---|---|---|---|---|");
        let mut ids: Vec<String> = vec![];
        let mut points = vec![];
        for &n in &sizes {
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
                process_cpu_secs(u64::from(pid)),
                Instant::now(),
            );
            let w0 = metald::domain::now_ms();
            std::thread::sleep(window);
            let (b1, k1, p1, secs) = (
                scrape(&m, "metald_meter_busy_seconds_total"),
                scrape(&m, "metald_meter_ticks_total"),
                process_cpu_secs(u64::from(pid)),
                t0.elapsed().as_secs_f64(),
            );
            assert!(k1 > k0, "the sampler did not tick in {secs} s");
            let ticks = k1 - k0;
            let share = (b1 - b0) / secs;
            let per_tick_us = (b1 - b0) / ticks * 1e6;
            points.push((n as f64, per_tick_us));
            let process_share = (p1 - p0) / secs;
            let process_per_vm_tick_us = (p1 - p0) / ticks / n as f64 * 1e6;
            let (median_gap, max_gap) = sample_gaps(&api, &ids[0], w0);
            println!(
                "| {n} | {:.3} | {:.2} | {:.2} | {process_per_vm_tick_us:.2} | {median_gap:.1} / {max_gap:.1} |",
                share * 100.0,
                per_tick_us / n as f64,
                process_share * 100.0,
            );
        }
        // The cost per tick grows linearly with the VMs (one clock read, one interface in the
        // dump, a share of the once-a-second reads each) on top of a fixed part (the dump's
        // round trip, waking up): the line through the measured sizes, not the cost per VM at
        // the largest size times 1000 (which would count the fixed part 1000/N times).
        if let Some((fixed, per_vm)) = fit(&points) {
            // µs per tick × 10 ticks a second, as a share of one core's 10⁶ µs.
            let at_1000 = (fixed + per_vm * 1000.0) * 10.0 / 1e6 * 100.0;
            println!(
                "\nfitted: {fixed:.0} µs per tick + {per_vm:.2} µs per VM per tick; 1000 VMs at 100 ms: {at_1000:.2} % of one core (target ≤ 5 %)"
            );
        }
        for id in ids.drain(..) {
            api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
                .ok();
        }
    }
    m.assert_clean();
}
