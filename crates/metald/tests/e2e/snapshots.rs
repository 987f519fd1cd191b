//! Snapshots that start new VMs, end to end: the Debian guest under QEMU (two clones of one
//! snapshot running at once, each at its own addresses, with disks of their own) and the
//! counting tiny guest under Firecracker (a clone counts on from the snapshot).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::lifecycle::tiny_request;
use crate::support::*;
use crate::Need;

/// The snapshot tests.
pub fn tests() -> Vec<crate::E2e> {
    let mut tests = crate::e2e![crate::QEMU_GUEST;
        qemu_clones_of_one_snapshot_run_at_once_at_their_own_addresses_with_their_own_disks,
        a_clone_reaches_its_customers_vms_and_never_another_customers,
    ];
    tests.extend(crate::e2e![&[Need::Root, Need::Firecracker, Need::Kvm];
        a_firecracker_clone_counts_on_from_its_snapshot_which_outlives_restarts_and_its_vm,
    ]);
    tests
}

/// A script that counts once a second on the console and leaves one file per count on its
/// disk (`/c-<n>`), so two clones' disks differ by the files each wrote.
const FILES_SCRIPT: &str = "n=0\nwhile true; do n=$((n+1)); echo $n > /c-$n; sync; echo \"COUNT $n\" > /dev/console; sleep 1; done\n";

fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COUNT ")?.parse().ok())
        .collect()
}

/// Waits until the VM's console shows a count above `above`; returns the counts.
fn wait_count(m: &Metald, id: &str, above: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let seen = counts(&m.console(id));
        if seen.last().is_some_and(|n| *n > above) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "no count above {above}: {}",
            m.console(id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `/c-<n>` files on a stopped VM's root disk.
fn count_files(m: &Metald, id: &str) -> Vec<u64> {
    let rootfs = m.data_dir.join("vms").join(id).join("rootfs.img");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "ls -p /"])
        .arg(&rootfs)
        .output()
        .unwrap();
    let mut n: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5)?.strip_prefix("c-")?.parse().ok())
        .collect();
    n.sort_unstable();
    n
}

fn network(vm: &Value) -> (String, String) {
    (
        vm["network"]["ipv6Address"].as_str().unwrap().to_string(),
        vm["network"]["ipv4Address"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// A counting Debian guest is snapshotted while it runs (it counts on), and two VMs are
/// created from the snapshot and booted at once. Each goes on counting from the snapshot (no
/// boot), each answers ping and ping6 at its own addresses while the source runs at the
/// addresses all three guests believe are theirs, and each wrote files the other's disk does
/// not have. Another customer can neither see, use nor delete the snapshot, and gets the same
/// answer as for a made-up id. The snapshot quota refuses a second one. A clone's cold boot
/// and a restored clone's reboot are ordinary boots at its own addresses. Deleting the
/// snapshot removes its files and leaves the clones be.
fn qemu_clones_of_one_snapshot_run_at_once_at_their_own_addresses_with_their_own_disks() {
    let guest = qemu_guest();
    let m = metald()
        .env("UNKEY_METALD_QUOTA_SNAPSHOTS", "2")
        .start(&guest);
    m.import_script("files", FILES_SCRIPT);
    let api = Rest::new(&m, Some("cloner"));
    let source = api.create_booted(script_request(Some("files")));
    let seen = wait_count(&m, &source, 2);
    let t0 = Instant::now();
    let snap = api
        .call("POST", &format!("/v1/vms/{source}/snapshots"), None)
        .ok();
    eprintln!("snapshot of a running Debian guest: {:?}", t0.elapsed());
    let snap = &snap["snapshot"];
    assert_eq!(snap["state"], "SNAPSHOT_STATE_READY", "{snap}");
    assert_eq!(snap["sourceVmId"], source.as_str());
    let sid = snap["snapshotId"].as_str().unwrap().to_string();
    let files = m.data_dir.join("snapshots").join(&sid);
    assert!(files.join("snapshot.state").is_file());
    assert!(files.join("rootfs.img").is_file());
    assert!(num(&snap["sizeBytes"]) > 0);
    let at_snapshot = *seen.last().unwrap();
    // The source runs on after its snapshot.
    assert_eq!(api.vm(&source)["state"], "VM_STATE_RUNNING");
    wait_count(&m, &source, at_snapshot + 1);

    // Another customer: the snapshot is not there for them, in the same words as a made-up id.
    let other = Rest::new(&m, Some("stranger"));
    assert_eq!(
        other.call("GET", "/v1/snapshots", None).ok()["snapshots"],
        Value::Null
    );
    let made_up = "snap-00000000-0000-4000-8000-000000000000";
    for (theirs, fake) in [
        (
            other.call("DELETE", &format!("/v1/snapshots/{sid}"), None),
            other.call("DELETE", &format!("/v1/snapshots/{made_up}"), None),
        ),
        (
            other.call("POST", "/v1/vms", Some(json!({"fromSnapshot": sid}))),
            other.call("POST", "/v1/vms", Some(json!({"fromSnapshot": made_up}))),
        ),
    ] {
        assert_eq!((theirs.status, fake.status), (404, 404));
        assert_eq!(
            theirs.message().replace(&sid, "ID"),
            fake.message().replace(made_up, "ID")
        );
    }
    assert!(files.is_dir(), "a stranger's delete removed nothing");

    let clones: Vec<String> = (0..2)
        .map(|_| {
            let c = api
                .call(
                    "POST",
                    "/v1/vms",
                    Some(json!({"fromSnapshot": sid, "config": {"metadata": {"clone": "yes"}}})),
                )
                .ok();
            assert_eq!(c["vm"]["state"], "VM_STATE_CREATED", "{c}");
            assert_eq!(c["vm"]["config"]["metadata"]["clone"], "yes");
            c["vm"]["vmId"].as_str().unwrap().to_string()
        })
        .collect();
    for id in &clones {
        let t0 = Instant::now();
        let booted = api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
        eprintln!("clone restored in {:?}", t0.elapsed());
        assert_eq!(booted["vm"]["state"], "VM_STATE_RUNNING", "{booted}");
    }
    let iso = m.iso.as_ref().unwrap();
    let src_net = network(&api.vm(&source));
    let mut nets = vec![src_net.clone()];
    for id in &clones {
        // On from the snapshot's count: the guest did not boot.
        let seen = wait_count(&m, id, at_snapshot + 1);
        assert!(
            seen[0] >= at_snapshot,
            "clone {id} counted from {} (snapshot at {at_snapshot})",
            seen[0]
        );
        assert!(
            !m.console(id).contains("Linux version"),
            "clone {id} booted"
        );
        nets.push(network(&api.vm(id)));
    }
    nets.sort();
    nets.dedup();
    assert_eq!(nets.len(), 3, "each VM has its own addresses: {nets:?}");
    // All three at once, each at its own addresses.
    for (v6, v4) in &nets {
        iso.netns.assert_pings(v6);
        assert!(!v4.is_empty(), "the test host has IPv4 on");
        iso.netns.assert_pings(v4);
    }
    // The firewall admits only each VM's own source address: the clones' answers passed it.
    let table = iso
        .netns
        .output("nft", &["list", "table", "inet", "metald"]);
    for (v6, _) in &nets {
        assert!(table.contains(v6.as_str()), "{v6} not allowed:\n{table}");
    }

    // The first clone stops; the second counts two more and stops.
    let stop = |id: &str| api.force_shutdown(id);
    stop(&clones[0]);
    let first_last = *counts(&m.console(&clones[0])).last().unwrap();
    wait_count(&m, &clones[1], first_last + 2);
    // A suspended clone wakes into its address map again.
    api.call("POST", &format!("/v1/vms/{}/suspend", clones[1]), None)
        .ok();
    let woken = api
        .call("POST", &format!("/v1/vms/{}/resume", clones[1]), None)
        .ok();
    assert_eq!(woken["vm"]["state"], "VM_STATE_RUNNING", "{woken}");
    let first_last = first_last.max(*counts(&m.console(&clones[1])).last().unwrap());
    wait_count(&m, &clones[1], first_last + 1);
    let (v6, v4) = network(&woken["vm"]);
    iso.netns.assert_pings(&v6);
    iso.netns.assert_pings(&v4);
    stop(&clones[1]);
    // QEMU cannot snapshot a paused VM and keep it paused: unimplemented, with the reason,
    // and nothing changed. A suspended one is snapshotted from its saved state, and wakes.
    // Two snapshots are the quota here.
    api.call("POST", &format!("/v1/vms/{source}/pause"), None)
        .ok();
    let paused = api.call("POST", &format!("/v1/vms/{source}/snapshots"), None);
    assert_eq!(
        (paused.status, paused.code()),
        (501, "unimplemented"),
        "{}",
        paused.body
    );
    assert!(paused.message().contains("resume it first"));
    assert_eq!(api.vm(&source)["state"], "VM_STATE_PAUSED");
    let suspended = api
        .call("POST", &format!("/v1/vms/{source}/suspend"), None)
        .ok();
    assert_eq!(
        suspended["vm"]["state"], "VM_STATE_SUSPENDED",
        "{suspended}"
    );
    let second = api
        .call("POST", &format!("/v1/vms/{source}/snapshots"), None)
        .ok();
    let second_id = second["snapshot"]["snapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = api.call("POST", &format!("/v1/vms/{source}/snapshots"), None);
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.message().contains("UNKEY_METALD_QUOTA_SNAPSHOTS"));
    api.call("POST", &format!("/v1/vms/{source}/resume"), None)
        .ok();
    let last = *counts(&m.console(&source)).last().unwrap();
    wait_count(&m, &source, last + 1);
    iso.netns.assert_pings(&src_net.0);
    stop(&source);
    api.call("DELETE", &format!("/v1/snapshots/{second_id}"), None)
        .ok();
    let (a, b) = (count_files(&m, &clones[0]), count_files(&m, &clones[1]));
    let only_b: Vec<u64> = b.iter().filter(|n| !a.contains(n)).copied().collect();
    assert!(
        !only_b.is_empty() && a.contains(&at_snapshot),
        "clone disks: {a:?} and {b:?} (snapshot at {at_snapshot})"
    );

    // A cold boot of a clone is an ordinary boot at its own addresses.
    let again = api
        .call("POST", &format!("/v1/vms/{}/boot", clones[0]), None)
        .ok();
    assert_eq!(again["vm"]["state"], "VM_STATE_RUNNING");
    api.wait_ready(&clones[0]);
    iso.netns.assert_pings(&network(&again["vm"]).0);
    stop(&clones[0]);
    // A reboot of a restored clone is a cold boot in the namespace that stays: its address
    // map goes, and the guest answers at its own addresses, which it now knows itself.
    let third = api
        .call("POST", "/v1/vms", Some(json!({"fromSnapshot": sid})))
        .ok()["vm"]["vmId"]
        .as_str()
        .unwrap()
        .to_string();
    api.call("POST", &format!("/v1/vms/{third}/boot"), None)
        .ok();
    let (v6, v4) = network(&api.vm(&third));
    iso.netns.assert_pings(&v6);
    let offset = m.console_len(&third);
    let rebooted = api
        .call(
            "POST",
            &format!("/v1/vms/{third}/reboot"),
            Some(json!({"force": true})),
        )
        .ok();
    assert_eq!(rebooted["vm"]["state"], "VM_STATE_RUNNING", "{rebooted}");
    api.wait_ready(&third);
    assert!(
        m.console_from(&third, offset).contains("Linux version"),
        "a cold boot"
    );
    iso.netns.assert_pings(&v6);
    iso.netns.assert_pings(&v4);
    stop(&third);
    api.call("DELETE", &format!("/v1/vms/{third}"), None).ok();

    // The source goes; the snapshot stays until deleted, and its files go with it.
    api.call("DELETE", &format!("/v1/vms/{source}"), None).ok();
    assert_eq!(
        api.call("GET", "/v1/snapshots", None).ok()["snapshots"][0]["snapshotId"],
        sid.as_str()
    );
    api.call("DELETE", &format!("/v1/snapshots/{sid}"), None)
        .ok();
    assert!(!files.exists(), "snapshot files removed");
    assert_eq!(
        api.call("DELETE", &format!("/v1/snapshots/{sid}"), None)
            .status,
        404
    );
    for id in &clones {
        api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    }
    m.assert_clean();
}

/// Tenant isolation holds for clones: a guest of customer alpha that pings alpha's VM, the
/// gateway and customer bravo's VM in rounds is snapshotted, and a clone of it goes on pinging
/// the same targets from its own addresses (through its address map). It reaches alpha's VM
/// and the gateway, and never bravo's: the firewall judges its traffic as any VM's.
fn a_clone_reaches_its_customers_vms_and_never_another_customers() {
    use crate::isolation::{ping_results, with_args};
    let guest = qemu_guest();
    let m = metald().start(&guest);
    let (a, b) = (Rest::new(&m, Some("alpha")), Rest::new(&m, Some("bravo")));
    let a1 = a.create(readme_request(1, 256 << 20));
    let b1 = b.create(readme_request(1, 256 << 20));
    let (a1vm, b1vm) = (a.boot_ready(&a1), b.boot_ready(&b1));
    let addrs = |vm: &Value| {
        [
            vm["network"]["ipv6Address"].as_str().unwrap().to_string(),
            vm["network"]["ipv4Address"].as_str().unwrap().to_string(),
        ]
    };
    let (own, other) = (addrs(&a1vm), addrs(&b1vm));
    let gw = [
        a1vm["network"]["gatewayIpv6"].as_str().unwrap().to_string(),
        a1vm["network"]["gatewayIpv4"].as_str().unwrap().to_string(),
    ];
    let targets = [own.as_slice(), gw.as_slice(), other.as_slice()]
        .concat()
        .join(",");
    let pinger = a.create(with_args(&format!("metald.ping={targets}")));
    a.boot_ready(&pinger);
    // Pinging before the snapshot: the clone starts mid-round.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ping_results(&m.console(&pinger)).contains_key(&other[1]) {
        assert!(
            Instant::now() < deadline,
            "no pings: {}",
            m.console(&pinger)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let snap = a
        .call("POST", &format!("/v1/vms/{pinger}/snapshots"), None)
        .ok();
    let sid = snap["snapshot"]["snapshotId"].as_str().unwrap().to_string();
    a.call("DELETE", &format!("/v1/vms/{pinger}?force=true"), None)
        .ok();
    let clone = a
        .call("POST", "/v1/vms", Some(json!({"fromSnapshot": sid})))
        .ok()["vm"]["vmId"]
        .as_str()
        .unwrap()
        .to_string();
    a.call("POST", &format!("/v1/vms/{clone}/boot"), None).ok();
    let deadline = Instant::now() + Duration::from_secs(120);
    let results = loop {
        let r = ping_results(&m.console(&clone));
        let reached = own
            .iter()
            .chain(gw.iter())
            .all(|t| r.get(t).is_some_and(|v| v.contains(&"ok".to_string())));
        let rounds = other
            .iter()
            .map(|t| r.get(t).map_or(0, Vec::len))
            .min()
            .unwrap_or(0);
        if reached && rounds >= 3 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the clone's pings never settled: {r:?}\n{}",
            m.console(&clone)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    for t in &other {
        assert!(
            results[t].iter().all(|r| r == "fail"),
            "the clone reached another customer's VM {t}: {results:?}"
        );
    }
    for (api, id) in [(&a, &a1), (&a, &clone), (&b, &b1)] {
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
    }
    a.call("DELETE", &format!("/v1/snapshots/{sid}"), None).ok();
    m.assert_clean();
}

/// The counting tiny guest under Firecracker is snapshotted while it counts (and once more
/// while paused, which it stays); the source is deleted; metald is SIGKILLed and started again (a half-made snapshot's directory is swept
/// then, the snapshot stays). A VM created from it boots from the snapshot: it counts on, with
/// no second banner, in a Firecracker of its own with its own disk copy.
fn a_firecracker_clone_counts_on_from_its_snapshot_which_outlives_restarts_and_its_vm() {
    let mut m = metald_with_backend("firecracker").start_with(Metald::import_tiny_guest);
    let api = Rest::new(&m, Some("fcsnap"));
    let mut req = tiny_request(1);
    req["config"]["kernel"]["image_id"] = json!("tiny-counting-elf");
    let id = api.create(req);
    api.boot_ready(&id);
    wait_console_len(&api, &id, TINY_MARKER.len() + 5);
    let snap = api
        .call("POST", &format!("/v1/vms/{id}/snapshots"), None)
        .ok();
    let sid = snap["snapshot"]["snapshotId"].as_str().unwrap().to_string();
    let files = m.data_dir.join("snapshots").join(&sid);
    for f in ["snapshot.state", "snapshot.mem", "rootfs.img"] {
        assert!(files.join(f).is_file(), "{f} in the snapshot");
    }
    // Nothing staged is left in the VM's directory, and the guest counts on.
    let vm_dir = m.data_dir.join("vms").join(&id);
    assert!(!vm_dir.join("snapshot.mem").exists());
    assert_eq!(api.vm(&id)["state"], "VM_STATE_RUNNING");
    let len = api.console_text(&id).len();
    wait_console_len(&api, &id, len + 3);
    // A paused VM is snapshotted and stays paused (Firecracker snapshots paused VMs anyway).
    api.call("POST", &format!("/v1/vms/{id}/pause"), None).ok();
    let paused_snap = api
        .call("POST", &format!("/v1/vms/{id}/snapshots"), None)
        .ok();
    let frozen = api.console_text(&id).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(api.vm(&id)["state"], "VM_STATE_PAUSED");
    assert_eq!(api.console_text(&id).len(), frozen, "a paused guest ran");
    let paused_sid = paused_snap["snapshot"]["snapshotId"].as_str().unwrap();
    api.call("DELETE", &format!("/v1/snapshots/{paused_sid}"), None)
        .ok();
    api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
        .ok();

    // A half-made snapshot (metald killed while writing it) and metald SIGKILLed.
    let half = m.data_dir.join("snapshots").join("snap-half-made");
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join("snapshot.state"), b"partial").unwrap();
    m.kill();
    m.spawn();
    let api = Rest::new(&m, Some("fcsnap"));
    assert!(!half.exists(), "the half-made snapshot is swept at start");
    let listed = api.call("GET", "/v1/snapshots", None).ok();
    assert_eq!(
        listed["snapshots"][0]["snapshotId"],
        sid.as_str(),
        "{listed}"
    );

    let clone = api
        .call("POST", "/v1/vms", Some(json!({"fromSnapshot": sid})))
        .ok()["vm"]["vmId"]
        .as_str()
        .unwrap()
        .to_string();
    let t0 = Instant::now();
    let booted = api
        .call("POST", &format!("/v1/vms/{clone}/boot"), None)
        .ok();
    assert_eq!(booted["vm"]["state"], "VM_STATE_RUNNING", "{booted}");
    wait_console_len(&api, &clone, 3);
    eprintln!(
        "Firecracker clone: CreateVm done, BootVm → 3 ticks in {:?}",
        t0.elapsed()
    );
    let text = api.console_text(&clone);
    assert!(!text.contains(TINY_MARKER), "the clone booted: {text}");
    assert!(text.chars().all(|c| c == TINY_TICK), "{text}");
    api.call("DELETE", &format!("/v1/vms/{clone}?force=true"), None)
        .ok();
    api.call("DELETE", &format!("/v1/snapshots/{sid}"), None)
        .ok();
    assert!(!files.exists());
    m.assert_clean();
}

/// Waits until the VM's console holds at least `len` characters.
fn wait_console_len(api: &Rest, id: &str, len: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.console_text(id).len() < len {
        assert!(
            Instant::now() < deadline,
            "console: {}",
            api.console_text(id)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
