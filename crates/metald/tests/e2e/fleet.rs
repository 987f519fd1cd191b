//! A fleet: three metald hosts sharing one real PostgreSQL (Debian's, started by the test as
//! `postgres` in a temporary directory), each in its own network namespace with its own data,
//! jail and run directories and cgroup parent, joined by a test-made bridge. They call each
//! other with mTLS (certificates made by the test); the test client is a trusted control
//! plane reaching every host through its relay.

use std::time::{Duration, Instant};

use crate::support::*;
use crate::Need;

pub fn tests() -> Vec<crate::E2e> {
    crate::e2e![&[Need::Root, Need::Qemu, Need::Guest, Need::Postgres];
        hosts_share_one_database_place_and_forward_and_report_a_dead_host_down]
}

/// Seconds of a host's lease: short, so the test sees a killed host go DOWN soon.
const LEASE_SECONDS: u64 = 3;

fn hosts_share_one_database_place_and_forward_and_report_a_dead_host_down() {
    // Room for 40 one-vCPU VMs in all (2 CPUs here): 14 on A, 13 on B and C.
    let Fleet {
        mut hosts,
        cp,
        pg,
        fabric: _fabric,
        pki: _pki,
    } = Fleet::start(&["7", "6.5", "6.5"], LEASE_SECONDS);
    let ids = ["host-a", "host-b", "host-c"];

    // Every host sees the same fleet: three hosts UP, each with a /64 and IPv4 block of its own.
    for via in &hosts {
        let fleet = cp.fleet(via);
        assert_eq!(fleet["thisHost"], via.id, "{fleet}");
        let listed = fleet["hosts"].as_array().unwrap();
        assert_eq!(listed.len(), 3, "{fleet}");
        let mut prefixes: Vec<&str> = listed
            .iter()
            .map(|h| h["ipv6Prefix"].as_str().unwrap())
            .collect();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 3, "each host its own /64: {fleet}");
        for id in ids {
            assert_eq!(status_of(&fleet, id), "HOST_STATUS_UP", "{fleet}");
        }
    }
    // C lost its image files (the shared catalog still lists them): its first create fetches
    // them from a peer over mTLS, verified by their sha256.
    let c_assets = hosts[2].m.data_dir.join("assets");
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(&c_assets).unwrap() {
        let path = entry.unwrap().path();
        removed.push((path.clone(), std::fs::read(&path).unwrap()));
        std::fs::remove_file(&path).unwrap();
    }
    assert!(!removed.is_empty());

    // Placement: 30 creates of one customer through A spread evenly over the three hosts.
    let mut spread = Vec::new();
    for _ in 0..30 {
        let r = cp.call(
            &hosts[0],
            "spread",
            "POST",
            "/v1/vms",
            Some(&fleet_vm_body()),
        );
        assert_eq!(r.status, 201, "{r:?}");
        spread.push(r.body["vm"]["vmId"].as_str().unwrap().to_string());
    }
    assert_eq!(cp.vm_counts(&hosts[2]), [10, 10, 10]);
    assert!(
        hosts[2]
            .m
            .log_text()
            .contains("fetching an image from a peer"),
        "{}",
        hosts[2].m.log_text()
    );
    for (path, content) in &removed {
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains(ROOTFS_ID)
        {
            assert_eq!(&std::fs::read(path).unwrap(), content, "{}", path.display());
        }
    }
    cp.delete_all(&hosts, "spread", &spread);
    assert_eq!(cp.vm_counts(&hosts[0]), [0, 0, 0]);
    // 60 creates at once, through all three hosts, against room for 40: exactly 40 are made,
    // the rest are refused as exhausted, and no host holds more than its room.
    let answers: Vec<Reply> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..60)
            .map(|i| {
                let (cp, via) = (&cp, &hosts[i % 3]);
                s.spawn(move || cp.call(via, "rush", "POST", "/v1/vms", Some(&fleet_vm_body())))
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let made: Vec<String> = answers
        .iter()
        .filter(|r| r.status == 201)
        .map(|r| r.body["vm"]["vmId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(made.len(), 40, "{answers:?}");
    for r in answers.iter().filter(|r| r.status != 201) {
        assert_eq!(
            (r.status, r.body["code"].as_str()),
            (429, Some("resource_exhausted")),
            "{r:?}"
        );
    }
    assert_eq!(cp.vm_counts(&hosts[1]), [14, 13, 13]);
    cp.delete_all(&hosts, "rush", &made);

    let b_net = hosts[1]
        .m
        .iso
        .as_ref()
        .unwrap()
        .netns
        .output("ip", &["-6", "route"]);
    let b_prefix = cp.fleet(&hosts[0])["hosts"][1]["ipv6Prefix"]
        .as_str()
        .unwrap()
        .to_string();

    // A VM created on B is listed through every host, and booted through A (forwarded to B):
    // B's block gives it its address.
    let vm = cp.call(&hosts[1], "acme", "POST", "/v1/vms", Some(&fleet_vm_body()));
    assert_eq!(vm.status, 201, "{vm:?} {}", hosts[1].m.log_text());
    let id = vm.body["vm"]["vmId"].as_str().unwrap().to_string();
    for via in &hosts {
        let r = cp.call(via, "acme", "GET", "/v1/vms", None);
        let seen: Vec<&str> = r.body["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["vmId"].as_str().unwrap())
            .collect();
        assert_eq!(seen, [id.as_str()], "listed through {}: {r:?}", via.id);
    }
    // Another customer: the same answer through a forwarding host as for a made-up id.
    let theirs = cp.call(
        &hosts[0],
        "other",
        "POST",
        &format!("/v1/vms/{id}/boot"),
        None,
    );
    let made_up = format!("/v1/vms/{}/boot", "vm-3f6f2a4e-0000-4000-8000-000000000000");
    let none = cp.call(&hosts[0], "other", "POST", &made_up, None);
    assert_eq!(
        (theirs.status, none.status),
        (404, 404),
        "{theirs:?} {none:?}"
    );
    assert_eq!(
        theirs.body["message"]
            .as_str()
            .map(|m| m.replace(&id, "ID")),
        none.body["message"]
            .as_str()
            .map(|m| m.replace("vm-3f6f2a4e-0000-4000-8000-000000000000", "ID")),
    );
    let booted = cp.call(
        &hosts[0],
        "acme",
        "POST",
        &format!("/v1/vms/{id}/boot"),
        None,
    );
    assert_eq!(booted.status, 200, "{booted:?} {}", hosts[1].m.log_text());
    assert_eq!(booted.body["vm"]["state"], "VM_STATE_RUNNING", "{booted:?}");
    let v6 = booted.body["vm"]["network"]["ipv6Address"]
        .as_str()
        .unwrap();
    let b_net64 = b_prefix.trim_end_matches("/64").trim_end_matches("::");
    assert!(v6.starts_with(b_net64), "{v6} in {b_prefix} ({b_net})");
    assert!(
        hosts[1].m.log_text().contains(&id),
        "B ran the boot: {}",
        hosts[1].m.log_text()
    );
    // The guest comes up on B (read through C, from the shared store) and answers there.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = cp.call(&hosts[2], "acme", "GET", &format!("/v1/vms/{id}"), None);
        if r.body["vm"]["guestReady"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "guest never ready: {r:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    hosts[1].m.iso.as_ref().unwrap().netns.assert_pings(v6);
    // Read through C from the shared store, it shows B's gateways, as B does.
    let on_b = cp.call(&hosts[1], "acme", "GET", &format!("/v1/vms/{id}"), None);
    let via_c = cp.call(&hosts[2], "acme", "GET", &format!("/v1/vms/{id}"), None);
    for field in ["gatewayIpv6", "gatewayIpv4", "ipv6Address", "ipv4Address"] {
        let want = &on_b.body["vm"]["network"][field];
        assert!(want.as_str().is_some_and(|v| !v.is_empty()), "{on_b:?}");
        assert_eq!(
            &via_c.body["vm"]["network"][field], want,
            "{field}: {via_c:?}"
        );
    }
    // Its console log (a file on B) and its live usage (B's meter) read through A.
    let console = cp.call(
        &hosts[0],
        "acme",
        "GET",
        &format!("/v1/vms/{id}/console"),
        None,
    );
    assert_eq!(console.status, 200, "{console:?}");
    assert!(
        console.body["output"]
            .as_str()
            .is_some_and(|o| !o.is_empty()),
        "{console:?}"
    );
    let usage = cp.call(
        &hosts[0],
        "acme",
        "GET",
        &format!("/v1/vms/{id}/usage"),
        None,
    );
    assert_eq!(usage.status, 200, "{usage:?}");
    assert_eq!(usage.body["vmId"], id.as_str(), "{usage:?}");
    // The customer's usage through A includes B's VM (B's meter answers for it).
    let all = cp.call(&hosts[0], "acme", "GET", "/v1/usage", None);
    assert_eq!(all.status, 200, "{all:?}");
    let listed: Vec<&str> = all.body["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vmId"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [id.as_str()], "{all:?}");
    // A snapshot asked through A is written on B; a clone asked through C is made on B, where
    // the snapshot's files are; deleting the snapshot through C removes them there.
    let snap = cp.call(
        &hosts[0],
        "acme",
        "POST",
        &format!("/v1/vms/{id}/snapshots"),
        None,
    );
    assert_eq!(snap.status, 201, "{snap:?} {}", hosts[1].m.log_text());
    let sid = snap.body["snapshot"]["snapshotId"]
        .as_str()
        .unwrap()
        .to_string();
    let files = hosts[1].m.data_dir.join("snapshots").join(&sid);
    assert!(
        files.join("snapshot.state").is_file(),
        "{}",
        files.display()
    );
    let before = cp.vm_counts(&hosts[0]);
    let clone = cp.call(
        &hosts[2],
        "acme",
        "POST",
        "/v1/vms",
        Some(&serde_json::json!({"fromSnapshot": sid})),
    );
    assert_eq!(clone.status, 201, "{clone:?}");
    assert_eq!(
        cp.vm_counts(&hosts[0]),
        [before[0], before[1] + 1, before[2]]
    );
    let clone_id = clone.body["vm"]["vmId"].as_str().unwrap().to_string();
    cp.delete_all(&hosts, "acme", &[clone_id]);
    let r = cp.call(
        &hosts[2],
        "acme",
        "DELETE",
        &format!("/v1/snapshots/{sid}"),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!files.exists(), "the snapshot's files went with it on B");

    // SIGKILL B: within its lease it is DOWN everywhere; its VM keeps its last state, shows
    // the host DOWN, and a call that needs B answers unavailable.
    hosts[1].m.kill();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(LEASE_SECONDS + 5);
    while status_of(&cp.fleet(&hosts[0]), "host-b") != "HOST_STATUS_DOWN" {
        assert!(Instant::now() < deadline, "B never went DOWN");
        std::thread::sleep(Duration::from_millis(100));
    }
    let down_after = killed.elapsed();
    eprintln!("fleet: a killed host was DOWN after {down_after:?} (lease {LEASE_SECONDS} s)");
    let r = cp.call(&hosts[2], "acme", "GET", &format!("/v1/vms/{id}"), None);
    assert_eq!(r.body["vm"]["state"], "VM_STATE_RUNNING", "{r:?}");
    assert_eq!(r.body["vm"]["hostStatus"], "HOST_STATUS_DOWN", "{r:?}");
    let r = cp.call(
        &hosts[2],
        "acme",
        "POST",
        &format!("/v1/vms/{id}/pause"),
        None,
    );
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (503, Some("unavailable")),
        "{r:?}"
    );
    assert!(!r.body.to_string().contains("host-b"), "{r:?}");
    // New VMs go to A and C meanwhile.
    let mut while_down = Vec::new();
    for _ in 0..4 {
        let r = cp.call(
            &hosts[0],
            "later",
            "POST",
            "/v1/vms",
            Some(&fleet_vm_body()),
        );
        assert_eq!(r.status, 201, "{r:?}");
        while_down.push(r.body["vm"]["vmId"].as_str().unwrap().to_string());
    }
    assert_eq!(cp.vm_counts(&hosts[2]), [2, 1, 2]);

    // B comes back: it re-adopts its VMM, is UP again, and its VM is paused through C and
    // deleted through A.
    let restarted = Instant::now();
    hosts[1].m.spawn();
    while status_of(&cp.fleet(&hosts[2]), "host-b") != "HOST_STATUS_UP" {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "B never came back UP"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "fleet: a restarted host was UP again after {:?}",
        restarted.elapsed()
    );
    let r = cp.call(
        &hosts[2],
        "acme",
        "POST",
        &format!("/v1/vms/{id}/pause"),
        None,
    );
    assert_eq!(r.status, 200, "{r:?} {}", hosts[1].m.log_text());
    assert_eq!(r.body["vm"]["state"], "VM_STATE_PAUSED", "{r:?}");
    let r = cp.call(
        &hosts[0],
        "acme",
        "DELETE",
        &format!("/v1/vms/{id}?force=true"),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    hosts[1].m.wait_vm_dir_gone(&id);
    for via in &hosts {
        let r = cp.call(via, "acme", "GET", &format!("/v1/vms/{id}"), None);
        assert_eq!(r.status, 404, "{r:?}");
    }
    cp.delete_all(&hosts, "later", &while_down);

    // PostgreSQL restarts under a stream of creates: metald recovers, every create it
    // acknowledged is stored, and the hosts stay UP.
    let (acked, failed) = std::thread::scope(|s| {
        let creates = s.spawn(|| {
            let (mut acked, mut failed) = (Vec::new(), Vec::new());
            let until = Instant::now() + Duration::from_secs(6);
            let mut i = 0;
            // Within the fleet's room (40), so every refusal is the restart's.
            while Instant::now() < until && acked.len() < 36 {
                let r = cp.call(
                    &hosts[i % 3],
                    "steady",
                    "POST",
                    "/v1/vms",
                    Some(&fleet_vm_body()),
                );
                i += 1;
                // Paced, so the run spans the restart.
                std::thread::sleep(Duration::from_millis(100));
                match r.status {
                    201 => acked.push((
                        Instant::now(),
                        r.body["vm"]["vmId"].as_str().unwrap().to_string(),
                    )),
                    _ => failed.push(r),
                }
            }
            (acked, failed)
        });
        std::thread::sleep(Duration::from_secs(2));
        let restarting = Instant::now();
        pg.restart().expect("restart PostgreSQL");
        let (acked, failed) = creates.join().unwrap();
        let before = acked.iter().filter(|(t, _)| *t < restarting).count();
        assert!(
            before > 0 && before < acked.len(),
            "the restart fell inside the run: {before} of {} before it",
            acked.len()
        );
        (
            acked.into_iter().map(|(_, id)| id).collect::<Vec<_>>(),
            failed,
        )
    });
    eprintln!(
        "fleet: {} creates acknowledged and {} refused across a PostgreSQL restart",
        acked.len(),
        failed.len()
    );
    assert!(!acked.is_empty());
    for r in &failed {
        assert_eq!(r.body["code"].as_str(), Some("unavailable"), "{r:?}");
    }
    let listed: Vec<String> = cp
        .call(&hosts[1], "steady", "GET", "/v1/vms?page_size=100", None)
        .body["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vmId"].as_str().unwrap().to_string())
        .collect();
    for id in &acked {
        assert!(
            listed.contains(id),
            "acknowledged create {id} lost: {listed:?}"
        );
    }
    let fleet = cp.fleet(&hosts[0]);
    for id in ids {
        assert_eq!(status_of(&fleet, id), "HOST_STATUS_UP", "{fleet}");
    }
    cp.delete_all(&hosts, "steady", &listed);
    for h in &mut hosts {
        h.m.stop();
    }
}
