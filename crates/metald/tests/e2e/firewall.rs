//! metald's nftables table on the real `nft` and the real kernel, without VMs: the table written
//! at start and every incremental change load and list back the same, and the rules keep
//! customers apart and guests to their own addresses, checked with pings between namespaces
//! standing in for VMs.
//!
//! Everything runs in namespaces each test makes (every `nft` through `nsenter --net=`); they
//! are deleted when the test ends, failed or not. The machine's own rules are never touched.

use std::io::Write;
use std::process::{Command, Stdio};

use std::fs::File;
use std::os::fd::AsFd;

use metald_host::network::nfnetlink::Nfnetlink;
use metald_host::network::nft::{Change, Firewall, FirewallVm, NftError};

use crate::support::netns::TestNetns;

/// This module's tests: root (namespaces) and `nft`, `ip`, `ping` (scripts/install-deps.sh).
pub fn tests() -> Vec<crate::E2e> {
    crate::e2e![&[crate::Need::Root];
        the_table_and_every_change_to_it_load_into_nft_and_list_back_the_same,
        a_refused_netlink_batch_changes_nothing_and_says_what_was_refused,
        a_batch_larger_than_the_sockets_send_buffer_is_still_one_transaction,
        the_rules_keep_customers_apart_and_guests_to_their_own_addresses,
    ]
}

/// Loads `script` with `nft -f -` inside `ns`.
fn load(ns: &TestNetns, script: &str) -> Result<(), String> {
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft (scripts/install-deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

fn must_load(ns: &TestNetns, script: &str) {
    if let Err(e) = load(ns, script) {
        panic!("nft refused:\n{e}\nscript:\n{script}");
    }
}

/// `nft list table inet metald` inside `ns`.
fn listed(ns: &TestNetns) -> String {
    let out = ns
        .command("nft")
        .args(["list", "table", "inet", "metald"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn fw_vm(customer: &str, n: u8, v4: bool) -> FirewallVm {
    FirewallVm {
        customer: customer.parse().unwrap(),
        host_if: format!("mv0000000000{n:02x}"),
        ipv6: format!("fd00:9::{n:x}").parse().unwrap(),
        ipv4: v4.then(|| format!("10.99.0.{n}").parse().unwrap()),
    }
}

/// metald's nfnetlink socket, opened inside `ns` (from a thread that moved there and ends).
fn netlink_in(ns: &TestNetns) -> Nfnetlink {
    let path = ns.path();
    std::thread::spawn(move || {
        let f = File::open(path).unwrap();
        rustix::thread::move_into_link_name_space(
            f.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        Nfnetlink::connect().unwrap()
    })
    .join()
    .unwrap()
}

/// Applies `change` as metald does (over nfnetlink) and commits it.
fn commit(fw: &mut Firewall, netlink: &Nfnetlink, change: Change) {
    if let Err(e) = netlink.apply(change.ops()) {
        panic!("refused: {e}\nas a script:\n{}", change.script());
    }
    fw.commit(change);
}

fn the_table_and_every_change_to_it_load_into_nft_and_list_back_the_same() {
    let host = TestNetns::new();
    let fresh = TestNetns::new();
    let scripted = TestNetns::new();
    let netlink = netlink_in(&host);
    let mut fw = Firewall::new(Some("uplink0".into()), Some("10.99.0.0/24".into()));
    for (id, vm) in [
        ("a1", fw_vm("acme", 1, true)),
        ("a2", fw_vm("acme", 2, false)),
        ("b1", fw_vm("bolt", 3, true)),
    ] {
        let c = fw.start(id, vm);
        fw.commit(c);
    }
    must_load(&host, &fw.render());
    let table = listed(&host);
    for part in [
        "\"mv000000000001\" . fd00:9::1",
        "\"mv000000000001\" . 10.99.0.1",
        "\"mv000000000002\" comment \"customer acme\" : 0x00000001",
        "0x00000002 . \"mv000000000003\"",
        "masquerade",
    ] {
        assert!(table.contains(part), "{part} not in:\n{table}");
    }
    assert!(!table.contains("\"mv000000000002\" . 10."), "{table}");
    // What nft lists is itself a valid table: loaded into a fresh namespace, it lists the same.
    must_load(&fresh, &table);
    assert_eq!(listed(&fresh), table);
    must_load(&scripted, &table);

    // Each incremental change, sent over nfnetlink as metald does or loaded as an nft script,
    // leaves exactly the table that writing it whole gives.
    let steps: Vec<(&str, Option<FirewallVm>)> = vec![
        ("c1", Some(fw_vm("cora", 4, true))),
        ("c2", Some(fw_vm("cora", 5, true))),
        ("a1", None),
        ("c1", None),
        ("a2", Some(fw_vm("acme", 2, true))),
        ("c2", None),
        ("d1", Some(fw_vm("dana", 6, false))),
        ("a2", None),
        ("b1", None),
        ("d1", None),
    ];
    for (id, vm) in steps {
        let what = format!("{id} {}", if vm.is_some() { "start" } else { "stop" });
        let change = match vm {
            Some(vm) => fw.start(id, vm),
            None => fw.stop(id).unwrap(),
        };
        let script = change.script();
        assert!(
            script.lines().all(|l| l.contains(" element ")),
            "{what}: only elements change:\n{script}"
        );
        must_load(&scripted, &script);
        commit(&mut fw, &netlink, change);
        must_load(&fresh, &fw.render());
        assert_eq!(listed(&host), listed(&fresh), "after {what}");
        assert_eq!(listed(&scripted), listed(&fresh), "after {what}, by nft");
    }
    assert!(fw.is_empty());
    let empty = listed(&host);
    assert!(!empty.contains("elements"), "nothing left:\n{empty}");
}

fn a_refused_netlink_batch_changes_nothing_and_says_what_was_refused() {
    let host = TestNetns::new();
    let netlink = netlink_in(&host);
    let mut fw = Firewall::new(None, None);
    let c = fw.start("a1", fw_vm("acme", 1, true));
    fw.commit(c);
    must_load(&host, &fw.render());
    let before = listed(&host);
    // b1's start, then a stop of a VM whose elements the table does not hold (as after someone
    // flushed them): the kernel refuses the delete, and b1's elements are not added either.
    let mut ops = fw.start("b1", fw_vm("bolt", 2, true)).ops().to_vec();
    let mut other = Firewall::new(None, None);
    let c = other.start("x1", fw_vm("acme", 9, false));
    other.commit(c);
    ops.extend_from_slice(other.stop("x1").unwrap().ops());
    match netlink.apply(&ops) {
        Err(NftError::Refused(e)) => {
            assert!(
                e.contains("delete element allowed6 { \"mv000000000009\" . fd00:9::9 }"),
                "{e}"
            );
            assert!(e.contains("No such file or directory"), "{e}");
            assert!(!e.contains("mv000000000002"), "only what was refused: {e}");
        }
        other => panic!("not refused: {other:?}"),
    }
    assert_eq!(listed(&host), before, "nothing of the batch applied");
    // The socket goes on working: the same start alone is applied.
    let c = fw.start("b1", fw_vm("bolt", 2, true));
    commit(&mut fw, &netlink, c);
    assert!(listed(&host).contains("\"mv000000000002\" . fd00:9::2"));
    // Without metald's table at all, a change is refused too.
    let bare = TestNetns::new();
    let err = netlink_in(&bare).apply(&ops[..1]).unwrap_err();
    assert!(matches!(err, NftError::Refused(_)), "{err:?}");
}

fn a_batch_larger_than_the_sockets_send_buffer_is_still_one_transaction() {
    let host = TestNetns::new();
    let netlink = netlink_in(&host);
    must_load(&host, &Firewall::new(None, None).render());
    // 2000 VMs' elements (several hundred KB of messages, beyond a socket's default send
    // buffer, as the removals after a mass delete can be) in one batch each way.
    let mut big = Firewall::new(None, None);
    let mut adds = Vec::new();
    for n in 0..2000u32 {
        let c = big.start(
            &format!("m{n}"),
            FirewallVm {
                customer: format!("c{}", n % 50).parse().unwrap(),
                host_if: format!("mvb{n:011x}"),
                ipv6: std::net::Ipv6Addr::from(
                    0xfd00_0009_0001_0000_0000_0000_0000_0000u128 + u128::from(n),
                ),
                ipv4: Some(std::net::Ipv4Addr::from(0x0a63_0000 + n)),
            },
        );
        adds.extend_from_slice(c.ops());
        big.commit(c);
    }
    netlink.apply(&adds).unwrap();
    assert_eq!(listed(&host).matches("fd00:9:1:").count(), 2000);
    let dels: Vec<_> = (0..2000u32)
        .flat_map(|n| big.stop(&format!("m{n}")).unwrap().ops().to_vec())
        .collect();
    netlink.apply(&dels).unwrap();
    assert!(!listed(&host).contains("fd00:9:1:"), "all removed");
}

/// A namespace standing in for a VM: `eth0` inside, its veth peer `mv…` in the host namespace,
/// addressed and routed as metald does (guest P::n/128 and S.n/32, gateway on the host side).
struct FakeVm {
    ns: TestNetns,
    v6: String,
    v4: String,
}

const GW6: &str = "fd00:9::1:1";
const GW4: &str = "10.99.1.1";

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl FakeVm {
    fn new(host: &TestNetns, vm: &FirewallVm, v4: &str) -> Self {
        let ns = TestNetns::new();
        let (h, g) = (&host.name, &ns.name);
        let hif = &vm.host_if;
        let v6 = vm.ipv6.to_string();
        ip(&format!(
            "-n {h} link add {hif} type veth peer name eth0 netns {g}"
        ));
        ip(&format!("-n {h} addr add {GW6}/128 dev {hif} nodad"));
        ip(&format!("-n {h} addr add {GW4}/32 dev {hif}"));
        ip(&format!("-n {h} link set {hif} up"));
        ip(&format!("-n {h} route add {v6}/128 dev {hif}"));
        ip(&format!("-n {h} route add {v4}/32 dev {hif}"));
        ip(&format!("-n {g} addr add {v6}/128 dev eth0 nodad"));
        ip(&format!("-n {g} addr add {v4}/32 dev eth0"));
        ip(&format!("-n {g} link set eth0 up"));
        ip(&format!("-n {g} route add {GW6}/128 dev eth0"));
        ip(&format!("-n {g} route add default via {GW6} dev eth0"));
        ip(&format!("-n {g} route add {GW4}/32 dev eth0"));
        ip(&format!("-n {g} route add default via {GW4} dev eth0"));
        Self {
            ns,
            v6,
            v4: v4.to_string(),
        }
    }

    /// One ping to `to`, from `from` when given (a source this VM does not own: spoofing).
    fn ping(&self, to: &str, from: Option<&str>) -> bool {
        let mut c = self.ns.command("ping");
        c.args(["-c1", "-W1"]);
        if let Some(src) = from {
            c.args(["-I", src]);
        }
        c.arg(to).output().unwrap().status.success()
    }
}

fn the_rules_keep_customers_apart_and_guests_to_their_own_addresses() {
    let host = TestNetns::new();
    let netlink = netlink_in(&host);
    for knob in ["net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1"] {
        let ok = host.command("sysctl").args(["-qw", knob]).status().unwrap();
        assert!(ok.success(), "{knob}");
    }
    let mut fw = Firewall::new(None, None);
    let a1 = fw_vm("acme", 1, true);
    let a2 = fw_vm("acme", 2, true);
    let b1 = fw_vm("bolt", 3, true);
    // bolt's second VM has no IPv4 from metald; its guest configures some anyway.
    let b2 = fw_vm("bolt", 4, false);
    let vms: Vec<FakeVm> = [&a1, &a2, &b1, &b2]
        .iter()
        .enumerate()
        .map(|(i, vm)| FakeVm::new(&host, vm, &format!("10.99.0.{}", i + 1)))
        .collect();
    for (id, vm) in [("a1", a1), ("a2", a2), ("b1", b1)] {
        let c = fw.start(id, vm);
        fw.commit(c);
    }
    must_load(&host, &fw.render());
    // b2 comes later, as a boot does: its elements alone.
    let c = fw.start("b2", b2);
    commit(&mut fw, &netlink, c);
    let [va1, va2, vb1, vb2] = [&vms[0], &vms[1], &vms[2], &vms[3]];

    // Warm up neighbour discovery so single pings are not lost to it.
    for vm in &vms {
        vm.ping(GW6, None);
    }
    let check = |what: &str, got: bool, want: bool| {
        assert_eq!(
            got,
            want,
            "{what}: expected {}",
            if want { "reach" } else { "no reach" }
        );
    };
    check("acme → acme v6", va1.ping(&va2.v6, None), true);
    check("acme → acme v4", va1.ping(&va2.v4, None), true);
    check("acme → gateway v6", va1.ping(GW6, None), true);
    check("acme → gateway v4", va1.ping(GW4, None), true);
    check("acme → bolt v6", va1.ping(&vb1.v6, None), false);
    check("acme → bolt v4", va1.ping(&vb1.v4, None), false);
    check("bolt → acme v6", vb1.ping(&va2.v6, None), false);
    check("bolt → bolt v6", vb1.ping(&vb2.v6, None), true);
    check(
        "IPv4 from a VM without IPv4",
        vb2.ping(&vb1.v4, None),
        false,
    );

    // Spoofing: a1's guest takes b1's addresses as well and sends from them. A reply would go
    // to b1, so what counts is whether the echo request arrived at all.
    ip(&format!(
        "-n {} addr add {}/128 dev eth0 nodad",
        va1.ns.name, vb1.v6
    ));
    ip(&format!(
        "-n {} addr add {}/32 dev eth0",
        va1.ns.name, vb1.v4
    ));
    let arrives = |to: &TestNetns, dst: &str, src: &str| {
        let before = echo_requests(to);
        va1.ping(dst, Some(src));
        echo_requests(to) != before
    };
    check("own v6 source", arrives(&va2.ns, &va2.v6, &va1.v6), true);
    check("own v4 source", arrives(&va2.ns, &va2.v4, &va1.v4), true);
    check(
        "spoofed v6 to acme",
        arrives(&va2.ns, &va2.v6, &vb1.v6),
        false,
    );
    check(
        "spoofed v4 to acme",
        arrives(&va2.ns, &va2.v4, &vb1.v4),
        false,
    );
    check(
        "spoofed v6 to the host",
        arrives(&host, GW6, &vb1.v6),
        false,
    );
    check(
        "spoofed v4 to the host",
        arrives(&host, GW4, &vb1.v4),
        false,
    );

    // A stopped VM's elements are gone: nothing reaches it or comes from it.
    let c = fw.stop("b2").unwrap();
    commit(&mut fw, &netlink, c);
    check("bolt → stopped bolt", vb1.ping(&vb2.v6, None), false);
    check(
        "stopped bolt → gateway",
        vb2.ping(GW6, Some(&vb2.v6)),
        false,
    );
    check("bolt → gateway", vb1.ping(GW6, None), true);
}

/// Echo requests received in `ns` so far, IPv6 and IPv4 (the namespace's own /proc/net).
fn echo_requests(ns: &TestNetns) -> (u64, u64) {
    let v6 = ns.output("cat", &["/proc/net/snmp6"]);
    let v6 = v6
        .lines()
        .find_map(|l| l.strip_prefix("Icmp6InEchos"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Icmp6InEchos");
    // /proc/net/snmp: an "Icmp:" line of names, then one of values.
    let v4 = ns.output("cat", &["/proc/net/snmp"]);
    let icmp: Vec<Vec<&str>> = v4
        .lines()
        .filter_map(|l| l.strip_prefix("Icmp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let at = icmp[0]
        .iter()
        .position(|n| *n == "InEchos")
        .expect("InEchos");
    (v6, icmp[1][at].parse().expect("InEchos value"))
}
