//! VM isolation, checked from outside running VMs (QEMU with TCG here, real guests): the VMM's
//! uid, capabilities, root, namespaces and cgroup; who can reach whom; rate limits; metald as a
//! plain user with only the documented capabilities; and that nothing is left behind.
//!
//! metald's host side runs in a namespace each test makes; no packet touches the machine's own.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::netns::{connect_in, output_in};
use crate::support::*;
use serde_json::{json, Value};

/// This module's tests: each boots the default guest under QEMU, but the last, which only starts
/// metald and its warm jails.
pub fn tests() -> Vec<crate::E2e> {
    crate::e2e![crate::QEMU_GUEST;
        a_jailed_vmm_runs_as_its_own_user_without_privileges_in_its_own_namespace_and_cgroup,
        customers_reach_their_own_vms_and_the_gateway_but_never_another_customers,
        a_rate_limited_vm_stays_under_its_limit_and_an_unlimited_one_does_not,
        metald_as_a_plain_user_with_only_the_documented_capabilities_runs_vms,
        leftovers_are_removed_after_a_vmm_crash_a_failed_boot_and_at_start,
        guests_reach_the_outside_only_through_an_explicitly_configured_interface,
    ]
    .into_iter()
    .chain(crate::e2e![&[crate::Need::Root, crate::Need::Qemu];
        jails_start_from_the_base_mount_namespace_whatever_namespace_metald_runs_in,
    ])
    .collect()
}

fn status(pid: u64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("{name} not in status"))
        .trim()
        .to_string()
}

fn inode(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

pub(crate) fn with_args(args: &str) -> Value {
    let mut body = readme_request(1, 256 << 20);
    body["config"]["kernel_args"] = json!(args);
    body
}

fn a_jailed_vmm_runs_as_its_own_user_without_privileges_in_its_own_namespace_and_cgroup() {
    // Both ways a jail is built end the same: at the boot, and ahead of it (a warm jail).
    for warm in ["0", "1"] {
        jailed_vmm_checks(warm);
    }
}

fn jailed_vmm_checks(warm_jails: &str) {
    let guest = qemu_guest();
    let m = metald()
        .env("UNKEY_METALD_WARM_JAILS", warm_jails)
        .env("UNKEY_METALD_LOG", "info,metald_host::jailer=debug")
        .start(&guest);
    let iso = m.iso.as_ref().unwrap();
    let api = Rest::new(&m, Some("acme"));
    let id = api.create(readme_request(2, 256 << 20));
    if warm_jails != "0" {
        // The pool fills in the background after the start.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !m.log_text().contains("warm jail ready") {
            assert!(std::time::Instant::now() < deadline, "{}", m.log_text());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let vm = api.boot_ready(&id);
    let pid = vm["vmmPid"].as_u64().unwrap();
    let net = &vm["network"];
    if warm_jails != "0" {
        // Warm jails start from the prepared root (no pivot_root of their own).
        assert!(
            m.log_text().contains("warm jails' root prepared"),
            "{}",
            m.log_text()
        );
    }
    let warm_line = m
        .log_text()
        .lines()
        .any(|l| l.contains("VMM started in a warm jail") && l.contains(&id));
    assert_eq!(warm_line, warm_jails != "0", "{}", m.log_text());

    // Its own uid/gid (the first slot of this metald's range), no capabilities, no way back.
    let st = status(pid);
    let uid = iso.uid_base.to_string();
    assert_eq!(
        status_field(&st, "Uid"),
        [uid.as_str(); 4].join("\t"),
        "{st}"
    );
    assert_eq!(
        status_field(&st, "Gid"),
        [uid.as_str(); 4].join("\t"),
        "{st}"
    );
    assert_eq!(status_field(&st, "Groups"), "");
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(status_field(&st, set), "0000000000000000", "{set}");
    }
    assert_eq!(status_field(&st, "NoNewPrivs"), "1");

    // Its root is the jail: a tmpfs holding only what QEMU needs, the VM's files at their host
    // paths, device nodes it owns; nothing of the host's /etc or /home.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(root.join("dev/net/tun").exists());
    assert!(
        !root.join("etc/passwd").exists(),
        "no host /etc in the jail"
    );
    assert!(!root.join("home").exists() && !root.join("root").exists());
    let vm_dir = m.data_dir.join("vms").join(&id);
    assert!(root
        .join(vm_dir.strip_prefix("/").unwrap())
        .join("rootfs.img")
        .exists());
    assert_eq!(
        std::fs::metadata(root.join("dev/net/tun")).unwrap().uid(),
        iso.uid_base
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_mount = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    assert!(root_mount.contains(" - tmpfs "), "{root_mount}");
    assert!(
        root_mount.split(' ').nth(5).unwrap().contains("ro"),
        "read-only root: {root_mount}"
    );
    // Nothing in the jail shares mount events with the host (no peer group).
    for line in mounts.lines() {
        let tags = line.split(" - ").next().unwrap_or_default();
        assert!(!tags.contains("shared:"), "{line}");
    }
    let kernel_mount = mounts
        .lines()
        .find(|l| l.contains("/assets/vmlinux-6.1"))
        .expect("kernel mounted in the jail");
    assert!(
        kernel_mount.split(' ').nth(5).unwrap().starts_with("ro"),
        "{kernel_mount}"
    );

    // Its own network namespace (not metald's), pinned where GetVmInfo says, holding the TAP
    // owned by its uid and bridged to its veth.
    let metald_ns = inode(format!("/proc/{}/ns/net", m.pid().unwrap()));
    let vmm_ns = inode(format!("/proc/{pid}/ns/net"));
    assert_ne!(vmm_ns, metald_ns);
    assert_eq!(
        metald_ns,
        inode(iso.netns.path()),
        "metald runs in the test's namespace"
    );
    let ns_file = net["networkNamespace"].as_str().unwrap();
    assert_eq!(inode(ns_file), vmm_ns);
    let tap = output_in(Path::new(ns_file), "ip", &["-d", "link", "show", "tap0"]);
    assert!(
        tap.contains("tun type tap") && tap.contains(&format!("user {uid}")),
        "{tap}"
    );
    assert!(tap.contains("master br0"), "{tap}");
    assert_eq!(net["tapDevice"], json!("tap0"));
    let host_links = iso.netns.output("ip", &["-br", "link"]);
    let host_if = net["hostInterface"].as_str().unwrap();
    assert!(host_links.contains(host_if), "{host_links}");
    // Both veth ends have one queue each way (the sampler reads their counters every tick,
    // and the kernel visits every receive queue of both ends to do so).
    let host_veth = iso.netns.output("ip", &["-d", "link", "show", host_if]);
    assert!(
        host_veth.contains("numtxqueues 1 numrxqueues 1"),
        "{host_veth}"
    );
    let peer = output_in(
        Path::new(ns_file),
        "ip",
        &["-d", "link", "show", "type", "veth"],
    );
    assert!(peer.contains("numtxqueues 1 numrxqueues 1"), "{peer}");
    // No IPv6 inside the VM's namespace (it only bridges frames): no address on its veth end,
    // bridge or TAP, so none of them solicits, reports or detects duplicates into metald's.
    let v6 = output_in(Path::new(ns_file), "ip", &["-6", "addr", "show"]);
    assert!(v6.trim().is_empty(), "{v6}");
    let off = output_in(
        Path::new(ns_file),
        "cat",
        &["/proc/sys/net/ipv6/conf/default/disable_ipv6"],
    );
    assert_eq!(off.trim(), "1");
    // The host end: the gateway and metald's own link-local fe80::<ifindex>/128, nothing the
    // kernel made (no EUI-64 address, no fe80::/64 route per VM).
    let index: u32 = host_veth
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .expect("interface index");
    let addrs = iso
        .netns
        .output("ip", &["-6", "-o", "addr", "show", "dev", host_if]);
    let addrs: Vec<&str> = addrs
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    let own_ll = format!(
        "{}/128",
        std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, (index >> 16) as u16, index as u16)
    );
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(
        addrs.contains(&own_ll.as_str()),
        "{own_ll} not in {addrs:?}"
    );
    assert!(
        addrs.iter().all(|a| a.ends_with("/128")),
        "only /128s: {addrs:?}"
    );
    let ll_routes = iso
        .netns
        .output("ip", &["-6", "route", "show", "fe80::/64", "dev", host_if]);
    assert!(ll_routes.trim().is_empty(), "{ll_routes}");

    // Its cgroup, with limits from its config: 2 vCPUs, 256 MiB + the VMM's headroom.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mine = format!("/{}/{id}", iso.cgroup_parent);
    let cg = Path::new("/sys/fs/cgroup");
    if cg.join("cgroup.controllers").exists() {
        assert!(cgroups.contains(&format!("0::{mine}")), "{cgroups}");
        let dir = cg.join(mine.trim_start_matches('/'));
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap().trim(),
            "200000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max"))
                .unwrap()
                .trim(),
            ((256 + 384) << 20).to_string()
        );
    } else {
        for c in ["cpu", "memory", "pids"] {
            assert!(
                cgroups.lines().any(|l| l.contains(c) && l.ends_with(&mine)),
                "{c}: {cgroups}"
            );
        }
        let read = |c: &str, f: &str| {
            std::fs::read_to_string(cg.join(c).join(mine.trim_start_matches('/')).join(f)).unwrap()
        };
        assert_eq!(read("cpu", "cpu.cfs_quota_us").trim(), "200000");
        assert_eq!(read("cpu", "cpu.cfs_period_us").trim(), "100000");
        assert_eq!(
            read("memory", "memory.limit_in_bytes").trim(),
            ((256u64 + 384) << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max").trim(), "512");
    }

    // The guest got its addresses from metald, and metald's side reaches it.
    let (v6, v4) = (
        net["ipv6Address"].as_str().unwrap(),
        net["ipv4Address"].as_str().unwrap(),
    );
    assert!(v6.starts_with(
        TEST_IPV6_PREFIX
            .trim_end_matches("/64")
            .trim_end_matches(':')
    ));
    assert!(
        m.console(&id).contains(&format!("ip6={v6} ip4={v4}")),
        "{}",
        m.console(&id)
    );
    for addr in [v6, v4] {
        iso.netns.assert_pings(addr);
    }

    api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
        .ok();
    m.assert_clean();
}

/// Ping results a guest printed (`METALD_PING round=N target=T result=R`): target → results.
pub(crate) fn ping_results(console: &str) -> std::collections::HashMap<String, Vec<String>> {
    let mut out: std::collections::HashMap<String, Vec<String>> = Default::default();
    for line in console.lines() {
        let Some(rest) = line.trim().strip_prefix("METALD_PING ") else {
            continue;
        };
        let field = |k: &str| {
            rest.split(' ')
                .find_map(|f| f.strip_prefix(k))
                .map(str::to_string)
        };
        if let (Some(t), Some(r)) = (field("target="), field("result=")) {
            out.entry(t).or_default().push(r);
        }
    }
    out
}

fn customers_reach_their_own_vms_and_the_gateway_but_never_another_customers() {
    let guest = qemu_guest();
    let m = metald().start(&guest);
    let (a, b) = (Rest::new(&m, Some("alpha")), Rest::new(&m, Some("bravo")));
    // First one VM per customer to be pinged ...
    let a1 = a.create(readme_request(1, 256 << 20));
    let b1 = b.create(readme_request(1, 256 << 20));
    let (a1vm, b1vm) = (a.boot_ready(&a1), b.boot_ready(&b1));
    let addrs = |vm: &Value| {
        [
            vm["network"]["ipv6Address"].as_str().unwrap().to_string(),
            vm["network"]["ipv4Address"].as_str().unwrap().to_string(),
        ]
    };
    let (a1addr, b1addr) = (addrs(&a1vm), addrs(&b1vm));
    let gw = [
        a1vm["network"]["gatewayIpv6"].as_str().unwrap().to_string(),
        a1vm["network"]["gatewayIpv4"].as_str().unwrap().to_string(),
    ];
    // ... then one per customer that pings its peer, the gateway and the other customer's VM.
    let pinger = |api: &Rest, own: &[String; 2], other: &[String; 2]| {
        let targets = [own.as_slice(), gw.as_slice(), other.as_slice()]
            .concat()
            .join(",");
        let id = api.create(with_args(&format!("metald.ping={targets}")));
        api.boot_ready(&id);
        id
    };
    let a2 = pinger(&a, &a1addr, &b1addr);
    let b2 = pinger(&b, &b1addr, &a1addr);

    for (id, own, other) in [(&a2, &a1addr, &b1addr), (&b2, &b1addr, &a1addr)] {
        // Wait until every reachable target answered, then for three more rounds.
        let deadline = Instant::now() + Duration::from_secs(120);
        let results = loop {
            let r = ping_results(&m.console(id));
            let reached = own
                .iter()
                .chain(gw.iter())
                .all(|t| r.get(t).is_some_and(|v| v.contains(&"ok".to_string())));
            let rounds = other
                .iter()
                .map(|t| r.get(t).map_or(0, Vec::len))
                .min()
                .unwrap_or(0);
            if reached && rounds >= 4 {
                break r;
            }
            assert!(
                Instant::now() < deadline,
                "pings never settled: {r:?}\n{}",
                m.console(id)
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        for t in own.iter().chain(gw.iter()) {
            assert_eq!(
                results[t].last().map(String::as_str),
                Some("ok"),
                "{id} → {t}: {results:?}"
            );
        }
        for t in other {
            assert!(
                results[t].iter().all(|r| r == "fail"),
                "{id} reached another customer's VM {t}: {results:?}"
            );
        }
    }
    for (api, id) in [(&a, &a1), (&a, &a2), (&b, &b1), (&b, &b2)] {
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
    }
    m.assert_clean();
}

/// Connects from metald's namespace to the guest, retrying until its listener is up.
fn connect_guest(m: &Metald, addr: SocketAddr) -> TcpStream {
    let ns = m.iso.as_ref().unwrap().netns.path();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match connect_in(&ns, addr) {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "connect {addr}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Bytes per second into the guest (rx) and out of it (tx), `BYTES` each way.
fn transfer_rates(m: &Metald, guest: IpAddr) -> (f64, f64) {
    let payload = vec![0x5au8; BYTES];
    let mut s = connect_guest(m, SocketAddr::new(guest, 5001));
    let t0 = Instant::now();
    s.write_all(&payload).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    // The guest answers with the byte count once it has read everything.
    let mut count = String::new();
    s.read_to_string(&mut count).unwrap();
    let rx = BYTES as f64 / t0.elapsed().as_secs_f64();
    assert_eq!(
        count.trim(),
        BYTES.to_string(),
        "the guest received everything"
    );
    let mut s = connect_guest(m, SocketAddr::new(guest, 5002));
    let t0 = Instant::now();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let tx = got.len() as f64 / t0.elapsed().as_secs_f64();
    assert_eq!(got.len(), BYTES, "the guest sent everything");
    (rx, tx)
}

const BYTES: usize = 768 * 1024;
const LIMIT: u64 = 192_000;
const BURST: u64 = 32 * 1024;

fn a_rate_limited_vm_stays_under_its_limit_and_an_unlimited_one_does_not() {
    let guest = qemu_guest();
    let m = metald().start(&guest);
    m.import_script("transfer",
        &format!(
            "nc -l -p 5001 -e /bin/busybox wc -c\ndd if=/dev/zero bs=65536 count={} 2>/dev/null | nc -l -p 5002\nexit 0\n",
            BYTES / 65536
        ),
    );
    let api = Rest::new(&m, Some("metered"));
    let body = |limited: bool| {
        let mut b = script_request(Some("transfer"));
        if limited {
            let l = json!({"bandwidth_bytes_per_sec": LIMIT, "burst_bytes": BURST});
            b["config"]["network"] = json!({"rx_rate_limit": l, "tx_rate_limit": l});
        }
        b
    };
    let mut rates = vec![];
    let warm_jails = Some(metald::config::DEFAULT_WARM_JAILS as f64);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while m.metric("metald_warm_jails") != warm_jails {
        assert!(std::time::Instant::now() < deadline, "{}", m.log_text());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for limited in [true, false] {
        let id = api.create(body(limited));
        let vm = api.boot_ready(&id);
        if limited {
            // QEMU's `tc` limits run host binaries in the jail before its pivot: this jail is
            // built at boot, and the warm jails are left as they were.
            assert_eq!(
                m.metric("metald_jail_starts_total{kind=\"at_boot\"}"),
                Some(1.0)
            );
            assert_eq!(m.metric("metald_warm_jails"), warm_jails);
        }
        let limits = &vm["config"]["network"];
        assert_eq!(
            limits["rxRateLimit"]["bandwidthBytesPerSec"]
                .as_str()
                .map(|_| true),
            limited.then_some(true),
            "{vm}"
        );
        let ip: IpAddr = vm["network"]["ipv6Address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        rates.push((limited, transfer_rates(&m, ip)));
        // The kernel's own view: the token buckets metald set up in the VM's namespace (on the
        // TAP towards the guest, on the veth end out of it) and the bytes that went through
        // them; an unlimited VM has none.
        let ns = vm["network"]["networkNamespace"]
            .as_str()
            .expect("network namespace");
        let shown = output_in(Path::new(ns), "tc", &["-s", "-j", "qdisc", "show"]);
        let qdiscs: Value = serde_json::from_str(&shown)
            .unwrap_or_else(|e| panic!("tc printed non-JSON ({e}): {shown}"));
        let tbf: Vec<&Value> = qdiscs
            .as_array()
            .expect("qdisc list")
            .iter()
            .filter(|q| q["kind"] == "tbf")
            .collect();
        if limited {
            assert_eq!(tbf.len(), 2, "one bucket each way: {qdiscs}");
            for q in tbf {
                assert_eq!(q["options"]["rate"].as_u64(), Some(LIMIT), "{q}");
                assert!(num(&q["bytes"]) >= BYTES as u64, "all traffic shaped: {q}");
            }
        } else {
            assert!(tbf.is_empty(), "an unlimited VM is not shaped: {qdiscs}");
        }
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
    }
    eprintln!("rates (bytes/s, rx tx): {rates:?}; limit {LIMIT}");
    let (_, (rx, tx)) = rates[0];
    // The burst may pass at once; the rest at the limit. 10 % tolerance for timing.
    let bound = |rate: f64| {
        let secs = BYTES as f64 / rate;
        (BYTES as f64 - BURST as f64) / secs
    };
    assert!(
        bound(rx) <= LIMIT as f64 * 1.1,
        "rx {rx:.0} B/s over the limit {LIMIT}"
    );
    assert!(
        bound(tx) <= LIMIT as f64 * 1.1,
        "tx {tx:.0} B/s over the limit {LIMIT}"
    );
    // How fast the unlimited VM goes depends on the machine, so it is only printed above; that
    // nothing slows it is what its namespace's qdiscs showed.
    m.assert_clean();
}

/// The capabilities the systemd unit grants (its `AmbientCapabilities=` lines).
fn documented_capabilities() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd/metald.service");
    let text = std::fs::read_to_string(unit).unwrap();
    let caps: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    assert!(!caps.is_empty());
    caps
}

fn metald_as_a_plain_user_with_only_the_documented_capabilities_runs_vms() {
    let guest = qemu_guest();
    let mut m = metald().prepare(|m| m.import_default_guest(&guest));
    // A uid and gid no account uses; metald's files belong to it, as `make install` arranges.
    let user = "4242";
    let out = std::process::Command::new("chown")
        .args([
            "-R",
            &format!("{user}:{user}"),
            m.data_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps = documented_capabilities();
    let list = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    m.spawn_wrapped(&[
        "setpriv".into(),
        format!("--reuid={user}"),
        format!("--regid={user}"),
        "--clear-groups".into(),
        format!("--inh-caps=-all,{list}"),
        format!("--ambient-caps=-all,{list}"),
        format!("--bounding-set=-all,{list}"),
        "--".into(),
    ]);
    let st = status(u64::from(m.pid().unwrap()));
    assert_eq!(status_field(&st, "Uid"), [user; 4].join("\t"));
    let eff = u64::from_str_radix(&status_field(&st, "CapEff"), 16).unwrap();
    assert_eq!(
        eff.count_ones() as usize,
        caps.len(),
        "exactly the documented set: {caps:?}"
    );

    let api = Rest::new(&m, Some("plain"));
    let id = api.create(readme_request(1, 256 << 20));
    // Its warm jails too run with only these capabilities (cloning the VM's files as mount
    // trees, joining its cgroups through descriptors metald opened).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while m.iso.as_ref().unwrap().warm_jails().is_empty() {
        assert!(std::time::Instant::now() < deadline, "{}", m.log_text());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let vm = api.boot_ready(&id);
    let pid = vm["vmmPid"].as_u64().unwrap();
    assert_eq!(status_field(&status(pid), "CapEff"), "0000000000000000");
    assert!(
        !m.log_text().contains("warm jail failed"),
        "{}",
        m.log_text()
    );
    let c = api.call("GET", &format!("/v1/vms/{id}/console"), None).ok();
    assert!(c["output"].as_str().unwrap().contains("METALD_GUEST_READY"));
    api.force_shutdown(&id);
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    m.assert_clean();
}

fn leftovers_are_removed_after_a_vmm_crash_a_failed_boot_and_at_start() {
    let guest = qemu_guest();
    let mut m = metald().start(&guest);
    let api = Rest::new(&m, Some("sweeper"));

    // A boot that fails after its network and jail were made (the kernel vanished).
    let out = m.assets(&[
        "import",
        "--id",
        "gone",
        "--kind",
        "kernel",
        "--file",
        guest.join("vmlinux").to_str().unwrap(),
        "--initrd",
        "initrd-6.1",
    ]);
    assert!(out.status.success());
    let mut body = readme_request(1, 256 << 20);
    body["config"]["kernel"]["image_id"] = json!("gone");
    let doomed = api.create(body);
    // A directory where the kernel file was: the boot finds the image present (nothing to
    // fetch) and fails in the VMM, after its sandbox was made.
    std::fs::remove_file(m.data_dir.join("assets/gone")).unwrap();
    std::fs::create_dir(m.data_dir.join("assets/gone")).unwrap();
    let r = api.call("POST", &format!("/v1/vms/{doomed}/boot"), None);
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(
        api.vm(&doomed)["state"],
        json!("VM_STATE_CREATED"),
        "a failed boot changes nothing"
    );
    m.assert_clean();

    // metald dies hard with a VM running, the VM's VMM dies while it is down, and an unknown
    // VM's namespace pin, cgroup and jail directory are lying around: the next start removes
    // all of it and marks the VM FAILED.
    let id = api.create(readme_request(1, 256 << 20));
    let pid = api.boot_ready(&id)["vmmPid"].as_u64().unwrap();
    m.kill();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let iso = m.iso.as_ref().unwrap();
    let stray = "vm-00000000-0000-4000-8000-000000000001";
    std::fs::create_dir_all(iso.run_dir.join("netns")).unwrap();
    std::fs::write(iso.run_dir.join("netns").join(stray), "").unwrap();
    std::fs::create_dir_all(iso.jail_dir.join("qemu").join(stray).join("root")).unwrap();
    for parent in iso.cgroup_dirs() {
        std::fs::create_dir_all(parent.join(stray)).unwrap();
    }
    assert!(!iso.leftovers(&m.data_dir, false).is_empty());
    m.spawn();
    let vm = api.vm(&id);
    assert_eq!(vm["state"], json!("VM_STATE_FAILED"), "{vm}");
    m.assert_clean();
    assert!(
        m.log_text().contains("removing leftover network namespace"),
        "each removal is logged"
    );
    assert!(m.log_text().contains("removing leftover jail directory"));
    assert!(m.log_text().contains("removing leftover VM cgroup"));
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    api.call("DELETE", &format!("/v1/vms/{doomed}"), None).ok();
    m.assert_clean();
}

/// Outbound access: a host outside metald's namespace (in a namespace the test makes, linked
/// to metald's by a veth) is unreachable from guests by default, and reachable (IPv4
/// masqueraded, IPv6 routed) only when UNKEY_METALD_OUTBOUND_INTERFACE names the link.
fn guests_reach_the_outside_only_through_an_explicitly_configured_interface() {
    let guest = qemu_guest();
    for outbound in [false, true] {
        let mut b = metald();
        if outbound {
            b = b.env("UNKEY_METALD_OUTBOUND_INTERFACE", "uplink0");
        }
        let m = b.prepare(|m| m.import_default_guest(&guest));
        let iso = m.iso.as_ref().unwrap();
        // The "outside": 198.51.100.2 and 2001:db8:1::2 (documentation ranges), in a namespace of
        // the test's own, whose only route back to the VMs goes through metald's namespace.
        let outside = crate::support::netns::TestNetns::new();
        let sh = |cmd: &str| {
            let out = std::process::Command::new("sh")
                .args(["-c", cmd])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (mns, ons) = (&iso.netns.name, &outside.name);
        sh(&format!(
            "ip -n {mns} link add uplink0 type veth peer name eth0 netns {ons}"
        ));
        sh(&format!("ip -n {mns} addr add 198.51.100.1/24 dev uplink0 && ip -n {mns} addr add 2001:db8:1::1/64 dev uplink0 nodad && ip -n {mns} link set uplink0 up"));
        sh(&format!("ip -n {ons} addr add 198.51.100.2/24 dev eth0 && ip -n {ons} addr add 2001:db8:1::2/64 dev eth0 nodad && ip -n {ons} link set eth0 up"));
        sh(&format!(
            "ip -n {ons} -6 route add {TEST_IPV6_PREFIX} via 2001:db8:1::1"
        ));
        let mut m = m;
        m.spawn();
        let api = Rest::new(&m, Some("outbound"));
        let id = api.create(with_args("metald.ping=198.51.100.2,2001:db8:1::2"));
        api.boot_ready(&id);
        let deadline = Instant::now() + Duration::from_secs(60);
        let results = loop {
            let r = ping_results(&m.console(&id));
            let rounds = ["198.51.100.2", "2001:db8:1::2"]
                .iter()
                .map(|t| r.get(*t).map_or(0, Vec::len))
                .min()
                .unwrap();
            let reached = r.values().all(|v| v.contains(&"ok".to_string())) && !r.is_empty();
            if (outbound && reached && rounds >= 2) || (!outbound && rounds >= 4) {
                break r;
            }
            assert!(Instant::now() < deadline, "outbound={outbound}: {r:?}");
            std::thread::sleep(Duration::from_millis(500));
        };
        for (target, res) in &results {
            if outbound {
                assert_eq!(
                    res.last().map(String::as_str),
                    Some("ok"),
                    "{target}: {results:?}"
                );
            } else {
                assert!(
                    res.iter().all(|r| r == "fail"),
                    "reached {target} without outbound access: {results:?}"
                );
            }
        }
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
        m.assert_clean();
    }
}

/// metald started in a mount namespace of its own (a container's, a unit's with
/// `PrivateTmp`): its jails still start from the small base namespace it makes, whichever CPUs
/// made the two. Since Linux 6.18 namespace ids come from per-CPU batches, so the base
/// namespace may get a lower id than metald's own; a bind mount of it then failed (EINVAL) and
/// every jail copied metald's whole mount table, one network namespace pin per VM.
fn jails_start_from_the_base_mount_namespace_whatever_namespace_metald_runs_in() {
    let allowed = rustix::thread::sched_getaffinity(None).unwrap();
    let cpus: Vec<usize> = (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .take(2)
        .collect();
    // Each order of the two CPUs: on one of them metald's namespace gets the higher id.
    let orders: Vec<(usize, usize)> = match cpus[..] {
        [a, b] => vec![(a, b), (b, a)],
        _ => vec![(cpus[0], cpus[0])],
    };
    for (own_ns_cpu, metald_cpu) in orders {
        let mut m = metald()
            .env("UNKEY_METALD_WARM_JAILS", "1")
            .env("UNKEY_METALD_LOG", "info,metald_host::jailer=debug")
            .prepare(|_| {});
        m.spawn_wrapped(&[
            "taskset".into(),
            "-c".into(),
            own_ns_cpu.to_string(),
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "taskset".into(),
            "-c".into(),
            metald_cpu.to_string(),
        ]);
        let pid = m.pid().unwrap();
        assert_ne!(
            inode(format!("/proc/{pid}/ns/mnt")),
            inode("/proc/self/ns/mnt"),
            "metald runs in a mount namespace of its own"
        );
        // Both namespaces metald holds for its jails are made, on threads of its own: the base
        // one (cold jails enter it) and the prepared root a warm jail is built from.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !m.log_text().contains("warm jail ready") {
            assert!(Instant::now() < deadline, "{}", m.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = m.log_text();
        let at = format!("/proc/{pid}/task/");
        for made in [
            "jails' base mount namespace made",
            "warm jails' root prepared",
        ] {
            assert!(
                log.lines().any(|l| l.contains(made) && l.contains(&at)),
                "CPU {own_ns_cpu} then {metald_cpu}: {log}"
            );
        }
        assert!(
            !log.contains("base mount namespace failed")
                && !log.contains("warm jails' root failed")
                && !log.contains("warm jail failed"),
            "CPU {own_ns_cpu} then {metald_cpu}: {log}"
        );
        m.stop();
        m.assert_clean();
    }
}
