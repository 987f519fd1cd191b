//! What the firewall costs a boot and a stop as VMs pile up: with N VMs (spread over N/5
//! customers, and once over N customers) in metald's nftables table, one boot's firewall step
//! (add that VM's elements) and one stop's (delete them), over nfnetlink as metald sends them and
//! as the same change loaded by `nft -f -`, against the old way measured in the same run (render
//! the whole table, one rule pair per VM and a set plus a rule per customer, and replace it),
//! plus writing the whole table at start (`nft`). Prints a table of medians.
//!
//! `make bench` (or `cargo bench -p metald --bench firewall`); needs root and nft. Runs inside a
//! network namespace it makes and deletes; the machine's own rules are never touched.
//! `BENCH_FIREWALL_VMS=10,1000,5000` sets the sizes, `BENCH_RUNS=n` the boots and stops per size
//! (default 20; the old way gets at most 5 of each, it is slow).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use metald_host::network::kernel::{Nft, Rules};
use metald_host::network::nfnetlink::Nfnetlink;
use metald_host::network::nft::{Firewall, FirewallVm};
use support::netns::TestNetns;
use support::*;

fn vm(i: u32, customers: u32) -> FirewallVm {
    FirewallVm {
        customer: format!("customer-{}", i % customers).parse().unwrap(),
        host_if: format!("mv{i:012x}"),
        ipv6: Ipv6Addr::from(0xfd00_0001_0000_0000_0000_0000_0000_0000u128 | u128::from(i)),
        ipv4: Some(Ipv4Addr::from(0x0a00_0000 | i)),
    }
}

/// The table as metald wrote it before it had sets per VM (kept here only to compare): two
/// prerouting rules per VM, a set and a forward rule per customer, all rewritten on every change.
fn old_render(vms: &BTreeMap<String, FirewallVm>) -> String {
    let mut customers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for v in vms.values() {
        customers
            .entry(v.customer.as_str())
            .or_default()
            .push(v.host_if.as_str());
    }
    let mut s = String::from("table inet metald\ndelete table inet metald\ntable inet metald {\n");
    for (i, ifs) in customers.values().enumerate() {
        let names: Vec<String> = ifs.iter().map(|i| format!("\"{i}\"")).collect();
        let _ = writeln!(
            s,
            "  set customer_{i} {{ type ifname; elements = {{ {} }} }}",
            names.join(", ")
        );
    }
    s.push_str(
        "  chain prerouting {\n    type filter hook prerouting priority raw; policy accept;\n",
    );
    for v in vms.values() {
        let _ = writeln!(
            s,
            "    iifname \"{}\" ip6 saddr != {{ {}, fe80::/10, :: }} drop",
            v.host_if, v.ipv6
        );
        if let Some(v4) = v.ipv4 {
            let _ = writeln!(s, "    iifname \"{}\" ip saddr != {v4} drop", v.host_if);
        }
    }
    s.push_str(
        "  }\n  chain forward {\n    type filter hook forward priority filter; policy accept;\n",
    );
    for i in 0..customers.len() {
        let _ = writeln!(s, "    iifname @customer_{i} oifname @customer_{i} accept");
    }
    s.push_str("    iifname \"mv*\" drop\n    oifname \"mv*\" drop\n  }\n  chain input {\n    type filter hook input priority filter; policy accept;\n    iifname \"mv*\" meta l4proto { icmp, ipv6-icmp } accept\n    iifname \"mv*\" ct state established,related accept\n    iifname \"mv*\" drop\n  }\n}\n");
    s
}

fn timed<F: std::future::Future<Output = ()>>(rt: &tokio::runtime::Runtime, f: F) -> Duration {
    let t0 = Instant::now();
    rt.block_on(f);
    t0.elapsed()
}

/// One size: the rows of the table for `n` VMs over `customers` customers.
fn measure(
    rt: &tokio::runtime::Runtime,
    nft: &Nft,
    netlink: &Nfnetlink,
    n: u32,
    customers: u32,
    runs: usize,
) {
    let label = format!("{n} VMs, {customers} customers");
    let mut fw = Firewall::new(None, None);
    let mut old: BTreeMap<String, FirewallVm> = BTreeMap::new();
    for i in 1..=n {
        let v = vm(i, customers);
        old.insert(format!("vm{i}"), v.clone());
        let c = fw.start(&format!("vm{i}"), v);
        fw.commit(c);
    }
    let mut start = vec![];
    for _ in 0..3 {
        let script = fw.render();
        start.push(timed(rt, async {
            nft.load(&script).await.unwrap();
        }));
    }
    // The booted VM belongs to a customer that already runs VMs (the common case: no new tag).
    let extra = vm(n + 1, customers);
    let (mut boot, mut stop) = (vec![], vec![]);
    let (mut nft_boot, mut nft_stop) = (vec![], vec![]);
    for _ in 0..runs {
        boot.push(timed(rt, async {
            let c = fw.start("extra", extra.clone());
            netlink.apply(c.ops()).unwrap();
            fw.commit(c);
        }));
        stop.push(timed(rt, async {
            let c = fw.stop("extra").unwrap();
            netlink.apply(c.ops()).unwrap();
            fw.commit(c);
        }));
        nft_boot.push(timed(rt, async {
            let c = fw.start("extra", extra.clone());
            nft.load(&c.script()).await.unwrap();
            fw.commit(c);
        }));
        nft_stop.push(timed(rt, async {
            let c = fw.stop("extra").unwrap();
            nft.load(&c.script()).await.unwrap();
            fw.commit(c);
        }));
    }
    assert_eq!(fw.len(), n as usize);

    rt.block_on(nft.load(&old_render(&old))).unwrap();
    let (mut old_boot, mut old_stop) = (vec![], vec![]);
    for _ in 0..runs.min(5) {
        old_boot.push(timed(rt, async {
            old.insert("extra".into(), extra.clone());
            nft.load(&old_render(&old)).await.unwrap();
        }));
        old_stop.push(timed(rt, async {
            old.remove("extra");
            nft.load(&old_render(&old)).await.unwrap();
        }));
    }
    row(&format!("{label}: boot, add its elements"), &boot);
    row(&format!("{label}: stop, delete them"), &stop);
    row(&format!("{label}: boot, the same by nft -f"), &nft_boot);
    row(&format!("{label}: stop, the same by nft -f"), &nft_stop);
    row(&format!("{label}: boot, old full rewrite"), &old_boot);
    row(&format!("{label}: stop, old full rewrite"), &old_stop);
    row(&format!("{label}: whole table at start"), &start);
}

/// Moves this thread into `ns` and proves it did, before any nft runs here.
fn enter(ns: &Path) {
    let f = std::fs::File::open(ns).unwrap();
    rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap();
    let here = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
    assert_eq!(
        here,
        f.metadata().unwrap().ino(),
        "not in the bench's namespace"
    );
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("the firewall bench needs root (it makes a network namespace)");
        std::process::exit(2);
    }
    let sizes: Vec<u32> = std::env::var("BENCH_FIREWALL_VMS")
        .unwrap_or_else(|_| "10,1000,5000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("BENCH_FIREWALL_VMS: numbers"))
        .collect();
    let runs = env_num("BENCH_RUNS", 20);
    // Run by the bench itself: what is measured is nft's own work.
    let nft = Nft {
        binary: PathBuf::from("nft"),
        spawner: None,
        netlink: None,
    };
    let ns = TestNetns::new();
    let path = ns.path();
    println!(
        "firewall step of one boot and one stop, {runs} each (old way: {}); nft in a namespace of the bench's own",
        runs.min(5)
    );
    println!(
        "\n| {:<53} | median ms | min ms | max ms |",
        "VMs in the table: step"
    );
    println!(
        "|-------------------------------------------------------|-----------|--------|--------|"
    );
    // A thread of its own enters the namespace (namespaces are per thread), and every nft is
    // spawned from it, on a current-thread runtime that runs nothing elsewhere.
    let done = std::thread::spawn(move || {
        enter(&path);
        let netlink = Nfnetlink::connect().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for &n in &sizes {
            measure(&rt, &nft, &netlink, n, (n / 5).max(1), runs);
        }
        if let Some(&n) = sizes.iter().max() {
            // The worst case for anything per customer: every VM its own customer.
            measure(&rt, &nft, &netlink, n, n, runs);
        }
    })
    .join();
    drop(ns);
    if done.is_err() {
        panic!("the firewall bench failed (its namespace is removed)");
    }
}
