//! A clone's addresses: the guest of a VM restored from a snapshot still believes it has the
//! snapshot's source VM's addresses (its "inner" identity, in its memory). Each run of such a
//! VM maps them to its own, statelessly, inside its own network namespace:
//!
//! - a `bridge`-family table on `br0` rewrites the inner source address of what the guest
//!   sends (IPv6, IPv4, ARP's sender) to the VM's own, and the VM's own destination address
//!   of what it receives back to the inner one; nft fixes the IPv4 header checksum and the
//!   TCP/UDP/ICMPv6 pseudo-header checksums as it rewrites. It also points every unicast
//!   frame from the guest at this run's gateway MAC: the guest's neighbour cache may still
//!   hold the gateway MAC of the run it was saved in (a new veth has a new MAC), and with the
//!   permanent entries below the host never sends the solicitation that would refresh it;
//! - permanent neighbour entries on the host-side veth map the VM's own addresses to the
//!   guest's MAC, since the guest answers neighbour solicitations only for its inner
//!   addresses.
//!
//! Everything the guest sends leaves its namespace with the VM's own source address, so the
//! host's firewall (anti-spoofing, tenant isolation) judges it exactly as any VM's traffic. The
//! table goes with the namespace, the neighbour entries with the veth. A VM whose guest knows
//! its own addresses (any non-clone, and a clone after a cold boot) gets neither.

use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use rustix::thread::LinkNameSpaceType;

use super::VmNetworkPlan;

/// Name of the rewrite table inside a clone's namespace.
pub const TABLE: &str = "metald_clone";

/// The addresses a clone's guest believes it has, against the VM's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressMap {
    /// The guest's TAP (inside the namespace).
    pub tap: String,
    /// The guest's IPv6 address, and the VM's own.
    pub inner6: Ipv6Addr,
    /// The VM's own IPv6 address.
    pub own6: Ipv6Addr,
    /// Both IPv4 addresses, when the guest and the VM have one.
    pub v4: Option<(Ipv4Addr, Ipv4Addr)>,
}

impl AddressMap {
    /// The map for a run of the VM planned as `plan` whose guest believes it is at `inner6`
    /// and `inner4`; `None` when there is nothing to map.
    pub fn new(plan: &VmNetworkPlan, inner6: Ipv6Addr, inner4: Option<Ipv4Addr>) -> Option<Self> {
        let v4 = inner4.zip(plan.ipv4);
        if inner6 == plan.ipv6 && v4.is_none_or(|(i, o)| i == o) {
            return None;
        }
        Some(Self {
            tap: plan.tap.clone(),
            inner6,
            own6: plan.ipv6,
            v4,
        })
    }

    /// The nft script (one transaction) that makes the namespace's rewrite table afresh;
    /// `gateway_mac` is the MAC of the host side of this run's veth.
    ///
    /// A table already there (a map loaded again into the same namespace) is flushed, not
    /// deleted: a table's deletion unhooks its chain, and the commit then waits for an RCU
    /// grace period, which made the whole `nft` run 12-24 ms instead of 5-8 ms here. The map
    /// loads into a new namespace, with no table to flush, on the start of a clone's VMM.
    pub fn script(&self, gateway_mac: &str) -> String {
        let (tap, i6, o6) = (&self.tap, self.inner6, self.own6);
        let mut rules = vec![
            // The guest's only neighbour is its gateway: every unicast frame is for it.
            format!(
                "iifname \"{tap}\" ether daddr & 01:00:00:00:00:00 == 00:00:00:00:00:00 \
                 ether daddr set {gateway_mac}"
            ),
            format!("iifname \"{tap}\" ip6 saddr {i6} ip6 saddr set {o6}"),
            format!("iifname != \"{tap}\" ip6 daddr {o6} ip6 daddr set {i6}"),
        ];
        if let Some((i4, o4)) = self.v4 {
            rules.extend([
                format!("iifname \"{tap}\" ip saddr {i4} ip saddr set {o4}"),
                format!("iifname != \"{tap}\" ip daddr {o4} ip daddr set {i4}"),
                format!("iifname \"{tap}\" arp saddr ip {i4} arp saddr ip set {o4}"),
                format!("iifname != \"{tap}\" arp daddr ip {o4} arp daddr ip set {i4}"),
            ]);
        }
        let mut s = format!(
            "table bridge {TABLE}\nflush table bridge {TABLE}\ntable bridge {TABLE} {{\n\
             \tchain rewrite {{\n\t\ttype filter hook prerouting priority -300; policy accept;\n"
        );
        for r in rules {
            s.push_str("\t\t");
            s.push_str(&r);
            s.push('\n');
        }
        s.push_str("\t}\n}\n");
        s
    }

    /// The host-side neighbour entries: the VM's own addresses at the guest's MAC.
    pub fn own_addresses(&self) -> Vec<IpAddr> {
        let mut a = vec![IpAddr::V6(self.own6)];
        a.extend(self.v4.map(|(_, o)| IpAddr::V4(o)));
        a
    }
}

/// The nft script that removes the rewrite table (the guest cold-booted with its own
/// addresses in a namespace that stays).
pub fn removal_script() -> String {
    format!("table bridge {TABLE}\ndelete table bridge {TABLE}\n")
}

/// Errors applying a clone's address map.
#[derive(Debug, thiserror::Error)]
pub enum CloneMapError {
    /// The helper process could not be run.
    #[error("run {0}")]
    Spawn(PathBuf, #[source] io::Error),
    /// nft refused the script in the namespace.
    #[error("nft in {netns}: {stderr}")]
    Refused {
        /// The namespace.
        netns: PathBuf,
        /// What nft said.
        stderr: String,
    },
    /// A neighbour entry could not be made.
    #[error("neighbour {addr} on {interface}")]
    Neighbour {
        /// The address.
        addr: IpAddr,
        /// The host-side interface.
        interface: String,
        /// rtnetlink's error.
        #[source]
        source: rtnetlink::Error,
    },
    /// The host-side interface is not there.
    #[error("interface {0} not found")]
    NoInterface(String),
    /// The MAC is not six hex bytes.
    #[error("MAC {0} does not parse")]
    Mac(String),
    /// The netlink socket could not be opened.
    #[error("open netlink socket")]
    Netlink(#[source] io::Error),
}

/// Loads `script` with `nft` inside the namespace `netns`, through `metald-jail netns-nft` (a
/// fresh process enters the namespace: never a thread of metald's runtime).
pub async fn load_in_netns(
    jail_exe: &Path,
    nft: &Path,
    netns: &Path,
    script: &str,
) -> Result<(), CloneMapError> {
    let mut child = tokio::process::Command::new(jail_exe)
        .arg("netns-nft")
        .arg(netns)
        .arg(nft)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CloneMapError::Spawn(jail_exe.to_path_buf(), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| CloneMapError::Spawn(jail_exe.to_path_buf(), e))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| CloneMapError::Spawn(jail_exe.to_path_buf(), e))?;
    if out.status.success() {
        return Ok(());
    }
    // nft's message is a few lines; a bounded tail is enough to say why.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr.chars().take(2000).collect();
    Err(CloneMapError::Refused {
        netns: netns.to_path_buf(),
        stderr: format!("{} ({})", tail.trim(), out.status),
    })
}

/// `metald-jail netns-nft NETNS NFT`: enters the namespace and execs `nft -f -` (the script on
/// stdin). Runs before anything else in a fresh, single-threaded process; returns only on
/// failure.
pub fn enter_and_exec(netns: &Path, nft: &Path) -> io::Result<Infallible> {
    let ns = File::open(netns)?;
    rustix::thread::move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))?;
    drop(ns);
    use std::os::unix::process::CommandExt;
    Err(std::process::Command::new(nft)
        .args(["-f", "-"])
        .env_clear()
        .exec())
}

/// Makes the host-side neighbour entries of `map` on `host_if` (permanent, replacing any);
/// returns `host_if`'s own MAC (the guest's gateway MAC in this run).
pub async fn pin_neighbours(
    host_if: &str,
    map: &AddressMap,
    mac: &str,
) -> Result<String, CloneMapError> {
    let lla = parse_mac(mac).ok_or_else(|| CloneMapError::Mac(mac.to_string()))?;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(CloneMapError::Netlink)?;
    let conn = tokio::spawn(conn);
    let result = async {
        use futures_util::TryStreamExt;
        let mut links = handle
            .link()
            .get()
            .match_name(host_if.to_string())
            .execute();
        let (index, own_mac) = match links.try_next().await {
            Ok(Some(link)) => {
                let own = link.attributes.iter().find_map(|a| match a {
                    rtnetlink::packet_route::link::LinkAttribute::Address(m) => Some(format_mac(m)),
                    _ => None,
                });
                match own {
                    Some(own) => (link.header.index, own),
                    None => return Err(CloneMapError::NoInterface(host_if.to_string())),
                }
            }
            _ => return Err(CloneMapError::NoInterface(host_if.to_string())),
        };
        for addr in map.own_addresses() {
            handle
                .neighbours()
                .add(index, addr)
                .link_layer_address(&lla)
                .replace()
                .execute()
                .await
                .map_err(|source| CloneMapError::Neighbour {
                    addr,
                    interface: host_if.to_string(),
                    source,
                })?;
        }
        Ok(own_mac)
    }
    .await;
    conn.abort();
    result
}

fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(mac: &str) -> Option<Vec<u8>> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    (bytes.len() == 6).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(ipv6: &str, ipv4: Option<&str>) -> VmNetworkPlan {
        VmNetworkPlan {
            netns: "/run/metald/netns/vm".into(),
            tap: "tap0".into(),
            bridge: "br0".into(),
            peer_if: "mp0".into(),
            host_if: "mv0".into(),
            mac: "02:00:00:00:00:01".into(),
            ipv6: ipv6.parse().unwrap(),
            ipv4: ipv4.map(|a| a.parse().unwrap()),
            gateway6: "fd00::1".parse().unwrap(),
            gateway4: None,
            rx_rate_limit: None,
            tx_rate_limit: None,
        }
    }

    #[test]
    fn a_guest_at_its_own_addresses_gets_no_map() {
        let p = plan("fd00::7", Some("10.0.0.7"));
        assert_eq!(
            AddressMap::new(
                &p,
                "fd00::7".parse().unwrap(),
                Some("10.0.0.7".parse().unwrap())
            ),
            None
        );
    }

    #[test]
    fn a_clone_maps_both_directions_of_both_families_and_arp() {
        let p = plan("fd00::9", Some("10.0.0.9"));
        let m = AddressMap::new(
            &p,
            "fd00::5".parse().unwrap(),
            Some("10.0.0.5".parse().unwrap()),
        )
        .unwrap();
        let s = m.script("02:aa:bb:cc:dd:ee");
        for want in [
            "iifname \"tap0\" ether daddr & 01:00:00:00:00:00 == 00:00:00:00:00:00 ether daddr set 02:aa:bb:cc:dd:ee",
            "iifname \"tap0\" ip6 saddr fd00::5 ip6 saddr set fd00::9",
            "iifname != \"tap0\" ip6 daddr fd00::9 ip6 daddr set fd00::5",
            "iifname \"tap0\" ip saddr 10.0.0.5 ip saddr set 10.0.0.9",
            "iifname != \"tap0\" ip daddr 10.0.0.9 ip daddr set 10.0.0.5",
            "iifname \"tap0\" arp saddr ip 10.0.0.5 arp saddr ip set 10.0.0.9",
            "iifname != \"tap0\" arp daddr ip 10.0.0.9 arp daddr ip set 10.0.0.5",
        ] {
            assert!(s.contains(want), "{want} missing from\n{s}");
        }
        assert!(s.starts_with("table bridge metald_clone\nflush table bridge metald_clone\n"));
        assert_eq!(
            m.own_addresses(),
            vec![
                "fd00::9".parse::<IpAddr>().unwrap(),
                "10.0.0.9".parse().unwrap()
            ]
        );
        assert_eq!(
            parse_mac("02:00:00:00:00:0a"),
            Some(vec![2, 0, 0, 0, 0, 10])
        );
        assert_eq!(parse_mac("02:00:00"), None);
        assert_eq!(format_mac(&[2, 0, 0, 0, 0, 10]), "02:00:00:00:00:0a");
    }
}
