//! metald's nftables table: tenant isolation, anti-spoofing and (optionally) outbound access.
//!
//! Every fact about one VM is an element of a set or map, never a rule of its own, so the table
//! has the same dozen rules whatever runs and a packet's verdict is a few hash lookups:
//!
//! - `allowed6` (`ifname . ipv6_addr`) and `allowed4` (`ifname . ipv4_addr`): the one source
//!   address each VM interface may send from. Prerouting drops anything else arriving on an
//!   `mv*` interface, except IPv6 link-local and `::`, which neighbour discovery needs. A VM
//!   without IPv4 has no `allowed4` element, so all its IPv4 is dropped.
//! - `customer_of` (`ifname : mark`) gives each VM interface its customer's tag, a small number
//!   a customer holds while it has VMs running (the element's comment names the customer), and
//!   `members` (`mark . ifname`) holds every (tag, interface) pair. A packet between two VM
//!   interfaces gets its input interface's tag as its mark and is accepted only if (mark,
//!   output interface) is in `members`, that is if both interfaces belong to one customer; the
//!   mark is then set back to 0. Anything else from or to a VM is dropped, unless it goes out
//!   through the configured outbound interface.
//!
//! Why the mark: nft can neither compare two lookups nor use a map's result inside a
//! concatenation, so the input side's tag has to be kept where the second lookup can read it.
//! The other way, a verdict map jumping to a chain and a set per customer, leaves packets alone
//! but makes every `nft` run O(customers): nft lists every chain and set of the table before
//! it applies a change (nft 1.0.6, 5000 single-VM customers: 130-180 ms a change, against
//! 3-20 ms here whatever runs; `benches/firewall.rs` in the metald crate). Only packets between two VM interfaces are marked, they arrive
//! unmarked (a veth clears the mark of what crosses namespaces) and leave with mark 0, so
//! nothing else in this namespace sees a difference; a VM-to-VM packet that somehow already
//! carries a mark is dropped, never misjudged.
//!
//! Changes are incremental ([`Firewall::start`], [`Firewall::stop`]): a VM start adds its
//! elements and a stop deletes them, in one `nft -f` transaction whose size does not depend on
//! how many VMs run (changes that wait at the same moment share one: see the network's batch).
//! The whole table is written only at start ([`Firewall::render`]), from the VMs that survived,
//! which also removes whatever a crash between two changes left, and whenever nft refuses a
//! change (someone flushed the ruleset, an element went missing): then the table as it will be
//! after the change is written, so the rules heal instead of drifting from what runs. `nft` is the
//! tool made for this; its netlink protocol (libnftnl's job) is not something to write by hand.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use metald_domain::domain::CustomerId;

/// Name of metald's table (family inet: one table for IPv4 and IPv6).
pub const TABLE: &str = "metald";

/// Prefix of every host-side VM interface name.
pub const HOST_IF_PREFIX: &str = "mv";

/// One running VM as the firewall sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallVm {
    /// Owner: VMs of the same customer may reach each other.
    pub customer: CustomerId,
    /// The VM's host-side interface.
    pub host_if: String,
    /// The guest's IPv6 address (the only IPv6 source it may use, besides link-local).
    pub ipv6: Ipv6Addr,
    /// The guest's IPv4 address, if IPv4 is on.
    pub ipv4: Option<Ipv4Addr>,
}

/// A VM in the table: what it is and its customer's tag.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    vm: FirewallVm,
    tag: u32,
}

/// A customer with VMs running: its tag and how many VMs hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Customer {
    tag: u32,
    vms: usize,
}

/// The table's model: what runs, each customer's tag, and the host's outbound settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    /// Running VMs by id.
    vms: BTreeMap<String, Entry>,
    /// Customers with VMs running.
    customers: HashMap<CustomerId, Customer>,
    /// Tags given up by customers whose last VM stopped, reused lowest first.
    free_tags: BTreeSet<u32>,
    /// The lowest tag never given out (0 is "unmarked", never a tag). There is at most one tag
    /// per running customer, so a u32 does not run out.
    next_tag: u32,
    /// Interface to the outside world VMs may use, if outbound access is on.
    outbound_interface: Option<String>,
    /// The IPv4 subnet to masquerade on the outbound interface.
    ipv4_subnet: Option<String>,
}

/// One VM's start or stop: the element operations that make it (also as an nft script), and
/// what the model becomes once they are loaded ([`Firewall::commit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Change {
    id: String,
    before: Option<Entry>,
    after: Option<Entry>,
    ops: Vec<ElementOp>,
}

impl Change {
    /// The element operations, in order (a replacement deletes before it adds).
    pub fn ops(&self) -> &[ElementOp] {
        &self.ops
    }

    /// The nft script (one transaction) that applies this change to the loaded table.
    pub fn script(&self) -> String {
        script(&self.ops)
    }
}

/// One part of an element's key, in the order the set's type lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// An interface name (`ifname`).
    Ifname(String),
    /// An IPv6 address (`ipv6_addr`).
    Ipv6(Ipv6Addr),
    /// An IPv4 address (`ipv4_addr`).
    Ipv4(Ipv4Addr),
    /// A packet mark (`mark`).
    Mark(u32),
}

/// One element of one of the table's sets or maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The set or map.
    pub set: &'static str,
    /// The key's parts (one, or a concatenation).
    pub key: Vec<KeyPart>,
    /// A map element's value, a mark (added elements only: a delete names the key alone).
    pub value: Option<u32>,
    /// The element's comment (added elements only).
    pub comment: Option<String>,
}

/// Adding or deleting one element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementOp {
    /// True to add the element, false to delete it.
    pub add: bool,
    /// The element.
    pub element: Element,
}

/// The nft script (one transaction) making `ops`, in order.
pub fn script(ops: &[ElementOp]) -> String {
    let mut s = String::new();
    for op in ops {
        let verb = if op.add { "add" } else { "delete" };
        let e = &op.element;
        let _ = writeln!(s, "{verb} element inet {TABLE} {} {{ {} }}", e.set, text(e));
    }
    s
}

/// An element as nft writes it: `key [comment "…"] [: value]`.
pub(crate) fn text(e: &Element) -> String {
    let key: Vec<String> = e
        .key
        .iter()
        .map(|p| match p {
            KeyPart::Ifname(n) => format!("\"{n}\""),
            KeyPart::Ipv6(a) => a.to_string(),
            KeyPart::Ipv4(a) => a.to_string(),
            KeyPart::Mark(m) => m.to_string(),
        })
        .collect();
    let mut s = key.join(" . ");
    // A customer id is 1-64 of [A-Za-z0-9_-]: nothing that could end the quoted comment.
    if let Some(c) = &e.comment {
        let _ = write!(s, " comment \"{c}\"");
    }
    if let Some(v) = e.value {
        let _ = write!(s, " : {v}");
    }
    s
}

impl Firewall {
    /// An empty table; `outbound_interface` (with `ipv4_subnet` masqueraded on it) turns on
    /// outbound access.
    pub fn new(outbound_interface: Option<String>, ipv4_subnet: Option<String>) -> Self {
        Self {
            vms: BTreeMap::new(),
            customers: HashMap::new(),
            free_tags: BTreeSet::new(),
            next_tag: 1,
            outbound_interface,
            ipv4_subnet,
        }
    }

    /// Whether the VM `id` is in the table.
    pub fn contains(&self, id: &str) -> bool {
        self.vms.contains_key(id)
    }

    /// How many VMs are in the table.
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    /// True when no VM is in the table.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// The tag of `customer`, while it has VMs in the table.
    pub fn tag_of(&self, customer: &CustomerId) -> Option<u32> {
        self.customers.get(customer).map(|c| c.tag)
    }

    /// Adding VM `id` (replacing an earlier entry under that id): its elements, and for the
    /// first VM of a customer the customer's new tag.
    pub fn start(&self, id: &str, vm: FirewallVm) -> Change {
        let before = self.vms.get(id).cloned();
        let tag = self
            .tag_of(&vm.customer)
            .or_else(|| self.free_tags.first().copied())
            .unwrap_or(self.next_tag);
        let after = Entry { vm, tag };
        let mut ops = before.as_ref().map(|b| ops(false, b)).unwrap_or_default();
        ops.extend(self::ops(true, &after));
        Change {
            id: id.to_string(),
            before,
            after: Some(after),
            ops,
        }
    }

    /// Removing VM `id`: deletes of its elements; `None` when it is not in the table.
    pub fn stop(&self, id: &str) -> Option<Change> {
        let before = self.vms.get(id)?.clone();
        Some(Change {
            id: id.to_string(),
            ops: ops(false, &before),
            before: Some(before),
            after: None,
        })
    }

    /// Makes the model what `change` (made by [`Self::start`] or [`Self::stop`] on this model,
    /// with nothing committed since) says, once nft took its script.
    pub fn commit(&mut self, change: Change) {
        if let Some(before) = change.before {
            self.vms.remove(&change.id);
            self.release(&before.vm.customer);
        }
        if let Some(after) = change.after {
            self.acquire(&after.vm.customer, after.tag);
            self.vms.insert(change.id, after);
        }
    }

    fn acquire(&mut self, customer: &CustomerId, tag: u32) {
        if let Some(c) = self.customers.get_mut(customer) {
            c.vms += 1;
            return;
        }
        self.customers
            .insert(customer.clone(), Customer { tag, vms: 1 });
        if !self.free_tags.remove(&tag) {
            self.next_tag = self.next_tag.max(tag + 1);
        }
    }

    fn release(&mut self, customer: &CustomerId) {
        if let Some(c) = self.customers.get_mut(customer) {
            c.vms -= 1;
            if c.vms == 0 {
                self.free_tags.insert(c.tag);
                self.customers.remove(customer);
            }
        }
    }

    /// The nft script that replaces metald's table atomically with one holding every VM.
    pub fn render(&self) -> String {
        self.render_entries(self.vms.values().collect())
    }

    fn render_entries(&self, entries: Vec<&Entry>) -> String {
        let vm_if = format!("\"{HOST_IF_PREFIX}*\"");
        // Writing to a String cannot fail: the results of writeln! are ignored throughout.
        let mut s = String::new();
        // `table` first so `delete` never fails on a host that has none yet.
        let _ = writeln!(s, "table inet {TABLE}\ndelete table inet {TABLE}");
        let _ = writeln!(s, "table inet {TABLE} {{");
        let set = |s: &mut String, kind: &str, name: &str, ty: &str, items: Vec<String>| {
            let _ = writeln!(s, "  {kind} {name} {{\n    type {ty}");
            // nft refuses an empty element list.
            if !items.is_empty() {
                let _ = writeln!(
                    s,
                    "    elements = {{\n      {}\n    }}",
                    items.join(",\n      ")
                );
            }
            let _ = writeln!(s, "  }}");
        };
        set(
            &mut s,
            "set",
            "allowed6",
            "ifname . ipv6_addr",
            items("allowed6", &entries),
        );
        set(
            &mut s,
            "set",
            "allowed4",
            "ifname . ipv4_addr",
            items("allowed4", &entries),
        );
        set(
            &mut s,
            "map",
            "customer_of",
            "ifname : mark",
            items("customer_of", &entries),
        );
        set(
            &mut s,
            "set",
            "members",
            "mark . ifname",
            items("members", &entries),
        );
        // Anti-spoofing before routing and connection tracking: a guest only sends from its own
        // addresses (plus IPv6 link-local and the unspecified address, which neighbour
        // discovery needs).
        let _ = writeln!(
            s,
            "  chain prerouting {{\n    type filter hook prerouting priority raw; policy accept;\n    iifname {vm_if} ip6 saddr != {{ fe80::/10, :: }} iifname . ip6 saddr != @allowed6 drop\n    iifname {vm_if} iifname . ip saddr != @allowed4 drop\n  }}"
        );
        // Between VMs: same customer only (the mark carries the input side's tag to the second
        // lookup; see the module doc). Nothing else crosses unless outbound access is on.
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    iifname {vm_if} oifname {vm_if} meta mark 0 meta mark set iifname map @customer_of meta mark . oifname @members meta mark set 0 accept"
        );
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

/// Adds (`add`) or deletes one VM's elements: the same four (three without IPv4) whatever else
/// runs.
fn ops(add: bool, e: &Entry) -> Vec<ElementOp> {
    let ifname = || KeyPart::Ifname(e.vm.host_if.clone());
    let mut elements = vec![Element {
        set: "allowed6",
        key: vec![ifname(), KeyPart::Ipv6(e.vm.ipv6)],
        value: None,
        comment: None,
    }];
    if let Some(v4) = e.vm.ipv4 {
        elements.push(Element {
            set: "allowed4",
            key: vec![ifname(), KeyPart::Ipv4(v4)],
            value: None,
            comment: None,
        });
    }
    elements.push(Element {
        set: "customer_of",
        key: vec![ifname()],
        value: add.then_some(e.tag),
        comment: add.then(|| format!("customer {}", e.vm.customer)),
    });
    elements.push(Element {
        set: "members",
        key: vec![KeyPart::Mark(e.tag), ifname()],
        value: None,
        comment: None,
    });
    elements
        .into_iter()
        .map(|element| ElementOp { add, element })
        .collect()
}

/// The elements of `set` for the VMs in `entries`, as nft's `elements = { … }` items.
fn items(set: &str, entries: &[&Entry]) -> Vec<String> {
    entries
        .iter()
        .flat_map(|e| ops(true, e))
        .filter(|op| op.element.set == set)
        .map(|op| text(&op.element))
        .collect()
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
    /// The element changes could not be sent to the kernel or their answer read.
    #[error("nfnetlink: {0}")]
    Netlink(String),
    /// The batch the change was loaded in failed: its cause, as text, since every change of a
    /// batch gets the same outcome.
    #[error("{0}")]
    Batch(String),
}

/// Loads `script` (one transaction) by running `nft -f -`: through `spawner` when given (a
/// boot's and a delete's `nft` then no longer closes each of metald's descriptors at its exec,
/// see [`crate::spawner`]), by metald itself otherwise or when the spawner failed.
pub async fn apply(
    nft: &Path,
    script: &str,
    spawner: Option<&crate::spawner::Spawner>,
) -> Result<(), NftError> {
    use crate::spawner::{SpawnError, SpawnRequest};
    use tokio::io::AsyncWriteExt;
    let spawn_err = |source| NftError::Spawn {
        binary: nft.display().to_string(),
        source,
    };
    if let Some(spawner) = spawner {
        let req = SpawnRequest {
            program: nft.to_path_buf(),
            args: vec!["-f".into(), "-".into()],
            env: Vec::new(),
            cwd: "/".into(),
        };
        match spawner.run(&req, script.as_bytes()).await {
            Ok(out) if out.success => return Ok(()),
            Ok(out) => return Err(NftError::Refused(out.output.trim().to_string())),
            Err(e @ SpawnError::Spawner { .. }) => {
                tracing::warn!(error = %crate::report::Chain(&e), "running nft through the spawner failed; running it directly");
            }
            Err(e) => return Err(spawn_err(std::io::Error::other(e))),
        }
    }
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
        None,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(customer: &str, host_if: &str, n: u16, v4: bool) -> FirewallVm {
        FirewallVm {
            customer: customer.parse().unwrap(),
            host_if: host_if.into(),
            ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n),
            ipv4: v4.then(|| Ipv4Addr::new(10, 0, 0, n as u8)),
        }
    }

    fn started(fw: &mut Firewall, id: &str, v: FirewallVm) -> String {
        let c = fw.start(id, v);
        let s = c.script().to_string();
        fw.commit(c);
        s
    }

    fn stopped(fw: &mut Firewall, id: &str) -> String {
        let c = fw.stop(id).unwrap();
        let s = c.script().to_string();
        fw.commit(c);
        s
    }

    fn lines(s: &str) -> Vec<&str> {
        s.lines().collect()
    }

    #[test]
    fn a_start_adds_only_that_vms_elements_whatever_else_runs() {
        let mut fw = Firewall::new(None, None);
        for n in 0..50 {
            started(
                &mut fw,
                &format!("x{n}"),
                vm(&format!("c{}", n % 7), &format!("mvx{n}"), 100 + n, true),
            );
        }
        let s = started(&mut fw, "a1", vm("acme", "mva1", 2, true));
        // acme is new: the lowest tag never given out, 8 (the seven others hold 1-7).
        assert_eq!(
            lines(&s),
            [
                "add element inet metald allowed6 { \"mva1\" . fd00::2 }",
                "add element inet metald allowed4 { \"mva1\" . 10.0.0.2 }",
                "add element inet metald customer_of { \"mva1\" comment \"customer acme\" : 8 }",
                "add element inet metald members { 8 . \"mva1\" }",
            ]
        );
        // A second VM of acme: same tag, its own elements only; no IPv4, no allowed4 element.
        let s = started(&mut fw, "a2", vm("acme", "mva2", 3, false));
        assert_eq!(
            lines(&s),
            [
                "add element inet metald allowed6 { \"mva2\" . fd00::3 }",
                "add element inet metald customer_of { \"mva2\" comment \"customer acme\" : 8 }",
                "add element inet metald members { 8 . \"mva2\" }",
            ]
        );
        assert_eq!(fw.len(), 52);
    }

    #[test]
    fn a_stop_deletes_only_that_vms_elements() {
        let mut fw = Firewall::new(Some("uplink0".into()), Some("10.0.0.0/24".into()));
        started(&mut fw, "a1", vm("acme", "mva1", 2, true));
        started(&mut fw, "a2", vm("acme", "mva2", 3, true));
        started(&mut fw, "b1", vm("bolt", "mvb1", 4, false));
        let s = stopped(&mut fw, "a1");
        assert_eq!(
            lines(&s),
            [
                "delete element inet metald allowed6 { \"mva1\" . fd00::2 }",
                "delete element inet metald allowed4 { \"mva1\" . 10.0.0.2 }",
                "delete element inet metald customer_of { \"mva1\" }",
                "delete element inet metald members { 1 . \"mva1\" }",
            ]
        );
        assert!(fw.stop("a1").is_none(), "stopped twice: nothing to do");
        assert!(!fw.contains("a1") && fw.contains("a2"));
    }

    #[test]
    fn a_customer_holds_a_tag_from_its_first_vm_to_its_last() {
        let mut fw = Firewall::new(None, None);
        let (acme, bolt, cora) = (
            "acme".parse().unwrap(),
            "bolt".parse().unwrap(),
            "cora".parse().unwrap(),
        );
        started(&mut fw, "a1", vm("acme", "mva1", 2, true));
        started(&mut fw, "b1", vm("bolt", "mvb1", 3, true));
        started(&mut fw, "a2", vm("acme", "mva2", 4, true));
        assert_eq!((fw.tag_of(&acme), fw.tag_of(&bolt)), (Some(1), Some(2)));
        stopped(&mut fw, "a1");
        assert_eq!(fw.tag_of(&acme), Some(1), "acme still runs a2");
        stopped(&mut fw, "a2");
        assert_eq!(fw.tag_of(&acme), None, "gone with its last VM");
        // The freed tag goes to the next new customer; bolt keeps its own.
        let s = started(&mut fw, "c1", vm("cora", "mvc1", 5, true));
        assert!(s.contains("members { 1 . \"mvc1\" }"), "{s}");
        assert_eq!((fw.tag_of(&cora), fw.tag_of(&bolt)), (Some(1), Some(2)));
        let s = started(&mut fw, "a3", vm("acme", "mva3", 6, true));
        assert!(s.contains("members { 3 . \"mva3\" }"), "{s}");
    }

    #[test]
    fn starting_a_vm_again_replaces_its_elements_in_the_same_transaction() {
        let mut fw = Firewall::new(None, None);
        started(&mut fw, "a1", vm("acme", "mva1", 2, true));
        let s = started(&mut fw, "a1", vm("acme", "mva1", 9, false));
        assert_eq!(
            lines(&s),
            [
                "delete element inet metald allowed6 { \"mva1\" . fd00::2 }",
                "delete element inet metald allowed4 { \"mva1\" . 10.0.0.2 }",
                "delete element inet metald customer_of { \"mva1\" }",
                "delete element inet metald members { 1 . \"mva1\" }",
                "add element inet metald allowed6 { \"mva1\" . fd00::9 }",
                "add element inet metald customer_of { \"mva1\" comment \"customer acme\" : 1 }",
                "add element inet metald members { 1 . \"mva1\" }",
            ]
        );
        assert_eq!(fw.len(), 1);
        assert_eq!(fw.tag_of(&"acme".parse().unwrap()), Some(1));
        // The same id moving to another customer frees acme's tag.
        started(&mut fw, "a1", vm("bolt", "mva1", 9, false));
        assert_eq!(fw.tag_of(&"acme".parse().unwrap()), None);
        assert_eq!(fw.tag_of(&"bolt".parse().unwrap()), Some(2));
    }

    #[test]
    fn an_uncommitted_change_leaves_the_model_as_it_was() {
        let mut fw = Firewall::new(None, None);
        started(&mut fw, "a1", vm("acme", "mva1", 2, true));
        let before = fw.clone();
        let _refused = fw.start("b1", vm("bolt", "mvb1", 3, true));
        let _refused = fw.stop("a1");
        assert_eq!(fw, before);
    }

    #[test]
    fn the_full_table_holds_every_vm_and_the_same_rules_whatever_runs() {
        let mut fw = Firewall::new(None, None);
        let empty = fw.render();
        started(&mut fw, "a1", vm("acme", "mva1", 2, true));
        started(&mut fw, "a2", vm("acme", "mva2", 3, true));
        started(&mut fw, "b1", vm("bolt", "mvb1", 4, false));
        let s = fw.render();
        assert!(s.starts_with("table inet metald\ndelete table inet metald\n"));
        for element in [
            "\"mva1\" . fd00::2",
            "\"mva2\" . fd00::3",
            "\"mvb1\" . fd00::4",
            "\"mva1\" . 10.0.0.2",
            "\"mva2\" . 10.0.0.3",
            "\"mva1\" comment \"customer acme\" : 1",
            "\"mvb1\" comment \"customer bolt\" : 2",
            "1 . \"mva1\"",
            "1 . \"mva2\"",
            "2 . \"mvb1\"",
        ] {
            assert!(s.contains(element), "{element} missing:\n{s}");
        }
        assert!(!s.contains("\"mvb1\" . 10."), "b1 has no IPv4:\n{s}");
        let rules = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| l.trim_start().starts_with(['i', 'o', 'm']))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(rules(&s), rules(&empty), "no rule per VM or customer");
        assert!(s.contains(
            "iifname \"mv*\" ip6 saddr != { fe80::/10, :: } iifname . ip6 saddr != @allowed6 drop"
        ));
        assert!(s.contains("iifname \"mv*\" iifname . ip saddr != @allowed4 drop"));
        assert!(s.contains("meta mark set iifname map @customer_of meta mark . oifname @members meta mark set 0 accept"));
        assert!(s.contains("iifname \"mv*\" drop\n    oifname \"mv*\" drop"));
        assert!(!s.contains("masquerade"), "no NAT unless asked");
        assert!(!empty.contains("elements"), "{empty}");
    }

    #[test]
    fn outbound_access_is_explicit() {
        let fw = Firewall::new(Some("uplink0".into()), Some("10.0.0.0/24".into()));
        let s = fw.render();
        assert!(s.contains("iifname \"mv*\" oifname \"uplink0\" accept"));
        assert!(s.contains("oifname \"uplink0\" ip saddr 10.0.0.0/24 masquerade"));
    }
}
