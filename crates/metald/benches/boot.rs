//! Boot latency: `CreateVm` + `BootVm` through metald's REST API until the guest's readiness
//! line is readable (QEMU: through `GetVmConsole`; Firecracker: in its console file, as the
//! bare VMM's is read), against the same guest started by hand with the bare
//! VMM and the same command line, until the line appears in its console file. Prints a table.
//!
//! `make bench` (or `METALD_GUEST_DIR=target/guest cargo bench -p metald --bench boot`);
//! `BENCH_RUNS=n` changes the number of runs (default 10), `BENCH_QEMU_RUNS=n` those of QEMU
//! alone (0 leaves QEMU out), `BENCH_REST_MS` the rest after each Firecracker VM's deletion
//! (default 500).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use metald::backend::qemu::{command_args, Accel};
use metald::backend::{Disk, VmLaunch};
use metald::domain::VmId;
use support::*;

fn main() {
    let Some(guest) = guest_dir() else {
        eprintln!(
            "no guest image: run `make bench` (or scripts/build-guest-image.sh target/guest)"
        );
        std::process::exit(2);
    };
    let Some(qemu) = qemu_bin() else {
        eprintln!("qemu-system-x86_64 not installed");
        std::process::exit(2);
    };
    let runs: usize = env_num("BENCH_RUNS", 10);
    let (hw, why) = metald::config::hardware_kvm(Path::new("/sys"), Path::new("/dev"));
    let accel = if hw { Accel::Kvm } else { Accel::Tcg };
    println!(
        "guest: {}; QEMU accel {} ({why}); {runs} runs each, interleaved",
        guest.display(),
        accel.as_str()
    );

    let qemu_runs: usize = env_num("BENCH_QEMU_RUNS", runs);
    if qemu_runs > 0 {
        qemu_rows(&guest, &qemu, accel, qemu_runs);
    }
    if let Some(fc) = firecracker_bin() {
        firecracker_rows(&fc, runs);
    } else {
        println!("\n(firecracker not installed: its rows are skipped)");
    }
}

/// The default guest under QEMU: through metald, and by hand with the same command line.
fn qemu_rows(guest: &Path, qemu: &Path, accel: Accel, runs: usize) {
    let m = metald().start(guest);
    let api = Rest::new(&m, Some("bench")).keep_alive();
    let mut via_metald = vec![];
    let mut create_ms = vec![];
    let mut boot_call_ms = vec![];
    let mut bare = vec![];
    for i in 0..runs {
        // Interleaved so both paths see the same machine load.
        let t0 = Instant::now();
        let id = api.create_default();
        create_ms.push(t0.elapsed());
        let t1 = Instant::now();
        api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
        boot_call_ms.push(t1.elapsed());
        wait_for_console(
            &api,
            &id,
            READY_MARKER,
            t0,
            Duration::from_secs(120),
            Duration::from_millis(5),
        );
        via_metald.push(t0.elapsed());
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();

        bare.push(bare_qemu(qemu, guest, accel, i));
    }
    println!();
    println!(
        "| path (memory 256 MiB, 1 vCPU)                         | median ms | min ms | max ms |"
    );
    println!(
        "|-------------------------------------------------------|-----------|--------|--------|"
    );
    row("metald: CreateVm (disk clone, SQLite insert)", &create_ms);
    row("metald: BootVm call (spawn + QMP ready)", &boot_call_ms);
    row(
        "metald: CreateVm + BootVm -> readiness line (API)",
        &via_metald,
    );
    row("bare qemu: spawn -> readiness line (console file)", &bare);
}

/// The tiny test guest under Firecracker: through metald (its jails started ahead, and built
/// at each boot), and by hand with the same API calls, interleaved.
fn firecracker_rows(fc: &Path, runs: usize) {
    /// metald's default `UNKEY_METALD_WARM_POOL`.
    const SPARE_NETWORKS: usize = 4;
    let log = "info,metald::sandbox=debug,metald_host::jailer=debug,metald_vmm::firecracker=debug";
    // metald's default spare disk copies (the test harness turns them off).
    let spares = ("UNKEY_METALD_WARM_DISKS", "2");
    let warm = metald_with_backend("firecracker")
        .env(spares.0, spares.1)
        .env("UNKEY_METALD_LOG", log)
        .start_with(Metald::import_tiny_guest);
    let cold = metald_with_backend("firecracker")
        .env(spares.0, spares.1)
        .env("UNKEY_METALD_WARM_JAILS", "0")
        .env("UNKEY_METALD_LOG", log)
        .start_with(Metald::import_tiny_guest);
    let body = serde_json::json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
        "kernel": {"image_id": "tiny-elf"}, "rootfs": {"image_id": "tiny-disk"}}});
    let rest = Duration::from_millis(env_num("BENCH_REST_MS", 500));
    let (warm_api, cold_api) = (
        Rest::new(&warm, Some("bench")).keep_alive(),
        Rest::new(&cold, Some("bench")).keep_alive(),
    );
    let boot = |m: &Metald, api: &Rest, warm_jails: usize| {
        let (id, took) = m.boot_to_banner(api, &body, Duration::from_secs(30));
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
        // Each boot on a host at rest, as a single start is: the pools' refills (a namespace,
        // a jail) are over, and so is the namespace's teardown, which the kernel finishes
        // after metald let go of it (holding its network lock for 100-200 ms), before the
        // next boot of either metald, or of the bare VMM, starts.
        m.wait_vm_dir_gone(&id);
        m.wait_pools(warm_jails, SPARE_NETWORKS);
        std::thread::sleep(rest);
        took
    };
    let (mut via_warm, mut via_cold, mut bare) = (vec![], vec![], vec![]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for _ in 0..runs {
        via_warm.push(boot(&warm, &warm_api, metald::config::DEFAULT_WARM_JAILS));
        via_cold.push(boot(&cold, &cold_api, 0));
        bare.push(rt.block_on(bare_firecracker(fc, &warm.data_dir)));
    }
    println!();
    println!(
        "| tiny guest under firecracker (128 MiB, 1 vCPU)        | median ms | min ms | max ms |"
    );
    println!(
        "|-------------------------------------------------------|-----------|--------|--------|"
    );
    row("metald: CreateVm + BootVm -> banner (REST)", &via_warm);
    row("metald, jails built at boot (WARM_JAILS=0)", &via_cold);
    row("bare firecracker: spawn + 4 API calls -> banner", &bare);
    if let Ok(p) = std::env::var("BENCH_BOOT_LOG") {
        std::fs::write(format!("{p}.warm"), warm.log_text()).unwrap();
        std::fs::write(format!("{p}.cold"), cold.log_text()).unwrap();
    }
}

async fn bare_firecracker(fc: &Path, assets: &Path) -> Duration {
    let dir = tempfile::Builder::new()
        .prefix("mdf")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("api.sock");
    let console = dir.path().join("console.log");
    let t0 = Instant::now();
    let mut child = spawn_bare_firecracker(fc, &sock, &console);
    let api = metald::backend::firecracker::api::FirecrackerApi::new(&sock);
    boot_bare_tiny(&api, &assets.join("tiny.elf"), &assets.join("tiny.img")).await;
    wait_for_banner(&console, t0, Duration::from_secs(30));
    let took = t0.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}

/// The same guest with metald's QEMU command line, started by hand.
fn bare_qemu(qemu: &Path, guest: &Path, accel: Accel, i: usize) -> Duration {
    let dir = tempfile::Builder::new()
        .prefix("mdb")
        .tempdir_in("/tmp")
        .unwrap();
    let rootfs = dir.path().join("rootfs.img");
    metald::assets::clone_file(&guest.join("rootfs.ext4"), &rootfs).unwrap();
    let launch = VmLaunch {
        vm_id: VmId::generate(),
        dir: dir.path().to_path_buf(),
        control_dir: dir.path().to_path_buf(),
        vcpu_count: 1,
        memory_mib: 256,
        kernel: guest.join("vmlinux"),
        initrd: Some(guest.join("initrd.img")),
        extra_kernel_args: String::new(),
        disks: vec![Disk {
            id: "rootfs".into(),
            path: rootfs,
            read_only: false,
        }],
        net: None,
        jail: None,
        hold: Default::default(),
    };
    let console = launch.console_log();
    let t0 = Instant::now();
    let mut child = Command::new(qemu)
        .args(command_args(&launch, accel))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if std::fs::read_to_string(&console).is_ok_and(|c| c.contains(READY_MARKER)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "bare run {i}: guest not ready"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = t0.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    took
}
