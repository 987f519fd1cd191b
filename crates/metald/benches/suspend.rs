//! Suspend and wake. Firecracker (where its binary exists): `SuspendVm` and `ResumeVm` of the
//! counting tiny guest through metald's API, against bare Firecracker loading the same kind of
//! snapshot in the same run; after each wake the guest's next tick on its console shows it
//! really runs. QEMU with the default Debian guest: suspend time, saved size and wake time,
//! against a cold boot to the readiness line. Both also time `CreateVm` with `from_snapshot`
//! then `BootVm` until the clone runs (Firecracker: its first tick on the console; QEMU: its
//! first answer to ping at its own address). Prints tables.
//!
//! `make bench` (or `METALD_GUEST_DIR=target/guest cargo bench -p metald --bench suspend`);
//! `BENCH_RUNS=n` (default 10) for Firecracker, `BENCH_QEMU_RUNS=n` (default 3) for QEMU;
//! `BENCH_SUSPENDED_MS` (default 1000): how long a VM stays suspended before it is woken.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use metald::backend::firecracker::api::{FirecrackerApi, VmRunState};
use serde_json::json;
use support::*;

fn main() {
    match firecracker_bin() {
        Some(fc) => firecracker_rows(&fc, env_num("BENCH_RUNS", 10)),
        None => println!("firecracker: skipped (no firecracker binary on PATH)"),
    }
    match (guest_dir(), qemu_bin()) {
        (Some(guest), Some(_)) => qemu_rows(&guest, env_num("BENCH_QEMU_RUNS", 3)),
        _ => println!("qemu: skipped (needs qemu-system-x86_64 and the guest image: make bench)"),
    }
}

/// A metald whose rate limit stays out of the way of a bench polling its API.
fn unlimited(b: Builder) -> Builder {
    b.env("UNKEY_METALD_RATE_LIMIT_PER_SECOND", "1000000")
        .env("UNKEY_METALD_RATE_LIMIT_BURST", "1000000")
}

fn firecracker_rows(fc: &Path, runs: usize) {
    let m = unlimited(metald_with_backend("firecracker")).start_with(Metald::import_tiny_guest);
    let api = Rest::new(&m, Some("bench")).keep_alive();
    let body = json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
        "kernel": {"image_id": "tiny-counting-elf"}, "rootfs": {"image_id": "tiny-disk"}}});
    let id = api.create(body);
    api.boot_ready(&id);
    let (mut suspend, mut wake, mut tick, mut bare_load) = (vec![], vec![], vec![], vec![]);
    let snapshot = bare_snapshot(fc, &m.data_dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for _ in 0..runs {
        let t0 = Instant::now();
        api.call("POST", &format!("/v1/vms/{id}/suspend"), None)
            .ok();
        suspend.push(t0.elapsed());
        let seen = api.console_text(&id).len();
        // Suspended for a while, as a VM is before anyone wakes it: the kernel has finished
        // destroying the namespace the suspend released (back to back, the wake's network
        // steps wait up to tens of ms for the RTNL lock that destruction holds).
        std::thread::sleep(Duration::from_millis(env_num("BENCH_SUSPENDED_MS", 1000)));
        let t0 = Instant::now();
        let woken = api.call("POST", &format!("/v1/vms/{id}/resume"), None).ok();
        wake.push(t0.elapsed());
        assert_eq!(woken["vm"]["state"], "VM_STATE_RUNNING");
        // The guest's next tick (one every 2^26 TSC cycles) proves it runs again.
        while api.console_text(&id).len() <= seen {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no tick after the wake"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        tick.push(t0.elapsed());
        bare_load.push(rt.block_on(bare_load_snapshot(fc, &snapshot)));
    }
    let (mut snap, mut create, mut clone_tick) = (vec![], vec![], vec![]);
    let mut sid = String::new();
    for _ in 0..runs {
        if !sid.is_empty() {
            api.call("DELETE", &format!("/v1/snapshots/{sid}"), None)
                .ok();
        }
        let t0 = Instant::now();
        let made = api
            .call("POST", &format!("/v1/vms/{id}/snapshots"), None)
            .ok();
        snap.push(t0.elapsed());
        sid = made["snapshot"]["snapshotId"].as_str().unwrap().to_string();
        let t0 = Instant::now();
        let clone = api
            .call("POST", "/v1/vms", Some(json!({"fromSnapshot": sid})))
            .ok()["vm"]["vmId"]
            .as_str()
            .unwrap()
            .to_string();
        create.push(t0.elapsed());
        let booted = api
            .call("POST", &format!("/v1/vms/{clone}/boot"), None)
            .ok();
        assert_eq!(booted["vm"]["state"], "VM_STATE_RUNNING");
        // The clone's console starts empty: its first tick shows the guest counting on.
        while api.console_text(&clone).is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the clone never ticked"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        clone_tick.push(t0.elapsed());
        api.call("DELETE", &format!("/v1/vms/{clone}?force=true"), None)
            .ok();
    }
    api.call("DELETE", &format!("/v1/snapshots/{sid}"), None)
        .ok();
    api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
        .ok();
    println!();
    println!(
        "| counting tiny guest under firecracker (128 MiB, 1 vCPU) | median ms | min ms | max ms |"
    );
    println!(
        "|-------------------------------------------------------|-----------|--------|--------|"
    );
    row(
        "metald: SuspendVm (pause, snapshot, exit, release)",
        &suspend,
    );
    row("metald: ResumeVm -> vCPUs running (sandbox, load)", &wake);
    row("metald: ResumeVm -> next guest tick on the console", &tick);
    row(
        "bare firecracker: spawn + snapshot load (resumed)",
        &bare_load,
    );
    row("metald: CreateSnapshot of the running guest", &snap);
    row("metald: CreateVm from_snapshot (disk copy, links)", &create);
    row(
        "metald: CreateVm from_snapshot + BootVm -> 1st tick",
        &clone_tick,
    );
}

/// A snapshot of the counting guest made with bare Firecracker: (state, memory) files.
fn bare_snapshot(fc: &Path, assets: &Path) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("mds")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("api.sock");
    let mut child = spawn_bare_firecracker(fc, &sock, &dir.path().join("console.log"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let api = FirecrackerApi::new(&sock);
        let kernel = assets.join("tiny-counting.elf");
        boot_bare_tiny(&api, &kernel, &assets.join("tiny.img")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        api.patch_vm(VmRunState::Paused).await.unwrap();
        api.create_snapshot(&dir.path().join("state"), &dir.path().join("mem"))
            .await
            .unwrap();
    });
    let _ = child.kill();
    let _ = child.wait();
    let path = dir.path().to_path_buf();
    (dir, path)
}

/// Bare Firecracker: spawn, then load the snapshot with the guest resumed.
async fn bare_load_snapshot(
    fc: &Path,
    snapshot: &(tempfile::TempDir, std::path::PathBuf),
) -> Duration {
    let dir = &snapshot.1;
    let sock = dir.join("load.sock");
    let t0 = Instant::now();
    let mut child = spawn_bare_firecracker(fc, &sock, &dir.join("load-console.log"));
    let api = FirecrackerApi::new(&sock);
    api.wait_ready(Duration::from_secs(10)).await.unwrap();
    api.load_snapshot(&dir.join("state"), &dir.join("mem"))
        .await
        .unwrap();
    let took = t0.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

fn qemu_rows(guest: &Path, runs: usize) {
    if runs == 0 {
        return;
    }
    let m = unlimited(metald()).start(guest);
    let api = Rest::new(&m, Some("bench")).keep_alive();
    let (mut cold, mut suspend, mut wake, mut size) = (vec![], vec![], vec![], vec![]);
    let mut clone_ping = vec![];
    for _ in 0..runs {
        let t0 = Instant::now();
        let id = api.create_default();
        api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
        wait_for_console(
            &api,
            &id,
            READY_MARKER,
            t0,
            Duration::from_secs(120),
            Duration::from_millis(5),
        );
        cold.push(t0.elapsed());
        let t0 = Instant::now();
        api.call("POST", &format!("/v1/vms/{id}/suspend"), None)
            .ok();
        suspend.push(t0.elapsed());
        size.push(
            std::fs::metadata(m.data_dir.join("vms").join(&id).join("suspend.state"))
                .unwrap()
                .len(),
        );
        let t0 = Instant::now();
        let woken = api.call("POST", &format!("/v1/vms/{id}/resume"), None).ok();
        wake.push(t0.elapsed());
        assert_eq!(woken["vm"]["state"], "VM_STATE_RUNNING");
        clone_ping.push(qemu_clone_to_ping(&m, &api, &id));
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
    }
    size.sort_unstable();
    println!();
    println!(
        "| Debian guest under QEMU (256 MiB, 1 vCPU)             | median ms | min ms | max ms |"
    );
    println!(
        "|-------------------------------------------------------|-----------|--------|--------|"
    );
    row("metald: CreateVm + BootVm -> readiness line (cold)", &cold);
    row("metald: SuspendVm (stop, migrate to file, quit)", &suspend);
    row("metald: ResumeVm -> running (incoming migration)", &wake);
    row(
        "metald: CreateVm from_snapshot + BootVm -> ping",
        &clone_ping,
    );
    if let Some(median) = size.get(size.len() / 2) {
        println!(
            "saved state: median {:.1} MiB (guest memory 256 MiB; QEMU writes only pages in use)",
            *median as f64 / (1 << 20) as f64
        );
    }
}

/// Snapshots the running VM `id`, then times CreateVm `from_snapshot` + BootVm until the clone
/// answers ping at its own address (through its address map); removes both again.
fn qemu_clone_to_ping(m: &Metald, api: &Rest, id: &str) -> Duration {
    let made = api
        .call("POST", &format!("/v1/vms/{id}/snapshots"), None)
        .ok();
    let sid = made["snapshot"]["snapshotId"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    let clone = api
        .call("POST", "/v1/vms", Some(json!({"fromSnapshot": sid})))
        .ok()["vm"]["vmId"]
        .as_str()
        .unwrap()
        .to_string();
    let booted = api
        .call("POST", &format!("/v1/vms/{clone}/boot"), None)
        .ok();
    let addr = booted["vm"]["network"]["ipv6Address"]
        .as_str()
        .unwrap()
        .to_string();
    let netns = &m.iso.as_ref().unwrap().netns;
    loop {
        let pinged = netns
            .command("ping")
            .args(["-c1", "-W1", &addr])
            .output()
            .unwrap();
        if pinged.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the clone never answered"
        );
    }
    let took = t0.elapsed();
    api.call("DELETE", &format!("/v1/vms/{clone}?force=true"), None)
        .ok();
    api.call("DELETE", &format!("/v1/snapshots/{sid}"), None)
        .ok();
    took
}
