//! The fleet against one SQLite host, in the same run: three metald hosts on a real PostgreSQL
//! (each in its own namespace, mTLS between them, as the fleet e2e test sets them up) and one
//! host on its own SQLite file set up the same way otherwise (TLS, mTLS, namespace).
//!
//! Prints: creates per second through one host and through three at once (placement spreads
//! them, so most creates through one host are forwarded); GetVmInfo p50/p99 of a VM on the host
//! called, of a VM on another host (read from the shared store) and on the SQLite host; BootVm
//! on the VM's host and forwarded from another; how long a SIGKILLed host takes to show DOWN,
//! and how long a restarted host with running VMs takes to be UP with its VMs re-adopted.
//!
//! `cargo bench -p metald --bench fleet` (root, QEMU, the default guest, PostgreSQL 15).
//! FLEET_CREATES (default 60) and FLEET_READS (default 300) size it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Some(why) = metald_store::testing::pg::TestPostgres::unavailable() {
        println!("fleet bench SKIPPED: {why}");
        return;
    }
    if guest_dir().is_none() || qemu_bin().is_none() {
        println!("fleet bench SKIPPED: needs QEMU and the default guest (make guest)");
        return;
    }
    let creates: usize = env_num("FLEET_CREATES", 60);
    let reads: usize = env_num("FLEET_READS", 300);
    let lease = 3;
    let fleet = Fleet::start(&["1000", "1000", "1000"], lease);
    let single = Fleet::sqlite_host();
    let (cp, hosts) = (&fleet.cp, &fleet.hosts);

    println!("\n## Creates per second ({creates} creates, 3 clients at once)\n");
    println!("| through | creates/s | where they went (A/B/C) |");
    println!("|---|---|---|");
    let rate = |targets: &[&FleetHost], cp: &ControlPlane, customer: &str| -> (f64, Vec<String>) {
        let t0 = Instant::now();
        let ids: Vec<String> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..3)
                .map(|w| {
                    let via = targets[w % targets.len()];
                    s.spawn(move || {
                        (0..creates / 3)
                            .map(|_| {
                                let r = cp.create(via, customer);
                                assert_eq!(r.status, 201, "{r:?}");
                                r.body["vm"]["vmId"].as_str().unwrap().to_string()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        (ids.len() as f64 / t0.elapsed().as_secs_f64(), ids)
    };
    let (one, one_ids) = rate(&[&hosts[0]], cp, "one");
    let spread = cp.vm_counts(&hosts[0]);
    println!("| one host of three (A) | {one:.1} | {spread:?} |");
    cp.delete_all(hosts, "one", &one_ids);
    let (three, three_ids) = rate(&[&hosts[0], &hosts[1], &hosts[2]], cp, "three");
    let spread = cp.vm_counts(&hosts[0]);
    println!("| all three hosts | {three:.1} | {spread:?} |");
    cp.delete_all(hosts, "three", &three_ids);
    let (alone, alone_ids) = rate(&[&single.hosts[0]], &single.cp, "alone");
    println!("| the SQLite host | {alone:.1} | - |");
    single.cp.delete_all(&single.hosts, "alone", &alone_ids);

    println!("\n## Reads and forwarded calls ({reads} GetVmInfo each; 5 boots each)\n");
    println!("| call | p50 ms | p99 ms |");
    println!("|---|---|---|");
    let vm_on = |cp: &ControlPlane, host: &FleetHost| -> String {
        // Created through the host itself: with equal hosts placement keeps it there.
        let r = cp.create(host, "reader");
        assert_eq!(r.status, 201, "{r:?}");
        r.body["vm"]["vmId"].as_str().unwrap().to_string()
    };
    let get = |cp: &ControlPlane, via: &FleetHost, id: &str| -> Vec<Duration> {
        (0..reads)
            .map(|_| {
                let t = Instant::now();
                let r = cp.call(via, "reader", "GET", &format!("/v1/vms/{id}"), None);
                assert_eq!(r.status, 200, "{r:?}");
                t.elapsed()
            })
            .collect()
    };
    let on_a = vm_on(cp, &hosts[0]);
    let on_single = vm_on(&single.cp, &single.hosts[0]);
    percentiles(
        "GetVmInfo, SQLite host",
        &get(&single.cp, &single.hosts[0], &on_single),
    );
    percentiles(
        "GetVmInfo on the VM's host (PostgreSQL)",
        &get(cp, &hosts[0], &on_a),
    );
    percentiles(
        "GetVmInfo through another host (shared store)",
        &get(cp, &hosts[1], &on_a),
    );
    let boots = |cp: &ControlPlane, create_via: &FleetHost, boot_via: &FleetHost| {
        (0..5)
            .map(|_| {
                let id = vm_on(cp, create_via);
                let t = Instant::now();
                let r = cp.call(
                    boot_via,
                    "reader",
                    "POST",
                    &format!("/v1/vms/{id}/boot"),
                    None,
                );
                assert_eq!(r.status, 200, "{r:?}");
                let took = t.elapsed();
                let r = cp.call(
                    boot_via,
                    "reader",
                    "DELETE",
                    &format!("/v1/vms/{id}?force=true"),
                    None,
                );
                assert_eq!(r.status, 200, "{r:?}");
                took
            })
            .collect::<Vec<_>>()
    };
    percentiles(
        "BootVm, SQLite host",
        &boots(&single.cp, &single.hosts[0], &single.hosts[0]),
    );
    percentiles(
        "BootVm on the VM's host (PostgreSQL)",
        &boots(cp, &hosts[0], &hosts[0]),
    );
    percentiles(
        "BootVm forwarded from another host",
        &boots(cp, &hosts[0], &hosts[1]),
    );

    println!("\n## A host that dies and comes back (lease {lease} s)\n");
    // Three running VMs on B for it to re-adopt.
    let running: Vec<String> = (0..3)
        .map(|_| {
            let id = vm_on(cp, &hosts[1]);
            let r = cp.call(
                &hosts[1],
                "reader",
                "POST",
                &format!("/v1/vms/{id}/boot"),
                None,
            );
            assert_eq!(r.status, 200, "{r:?}");
            id
        })
        .collect();
    let mut fleet = fleet;
    fleet.hosts[1].m.kill();
    let killed = Instant::now();
    while status_of(&fleet.cp.fleet(&fleet.hosts[0]), "host-b") != "HOST_STATUS_DOWN" {
        std::thread::sleep(Duration::from_millis(20));
    }
    let down = killed.elapsed();
    let restarted = Instant::now();
    fleet.hosts[1].m.spawn();
    let listening = restarted.elapsed();
    while status_of(&fleet.cp.fleet(&fleet.hosts[0]), "host-b") != "HOST_STATUS_UP" {
        std::thread::sleep(Duration::from_millis(20));
    }
    let up = restarted.elapsed();
    // Re-adopted: each VM is paused through another host (the call needs its VMM).
    for id in &running {
        let r = fleet.cp.call(
            &fleet.hosts[2],
            "reader",
            "POST",
            &format!("/v1/vms/{id}/pause"),
            None,
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
    let adopted = restarted.elapsed();
    println!("| event | ms |");
    println!("|---|---|");
    println!("| SIGKILL until DOWN at another host | {:.0} |", ms(down));
    println!(
        "| restart until it serves (3 running VMs re-adopted in its start) | {:.0} |",
        ms(listening)
    );
    println!("| restart until UP at another host | {:.0} |", ms(up));
    println!(
        "| restart until its 3 VMs answered a forwarded PauseVm | {:.0} |",
        ms(adopted)
    );
    for (i, id) in running.iter().enumerate() {
        let r = fleet.cp.call(
            &fleet.hosts[i % 3],
            "reader",
            "DELETE",
            &format!("/v1/vms/{id}?force=true"),
            None,
        );
        assert_eq!(r.status, 200, "{r:?}");
    }
    for h in &mut fleet.hosts {
        h.m.stop();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One row: p50 and p99 of `samples`.
fn percentiles(name: &str, samples: &[Duration]) {
    let mut v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    println!("| {name} | {:.2} | {:.2} |", at(0.5), at(0.99));
}
