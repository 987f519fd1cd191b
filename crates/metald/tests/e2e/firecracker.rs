//! End-to-end tests of the Firecracker backend through metald's API, with a tiny guest the test
//! writes itself (a 64-bit ELF that prints a banner on the serial port, then waits for a key on
//! the i8042 keyboard and resets, which makes Firecracker exit). It proves the whole control path
//! for real on any host with /dev/kvm; full Linux guests under Firecracker need hardware KVM
//! (see `full_guest_boots_where_hardware_kvm_exists`).

use std::path::Path;

use serde_json::{json, Value};

use crate::lifecycle::tiny_request;
use crate::support::*;
use crate::Need;

/// The Firecracker tests: the tiny guest needs KVM, the full guest hardware KVM.
pub fn tests() -> Vec<crate::E2e> {
    let mut tests = crate::e2e![&[Need::Root, Need::Firecracker, Need::Kvm];
        firecracker_limits_its_vcpus_and_keeps_the_console_to_the_guest,
        firecracker_runs_jailed_with_its_tap_and_rate_limits,
        a_vmm_can_neither_redirect_metalds_writes_nor_touch_its_control_socket,
        a_suspended_guest_stops_counting_and_counts_on_after_waking_even_across_a_restart,
        the_warm_pools_are_taken_by_boots_refilled_swept_after_a_kill_and_removed_at_stop,
        warm_jails_run_the_firecracker_on_disk_once_it_is_replaced,
        creates_take_spare_disk_copies_swept_after_a_kill_and_removed_at_stop,
        firecracker_is_not_asked_for_metrics_at_boot_and_its_exit_record_is_read,
    ];
    tests.extend(
        crate::e2e![&[Need::Root, Need::Firecracker, Need::HardwareKvm, Need::Guest];
            full_guest_boots_where_hardware_kvm_exists,
        ],
    );
    tests
}

/// What only Firecracker has: its own vCPU limit, its own log, a console that holds only the
/// guest's output; and a VMM killed from outside after a boot that followed a shutdown.
fn firecracker_limits_its_vcpus_and_keeps_the_console_to_the_guest() {
    let m = metald_with_backend("firecracker").start_with(Metald::import_tiny_guest);
    let api = Rest::new(&m, Some("fc"));
    let r = api.call("POST", "/v1/vms", Some(tiny_request(33)));
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_argument"),
        "{}",
        r.body
    );
    assert!(
        r.message()
            .contains("must be between 1 and 32 (firecracker limit)"),
        "{}",
        r.body
    );
    let id = api.create(tiny_request(1));
    api.boot_ready(&id);
    let console = api.call("GET", &format!("/v1/vms/{id}/console"), None).ok();
    assert_eq!(
        console["output"],
        format!("{TINY_MARKER}\n"),
        "the console holds only the guest's output"
    );
    let vmm_log =
        std::fs::read_to_string(m.data_dir.join("vms").join(&id).join("vmm.log")).unwrap();
    assert!(vmm_log.contains("Running Firecracker v"), "{vmm_log}");

    // Boot again after a shutdown, then a VMM killed from outside is noticed.
    let down = api.force_shutdown(&id);
    assert_eq!(down["vm"]["state"], "VM_STATE_SHUTDOWN");
    let again = api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    let pid = again["vm"]["vmmPid"].as_u64().expect("vmm pid");
    assert_eq!(m.firecracker_state(&id), "Running");
    kill_vmm_and_expect_failed(&api, &id, pid);
    m.assert_clean();
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    m.wait_vm_dir_gone(&id);
}

/// A VMM (the VM's uid owns its directory) that replaced its console log, its own log and its
/// metrics FIFO with symlinks to a host file before it exited: the next boot writes none of
/// them through, replaces each with a file of its own, and the guest runs as before. Its
/// control socket is out of its reach.
fn a_vmm_can_neither_redirect_metalds_writes_nor_touch_its_control_socket() {
    let m = metald_with_backend("firecracker").start_with(Metald::import_tiny_guest);
    let api = Rest::new(&m, Some("fc"));
    let id = api.create(tiny_request(1));
    api.boot_ready(&id);
    api.force_shutdown(&id);
    let host = m.data_dir.join("host-only");
    std::fs::write(&host, "host data\n").unwrap();
    let dir = m.data_dir.join("vms").join(&id);
    let uid = m.iso.as_ref().unwrap().uid_base;
    for name in ["console.log", "vmm.log", "metrics.fifo"] {
        let _ = std::fs::remove_file(dir.join(name));
        std::os::unix::fs::symlink(&host, dir.join(name)).unwrap();
        // Made as the VMM would: owned by a VM uid.
        std::os::unix::fs::lchown(dir.join(name), Some(uid), Some(uid)).unwrap();
    }
    api.boot_ready(&id);
    assert_eq!(std::fs::read_to_string(&host).unwrap(), "host data\n");
    for name in ["console.log", "vmm.log"] {
        let meta = std::fs::symlink_metadata(dir.join(name)).unwrap();
        assert!(meta.is_file(), "{name} is a file of its own again");
    }
    let console = api.call("GET", &format!("/v1/vms/{id}/console"), None).ok();
    assert_eq!(console["output"], format!("{TINY_MARKER}\n"));

    // The control socket is not in the VM's directory but in one metald holds (owned by it,
    // mode 0700): the VM's uid can neither remove it nor put anything beside it, and metald
    // still drives the VMM through it.
    assert!(!dir.join("control.sock").exists());
    let socket = m.control_socket(&id);
    let ctl = socket.parent().unwrap();
    let meta = std::fs::metadata(ctl).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (0, 0o700),
        "{}",
        ctl.display()
    );
    assert!(socket.exists());
    api.call("POST", &format!("/v1/vms/{id}/pause"), None).ok();
    assert_eq!(m.firecracker_state(&id), "Paused");
    api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
        .ok();
    m.assert_clean();
}

/// Waits until the counting guest printed `more` ticks after `from` bytes of console.
fn wait_ticks(api: &Rest, id: &str, from: usize, more: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let len = api.console_text(id).len();
        if len >= from + more {
            return len;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest printed {} of {more} ticks",
            len.saturating_sub(from)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The counting tiny guest, suspended: its VMM, cgroup and namespace go, its console stops
/// growing, its saved state is in its directory. metald is killed and restarted meanwhile.
/// Resumed, a new Firecracker loads the state and the same guest counts on from where it
/// was, at the same addresses, and still answers a graceful shutdown.
fn a_suspended_guest_stops_counting_and_counts_on_after_waking_even_across_a_restart() {
    let mut m = metald_with_backend("firecracker").start_with(Metald::import_tiny_guest);
    let api = Rest::new(&m, Some("fc"));
    let mut req = tiny_request(1);
    req["config"]["kernel"]["image_id"] = json!("tiny-counting-elf");
    let id = api.create(req);
    api.boot_ready(&id);
    let before = api.vm(&id);
    let counted = wait_ticks(&api, &id, 0, TINY_MARKER.len() + 5);
    let suspended = api
        .call("POST", &format!("/v1/vms/{id}/suspend"), None)
        .ok();
    assert_eq!(
        suspended["vm"]["state"], "VM_STATE_SUSPENDED",
        "{suspended}"
    );
    let dir = m.data_dir.join("vms").join(&id);
    for f in ["suspend.state", "suspend.mem"] {
        assert!(dir.join(f).is_file(), "{f} saved");
    }
    assert!(m.vmm_pids().is_empty(), "no VMM while suspended");
    let frozen = api.console_text(&id).len();
    assert!(frozen >= counted);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        api.console_text(&id).len(),
        frozen,
        "a suspended guest prints nothing"
    );
    m.assert_clean();

    // metald killed and started again: the VM is still suspended and wakes.
    m.kill();
    m.spawn();
    let api = Rest::new(&m, Some("fc"));
    assert_eq!(api.vm(&id)["state"], "VM_STATE_SUSPENDED");
    let woken = api.call("POST", &format!("/v1/vms/{id}/resume"), None).ok();
    assert_eq!(woken["vm"]["state"], "VM_STATE_RUNNING", "{woken}");
    assert_ne!(woken["vm"]["vmmPid"], before["vmmPid"], "a new VMM");
    assert_eq!(
        woken["vm"]["network"], before["network"],
        "the same addresses"
    );
    let after = wait_ticks(&api, &id, frozen, 5);
    let text = api.console_text(&id);
    // Counting on, not booting again: one banner, then only ticks.
    assert_eq!(text.matches(TINY_MARKER).count(), 1, "{text}");
    assert!(after > frozen);
    let down = api
        .call(
            "POST",
            &format!("/v1/vms/{id}/shutdown"),
            Some(json!({"timeout_seconds": 10})),
        )
        .ok();
    assert_eq!(down["vm"]["state"], "VM_STATE_SHUTDOWN");
    assert!(
        !dir.join("suspend.mem").exists(),
        "the saved state goes with the stop"
    );
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    m.assert_clean();
}

/// The default Debian guest under Firecracker. Needs hardware KVM: on kvm-pvm hosts stock
/// kernels crash (KVM_EXIT_INTERNAL_ERROR), so this is skipped there with the reason.
fn full_guest_boots_where_hardware_kvm_exists() {
    let guest = guest_dir().unwrap_or_else(|| panic!("required prerequisite missing: {NO_GUEST}"));
    let m = metald_with_backend("firecracker").start(&guest);
    let api = Rest::new(&m, Some("fcfull"));
    let id = api.create_default();
    api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    api.wait_ready(&id);
    let down = api
        .call(
            "POST",
            &format!("/v1/vms/{id}/shutdown"),
            Some(json!({"timeout_seconds": 30})),
        )
        .ok();
    assert_eq!(down["vm"]["state"], "VM_STATE_SHUTDOWN");
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    assert!(m.vmm_pids().is_empty());
}

/// The jailed Firecracker seen from outside, and its network interface (with token-bucket rate
/// limits) as Firecracker itself reports it.
fn firecracker_runs_jailed_with_its_tap_and_rate_limits() {
    // Firecracker writes its metrics by itself only every 60 s: a 1 s interval makes metald
    // ask for them (FlushMetrics) within the test's time.
    let m = metald_with_backend("firecracker")
        .env("UNKEY_METALD_VMM_METRICS_INTERVAL", "1s")
        .start_with(Metald::import_tiny_guest);
    let iso = m.iso.as_ref().unwrap();
    let api = Rest::new(&m, Some("fcjail"));
    let limit = json!({"bandwidth_bytes_per_sec": 1_000_000, "burst_bytes": 65536});
    let body = json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
        "kernel": {"image_id": "tiny-elf"}, "rootfs": {"image_id": "tiny-disk"},
        "network": {"rx_rate_limit": limit, "tx_rate_limit": limit}}});
    let id = api.call("POST", "/v1/vms", Some(body)).ok()["vm"]["vmId"]
        .as_str()
        .unwrap()
        .to_string();
    let vm = api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok()["vm"].clone();
    api.wait_ready(&id);
    let pid = vm["vmmPid"].as_u64().unwrap();

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap()
            .trim()
            .to_string()
    };
    assert!(
        field("Uid").starts_with(&iso.uid_base.to_string()),
        "{status}"
    );
    assert_eq!(field("CapEff"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    let root = format!("/proc/{pid}/root");
    assert!(Path::new(&root).join("dev/kvm").exists());
    assert!(!Path::new(&root).join("etc/passwd").exists());
    let ns = |p: String| std::fs::read_link(p).unwrap();
    assert_ne!(
        ns(format!("/proc/{pid}/ns/net")),
        ns(format!("/proc/{}/ns/net", m.pid().unwrap()))
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups.contains(&format!("/{}/{id}", iso.cgroup_parent)),
        "{cgroups}"
    );

    // Firecracker's own view of the interface: the TAP in the VM's namespace, the MAC and the
    // token buckets metald derived (100 ms refills of a tenth of the rate, the burst once).
    let cfg = m.firecracker_get(&id, "/vm/config");
    let nic = &cfg["network-interfaces"][0];
    assert_eq!(nic["host_dev_name"], json!("tap0"), "{cfg}");
    assert_eq!(nic["guest_mac"], vm["network"]["macAddress"], "{cfg}");
    for dir in ["rx_rate_limiter", "tx_rate_limiter"] {
        let b = &nic[dir]["bandwidth"];
        assert_eq!(
            (
                b["size"].as_u64(),
                b["refill_time"].as_u64(),
                b["one_time_burst"].as_u64()
            ),
            (Some(100_000), Some(100), Some(65536)),
            "{dir}: {cfg}"
        );
    }

    // metald reads Firecracker's own metrics (FlushMetrics into a FIFO in the jail) every
    // UNKEY_METALD_VMM_METRICS_INTERVAL when Firecracker wrote none by itself, and keeps the
    // raw record: per-device objects for the root drive and eth0.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let raw = loop {
        let u = api.call("GET", &format!("/v1/vms/{id}/usage"), None).ok();
        if let Some(raw) = u["vmmMetricsRaw"].as_str().filter(|r| !r.is_empty()) {
            break raw.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no Firecracker metrics: {u}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    eprintln!("one Firecracker metrics flush:\n{raw}");
    let flush: Value = serde_json::from_str(&raw).unwrap();
    assert!(flush["block_rootfs"].is_object(), "{raw}");
    assert!(flush["net_eth0"].is_object(), "{raw}");
    assert!(
        flush["vcpu"].is_object() || flush["vmm"].is_object(),
        "{raw}"
    );
    api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
        .ok();
    m.assert_clean();
}

/// With the default interval (Firecracker's own 60 s), a boot costs no metrics flush, and the
/// record Firecracker writes as it exits is read before the run's last sample: the run's
/// last disk operations are counted.
fn firecracker_is_not_asked_for_metrics_at_boot_and_its_exit_record_is_read() {
    let m = metald_with_backend("firecracker").start_with(Metald::import_tiny_guest);
    let api = Rest::new(&m, Some("fcexit"));
    let id = api.create(tiny_request(1));
    api.boot_ready(&id);
    let raw = |api: &Rest| {
        api.call("GET", &format!("/v1/vms/{id}/usage"), None).ok()["vmmMetricsRaw"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Two sampling intervals on: still no record (none asked for, Firecracker's first is due
    // at 60 s).
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(raw(&api), "", "a record was asked for at boot");
    // A graceful stop: the polling guest resets at Ctrl-Alt-Del and Firecracker exits, writing
    // its metrics as it goes.
    let down = api
        .call(
            "POST",
            &format!("/v1/vms/{id}/shutdown"),
            Some(json!({"force": false})),
        )
        .ok();
    assert_eq!(down["vm"]["state"], "VM_STATE_SHUTDOWN", "{down}");
    let last = raw(&api);
    let record: Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last:?}"));
    assert_eq!(
        record["i8042"]["reset_count"].as_u64(),
        Some(1),
        "not the record of the exit: {last}"
    );
    assert!(record["block_rootfs"].is_object(), "{last}");
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    m.wait_vm_dir_gone(&id);
    m.assert_clean();
}

/// The warm pool's spares in metald's run directory: namespace pin name → namespace inode.
fn spares(m: &Metald) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = m.iso.as_ref().unwrap().run_dir.join("netns");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pool-"))
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().ok()?.ino(),
            ))
        })
        .collect()
}

/// Waits until the warm pool holds `n` spares, each with its veth end in metald's namespace.
fn wait_spares(m: &Metald, n: usize) -> std::collections::BTreeMap<String, u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now = spares(m);
        let ends = m
            .iso
            .as_ref()
            .unwrap()
            .netns
            .output("ip", &["-br", "link"])
            .lines()
            .filter(|l| l.starts_with("mw"))
            .count();
        if now.len() == n && ends == n {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} spares and {ends} veth ends, want {n}",
            now.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// UNKEY_METALD_WARM_POOL: spares are made at start; a boot takes one (the VM runs in the very
/// namespace that was a spare, with its TAP given to the VM's uid) and the pool is refilled;
/// metald SIGKILLed leaves its spares, which the next start sweeps before making new ones;
/// a clean stop removes them all.
fn the_warm_pools_are_taken_by_boots_refilled_swept_after_a_kill_and_removed_at_stop() {
    let mut m = metald_with_backend("firecracker")
        .env("UNKEY_METALD_WARM_POOL", "3")
        .start_with(Metald::import_tiny_guest);
    let before = wait_spares(&m, 3);
    // Both pools full (metald's default warm jails), as /metrics shows them.
    m.wait_pools(metald::config::DEFAULT_WARM_JAILS, 3);
    let api = Rest::new(&m, Some("pool"));
    let id = api.create(tiny_request(1));
    api.boot_ready(&id);
    // Its VMM started in a warm jail; both pools refill.
    assert_eq!(
        m.metric("metald_jail_starts_total{kind=\"warm\"}"),
        Some(1.0)
    );
    assert_eq!(
        m.metric("metald_jail_starts_total{kind=\"at_boot\"}"),
        Some(0.0)
    );
    m.wait_pools(metald::config::DEFAULT_WARM_JAILS, 3);
    let iso = m.iso.as_ref().unwrap();
    let pin = iso.run_dir.join("netns").join(&id);
    let ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&pin).unwrap().ino()
    };
    assert!(
        before.values().any(|i| *i == ino),
        "the VM's namespace {ino} is one of the spares {before:?}"
    );
    // `tun type tap ... persist on user <uid> group <gid>`
    let tap = crate::support::netns::output_in(&pin, "ip", &["-d", "link", "show", "tap0"]);
    let uid: u32 = tap
        .split_whitespace()
        .skip_while(|w| *w != "user")
        .nth(1)
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no owner on the TAP: {tap}"));
    assert!(
        uid >= iso.uid_base,
        "the TAP belongs to the VM's uid: {tap}"
    );
    let refilled = wait_spares(&m, 3);
    assert_ne!(refilled, before, "a new spare replaced the one taken");

    // Its warm jails wait for VMs; killed, metald leaves none: each ends when its socket
    // closes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while iso.warm_jails().len() < metald::config::DEFAULT_WARM_JAILS {
        assert!(std::time::Instant::now() < deadline, "{}", m.log_text());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Killed: its spares stay until the next start sweeps them and makes its own.
    m.kill();
    let iso = m.iso.as_ref().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !iso.warm_jails().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "warm jails outlived a killed metald: {:?}",
            iso.warm_jails()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(spares(&m), refilled, "a killed metald leaves its spares");
    m.spawn();
    wait_spares(&m, 3);
    // Each old spare's pin and veth end was removed by the sweep, as leftovers (names repeat
    // across runs and namespace inode numbers are reused, so the log is the witness).
    let log = m.log_text();
    let swept = |line: &str| log.lines().filter(|l| l.contains(line)).count();
    assert_eq!(
        swept("removing leftover network namespace path="),
        3,
        "{log}"
    );
    // A veth end still there when the sweep lists the interfaces is removed by name; the
    // kernel may have destroyed some already with their namespaces (it does so on a work
    // queue of its own, so how many varies: 2 of 3 in one CI run). None of the old ends is
    // left either way: `wait_spares` above counted exactly 3 ends, the new spares'.
    let ends_removed = swept("removing leftover VM interface interface=mw");
    assert!(ends_removed <= 3, "{ends_removed} ends removed: {log}");
    let api = Rest::new(&m, Some("pool"));
    assert_eq!(api.vm(&id)["state"], "VM_STATE_RUNNING");
    api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
        .ok();
    m.assert_clean();

    // A clean stop removes every spare: no pin, no veth end.
    m.stop();
    let iso = m.iso.as_ref().unwrap();
    assert_eq!(
        iso.leftovers(&m.data_dir, false),
        Vec::<String>::new(),
        "a stopped metald leaves no spare behind"
    );
}

/// Warm jails start from a root prepared once, holding the VMM's binary. A Firecracker replaced
/// on the host (an upgrade) is noticed at the pool's next refill: the jails it had ready are
/// ended and the root is prepared again, so the next boot runs the new binary.
fn warm_jails_run_the_firecracker_on_disk_once_it_is_replaced() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("firecracker");
    std::fs::copy(firecracker_bin().unwrap(), &bin).unwrap();
    let m = metald_with_backend("firecracker")
        .env("UNKEY_METALD_FIRECRACKER_BIN", bin.to_str().unwrap())
        .env("UNKEY_METALD_WARM_POOL", "1")
        .env("UNKEY_METALD_LOG", "info,metald_host::jailer=debug")
        .start_with(Metald::import_tiny_guest);
    m.wait_pools(metald::config::DEFAULT_WARM_JAILS, 1);
    assert!(
        m.log_text().contains("warm jails' root prepared"),
        "{}",
        m.log_text()
    );
    let old = std::fs::metadata(&bin).unwrap().ino();
    // Replaced as package managers do: a new file renamed over the old one.
    let new_file = dir.path().join("firecracker.new");
    std::fs::copy(&bin, &new_file).unwrap();
    std::fs::rename(&new_file, &bin).unwrap();
    let new = std::fs::metadata(&bin).unwrap().ino();
    assert_ne!(old, new);
    let api = Rest::new(&m, Some("upgrade"));
    let exe = |id: &str| {
        let pid = api.boot_ready(id)["vmmPid"].as_u64().unwrap();
        std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino()
    };
    // Its jail was ready before the replacement.
    let first = api.create(tiny_request(1));
    assert_eq!(exe(&first), old);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !m.log_text().contains("the VMM's files changed on the host") {
        assert!(std::time::Instant::now() < deadline, "{}", m.log_text());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    m.wait_pools(metald::config::DEFAULT_WARM_JAILS, 1);
    let second = api.create(tiny_request(2));
    assert_eq!(exe(&second), new, "{}", m.log_text());
    assert_eq!(
        m.metric("metald_jail_starts_total{kind=\"warm\"}"),
        Some(2.0)
    );
    for id in [first, second] {
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
    }
    m.assert_clean();
}

/// UNKEY_METALD_WARM_DISKS: the first create of an image copies it, and the image then gets
/// its spare copies (made and synced in the background, in the VMs' directory's `.spare`); the
/// next create takes one (its disk holds the image's bytes, a file of its own) and its VM boots
/// from it; a SIGKILLed metald leaves its spares, which the next start sweeps; a clean stop
/// removes them.
fn creates_take_spare_disk_copies_swept_after_a_kill_and_removed_at_stop() {
    use std::os::unix::fs::MetadataExt;
    let mut m = metald_with_backend("firecracker")
        .env("UNKEY_METALD_WARM_DISKS", "2")
        .start_with(Metald::import_tiny_guest);
    let vms = m.data_dir.join("vms");
    let spare_dir = vms.join(".spare");
    let spare_files = || {
        let mut names: Vec<String> = std::fs::read_dir(&spare_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let wait_spares = |m: &Metald, n: f64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while m.metric("metald_spare_disks") != Some(n) {
            assert!(std::time::Instant::now() < deadline, "{}", m.log_text());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let disk = |id: &str| vms.join(id).join("rootfs.img");
    assert_eq!(m.metric("metald_spare_disks"), Some(0.0));
    let api = Rest::new(&m, Some("spares"));
    let first = api.create(tiny_request(1));
    wait_spares(&m, 2.0);
    let made = spare_files();
    assert_eq!(made.len(), 2, "{made:?}");
    let second = api.create(tiny_request(1));
    assert_eq!(
        std::fs::read(disk(&second)).unwrap(),
        std::fs::read(disk(&first)).unwrap(),
        "the spare holds the image's bytes"
    );
    wait_spares(&m, 2.0);
    let refilled = spare_files();
    assert_eq!(refilled.len(), 2);
    assert_ne!(refilled, made, "one was taken and another made");
    assert_ne!(
        std::fs::metadata(disk(&first)).unwrap().ino(),
        std::fs::metadata(disk(&second)).unwrap().ino()
    );
    // Both boot, each VMM on its own disk, handed to its VM's uid the same way.
    for id in [&first, &second] {
        api.boot_ready(id);
    }
    let (a, b) = (
        std::fs::metadata(disk(&first)).unwrap(),
        std::fs::metadata(disk(&second)).unwrap(),
    );
    let uid_base = m.iso.as_ref().unwrap().uid_base;
    assert!(a.uid() >= uid_base && b.uid() >= uid_base && a.uid() != b.uid());
    assert_eq!(a.mode(), b.mode());

    // Killed: its spares stay until the next start sweeps them.
    m.kill();
    assert_eq!(spare_files(), refilled, "a killed metald leaves its spares");
    m.spawn();
    assert_eq!(spare_files(), Vec::<String>::new(), "swept at start");
    assert_eq!(m.metric("metald_spare_disks"), Some(0.0));
    let api = Rest::new(&m, Some("spares"));
    let third = api.create(tiny_request(1));
    wait_spares(&m, 2.0);
    for id in [&first, &second, &third] {
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
    }
    m.assert_clean();
    // A clean stop removes the spares.
    m.stop();
    assert_eq!(spare_files(), Vec::<String>::new(), "removed at stop");
}
