//! metald's nftables table: tenant isolation, anti-spoofing and (optionally) outbound access.
//!
//! The whole table is rendered from the running VMs and replaced in one `nft -f` transaction on
//! every change, so the rules can never drift from what runs, and a restart or a crash between
//! two changes leaves nothing stale. `nft` is the tool made for this; its netlink protocol
//! (libnftnl's job) is not something to write by hand.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// Name of metald's table (family inet: one table for IPv4 and IPv6).
pub const TABLE: &str = "metald";

/// One running VM as the firewall sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallVm {
    /// Owner: VMs of the same customer may reach each other.
    pub customer: String,
    /// The VM's host-side interface.
    pub host_if: String,
    /// The guest's IPv6 address (the only IPv6 source it may use, besides link-local).
    pub ipv6: Ipv6Addr,
    /// The guest's IPv4 address, if IPv4 is on.
    pub ipv4: Option<Ipv4Addr>,
}

/// Everything the table is made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Firewall {
    /// Running VMs by id.
    pub vms: BTreeMap<String, FirewallVm>,
    /// Interface to the outside world VMs may use, if outbound access is on.
    pub outbound_interface: Option<String>,
    /// The IPv4 subnet to masquerade on the outbound interface.
    pub ipv4_subnet: Option<String>,
}

/// Prefix of every host-side VM interface name.
pub const HOST_IF_PREFIX: &str = "mv";

impl Firewall {
    /// The nft script that replaces metald's table atomically.
    pub fn render(&self) -> String {
        let vm_if = format!("\"{HOST_IF_PREFIX}*\"");
        let mut customers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for vm in self.vms.values() {
            customers
                .entry(vm.customer.as_str())
                .or_default()
                .push(vm.host_if.as_str());
        }
        let mut s = String::new();
        // `table` first so `delete` never fails on a host that has none yet.
        let _ = writeln!(s, "table inet {TABLE}\ndelete table inet {TABLE}");
        let _ = writeln!(s, "table inet {TABLE} {{");
        for (i, (customer, ifs)) in customers.iter().enumerate() {
            let _ = writeln!(
                s,
                "  # customer {customer}\n  set customer_{i} {{ type ifname; elements = {{ {} }} }}",
                ifs.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ")
            );
        }
        // Anti-spoofing before routing: a guest only sends from its own addresses (plus IPv6
        // link-local and the unspecified address, which neighbour discovery needs).
        let _ = writeln!(
            s,
            "  chain prerouting {{\n    type filter hook prerouting priority raw; policy accept;"
        );
        for vm in self.vms.values() {
            let _ = writeln!(
                s,
                "    iifname \"{}\" ip6 saddr != {{ {}, fe80::/10, :: }} drop",
                vm.host_if, vm.ipv6
            );
            match vm.ipv4 {
                Some(v4) => {
                    let _ = writeln!(s, "    iifname \"{}\" ip saddr != {v4} drop", vm.host_if);
                }
                None => {
                    let _ = writeln!(s, "    iifname \"{}\" meta nfproto ipv4 drop", vm.host_if);
                }
            }
        }
        let _ = writeln!(s, "  }}");
        // Between VMs: same customer only. Nothing else crosses unless outbound access is on.
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
        );
        for i in 0..customers.len() {
            let _ = writeln!(s, "    iifname @customer_{i} oifname @customer_{i} accept");
        }
        if let Some(out) = &self.outbound_interface {
            let _ = writeln!(s, "    iifname {vm_if} oifname \"{out}\" accept");
            let _ = writeln!(
                s,
                "    iifname \"{out}\" oifname {vm_if} ct state established,related accept"
            );
        }
        let _ = writeln!(
            s,
            "    iifname {vm_if} drop\n    oifname {vm_if} drop\n  }}"
        );
        // To the host itself, guests get ICMP (ping, neighbour discovery) and answers to
        // connections the host opened, nothing else: metald's API and every other host service
        // stay out of their reach.
        let _ = writeln!(
            s,
            "  chain input {{\n    type filter hook input priority filter; policy accept;\n    iifname {vm_if} meta l4proto {{ icmp, ipv6-icmp }} accept\n    iifname {vm_if} ct state established,related accept\n    iifname {vm_if} drop\n  }}"
        );
        if let (Some(out), Some(subnet)) = (&self.outbound_interface, &self.ipv4_subnet) {
            let _ = writeln!(
                s,
                "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{out}\" ip saddr {subnet} masquerade\n  }}"
            );
        }
        let _ = writeln!(s, "}}");
        s
    }
}

/// Errors applying rules.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be run.
    #[error("run {binary}")]
    Spawn {
        /// The binary.
        binary: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused the rules.
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
}

/// Replaces metald's table with `script` by running `nft -f -`.
pub async fn apply(nft: &Path, script: &str) -> Result<(), NftError> {
    use tokio::io::AsyncWriteExt;
    let spawn_err = |source| NftError::Spawn {
        binary: nft.display().to_string(),
        source,
    };
    let mut child = tokio::process::Command::new(nft)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(spawn_err)?;
    }
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Removes metald's table (missing is fine).
pub async fn remove(nft: &Path) -> Result<(), NftError> {
    apply(
        nft,
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(customer: &str, host_if: &str, n: u16, v4: bool) -> FirewallVm {
        FirewallVm {
            customer: customer.into(),
            host_if: host_if.into(),
            ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n),
            ipv4: v4.then(|| Ipv4Addr::new(10, 0, 0, n as u8)),
        }
    }

    #[test]
    fn customers_get_one_set_each_and_everything_else_is_dropped() {
        let mut fw = Firewall::default();
        fw.vms.insert("a1".into(), vm("acme", "mva1", 2, true));
        fw.vms.insert("a2".into(), vm("acme", "mva2", 3, true));
        fw.vms.insert("b1".into(), vm("bolt", "mvb1", 4, false));
        let s = fw.render();
        assert!(s.starts_with("table inet metald\ndelete table inet metald\n"));
        assert!(
            s.contains("set customer_0 { type ifname; elements = { \"mva1\", \"mva2\" } }"),
            "{s}"
        );
        assert!(
            s.contains("set customer_1 { type ifname; elements = { \"mvb1\" } }"),
            "{s}"
        );
        assert!(s.contains("iifname @customer_0 oifname @customer_0 accept"));
        assert!(s.contains("iifname \"mva1\" ip6 saddr != { fd00::2, fe80::/10, :: } drop"));
        assert!(s.contains("iifname \"mva1\" ip saddr != 10.0.0.2 drop"));
        assert!(s.contains("iifname \"mvb1\" meta nfproto ipv4 drop"));
        assert!(s.contains("iifname \"mv*\" drop\n    oifname \"mv*\" drop"));
        assert!(!s.contains("masquerade"), "no NAT unless asked");
    }

    #[test]
    fn outbound_access_is_explicit() {
        let fw = Firewall {
            outbound_interface: Some("uplink0".into()),
            ipv4_subnet: Some("10.0.0.0/24".into()),
            ..Firewall::default()
        };
        let s = fw.render();
        assert!(s.contains("iifname \"mv*\" oifname \"uplink0\" accept"));
        assert!(s.contains("oifname \"uplink0\" ip saddr 10.0.0.0/24 masquerade"));
    }
}
