//! What isolation costs: CreateVm + BootVm until the guest is ready, through a metald that
//! jails each VMM and gives it a network namespace versus one with isolation off, interleaved in
//! one run; then metald's own memory with `BENCH_VMS` (default 50) jailed VMs up. Prints tables.
//!
//! `make bench` (or `METALD_GUEST_DIR=target/guest cargo bench -p metald --bench isolation`);
//! `BENCH_RUNS=n` (default 10). Uses Firecracker's tiny guest for the memory run when a
//! firecracker binary is installed, else the default guest under QEMU.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// CreateVm + BootVm → readiness line, and the BootVm call alone.
fn boot_once(api: &Rest, body: &serde_json::Value, marker: &str) -> (Duration, Duration) {
    let t0 = Instant::now();
    let id = api.call("POST", "/v1/vms", Some(body.clone())).ok()["vm"]["vmId"]
        .as_str()
        .unwrap()
        .to_string();
    let t1 = Instant::now();
    api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    let boot_call = t1.elapsed();
    wait_for_console(
        api,
        &id,
        marker,
        t0,
        Duration::from_secs(120),
        Duration::from_millis(2),
    );
    let total = t0.elapsed();
    api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
        .ok();
    (total, boot_call)
}

fn compare(
    title: &str,
    jailed: &Metald,
    open: &Metald,
    body: &serde_json::Value,
    marker: &str,
    runs: usize,
) {
    let (ja, oa) = (
        Rest::new(jailed, Some("bench")).keep_alive(),
        Rest::new(open, Some("bench")).keep_alive(),
    );
    let (mut jt, mut jb, mut ot, mut ob) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        // Interleaved so both see the same machine load.
        let (t, b) = boot_once(&ja, body, marker);
        jt.push(t);
        jb.push(b);
        let (t, b) = boot_once(&oa, body, marker);
        ot.push(t);
        ob.push(b);
    }
    println!("\n| {title:<53} | median ms | min ms | max ms |");
    println!(
        "|-------------------------------------------------------|-----------|--------|--------|"
    );
    row("jailed + own netns: CreateVm + BootVm -> ready", &jt);
    row("isolation off:      CreateVm + BootVm -> ready", &ot);
    row("jailed + own netns: BootVm call", &jb);
    row("isolation off:      BootVm call", &ob);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn main() {
    let Some(guest) = guest_dir() else {
        eprintln!(
            "no guest image: run `make bench` (or scripts/build-guest-image.sh target/guest)"
        );
        std::process::exit(2);
    };
    let runs = env_num("BENCH_RUNS", 10);
    let vms = env_num("BENCH_VMS", 50);
    println!("{runs} runs each, interleaved; memory with {vms} VMs");

    if qemu_bin().is_some() {
        let jailed = metald().start(&guest);
        let open = metald().unisolated().start(&guest);
        compare(
            "QEMU, default guest (256 MiB, 1 vCPU)",
            &jailed,
            &open,
            &readme_request(1, 256 << 20),
            READY_MARKER,
            runs,
        );
    }
    let fc = firecracker_bin();
    let tiny = json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
        "kernel": {"image_id": "tiny-elf"}, "rootfs": {"image_id": "tiny-disk"}}});
    if fc.is_some() {
        let jailed = metald_with_backend("firecracker").start_with(Metald::import_tiny_guest);
        let open = metald_with_backend("firecracker")
            .unisolated()
            .start_with(Metald::import_tiny_guest);
        compare(
            "Firecracker, tiny guest (128 MiB, 1 vCPU)",
            &jailed,
            &open,
            &tiny,
            TINY_MARKER,
            runs,
        );
    } else {
        println!("\n(firecracker not installed: its rows are skipped)");
    }

    // metald's own memory per VM, with every VM jailed and networked.
    let (m, body, marker, what) = match fc {
        Some(_) => (
            metald_with_backend("firecracker").start_with(Metald::import_tiny_guest),
            tiny,
            TINY_MARKER,
            "firecracker tiny guests",
        ),
        None => (
            metald().start(&guest),
            readme_request(1, 128 << 20),
            READY_MARKER,
            "QEMU default guests, 128 MiB",
        ),
    };
    let api = Rest::new(&m, Some("bench")).keep_alive();
    let pid = m.pid().unwrap();
    // Warm up allocator and connection pools with one VM, then measure from there.
    let (_, _) = boot_once(&api, &body, marker);
    let before = rss_kib(pid);
    let t0 = Instant::now();
    let mut ids = vec![];
    for _ in 0..vms {
        let id = api.create(body.clone());
        api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
        ids.push(id);
    }
    for id in &ids {
        wait_for_console(
            &api,
            id,
            marker,
            t0,
            Duration::from_secs(900),
            Duration::from_millis(50),
        );
    }
    let up = t0.elapsed();
    let after = rss_kib(pid);
    println!("\n| metald RSS with {vms} jailed VMs up ({what}) | KiB |");
    println!("|---|---|");
    println!("| before (1 VM booted and deleted) | {before} |");
    println!("| with {vms} VMs | {after} |");
    println!(
        "| per VM | {:.1} |",
        (after.saturating_sub(before)) as f64 / vms as f64
    );
    println!("({vms} VMs created and ready in {:.1} s)", up.as_secs_f64());
    for id in &ids {
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
    }
    m.assert_clean();
}
