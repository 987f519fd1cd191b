//! Hosts of a fleet: several metalds sharing one database, each registered with its id, the URL
//! its peers reach it at, its capacity, its labels and the address blocks the fleet gave it,
//! and alive while it renews its lease.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::ipam::{Ipv4Subnet, Ipv6Prefix};

/// A host's id (`UNKEY_METALD_HOST_ID`): 1-63 characters of `a-z`, `0-9` and `-`, not starting
/// or ending with `-` (a DNS label, so it fits names, labels and log fields unquoted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(String);

/// Why a host id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a host id is 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'")]
pub struct BadHostId;

impl FromStr for HostId {
    type Err = BadHostId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(BadHostId)
        }
    }
}

impl HostId {
    /// `local`: a host whose name makes no id.
    pub fn local() -> Self {
        Self("local".into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a host offers the fleet, as its configuration computes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCapacity {
    /// Guest memory (plus VMM headroom) it admits, in bytes; `None`: no bound.
    pub memory_bytes: Option<u64>,
    /// vCPUs it admits; `None`: no bound.
    pub vcpus: Option<u64>,
}

/// What a host says of itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRegistration {
    /// Its id.
    pub id: HostId,
    /// The base URL its peers call it at (`UNKEY_METALD_ADVERTISE_URL`).
    pub advertise_url: String,
    /// Its capacity.
    pub capacity: HostCapacity,
    /// Its labels (`UNKEY_METALD_HOST_LABELS`).
    pub labels: BTreeMap<String, String>,
}

/// The address space the fleet's hosts are given blocks of: each host gets the `index`th /64
/// of `ipv6` and the `index`th block of `ipv4_block_len` of `ipv4`, kept for as long as its
/// registration exists, so its routes never move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetPrefixes {
    /// The fleet's IPv6 prefix (at most /63: every host gets a /64 of it).
    pub ipv6: Ipv6Prefix,
    /// The fleet's IPv4 subnet, if VMs have IPv4.
    pub ipv4: Option<Ipv4Subnet>,
    /// The length of each host's IPv4 block (longer than `ipv4`'s, at most 30).
    pub ipv4_block_len: u8,
}

impl FleetPrefixes {
    /// How many hosts the prefixes have room for.
    pub fn capacity(&self) -> u64 {
        let v6 = 1u64
            .checked_shl(u32::from(64 - self.ipv6.len.min(64)))
            .unwrap_or(u64::MAX);
        match self.ipv4 {
            Some(v4) if self.ipv4_block_len >= v4.len => {
                let v4 = 1u64 << (self.ipv4_block_len - v4.len);
                v6.min(v4)
            }
            Some(_) => 0,
            None => v6,
        }
    }

    /// The blocks of the host at `index` (`None` past [`capacity`](Self::capacity)).
    pub fn host_blocks(&self, index: u64) -> Option<(Ipv6Prefix, Option<Ipv4Subnet>)> {
        if index >= self.capacity() || self.ipv6.len > 64 {
            return None;
        }
        let base = u128::from(self.ipv6.addr);
        let addr = Ipv6Addr::from(base | (u128::from(index) << 64));
        let ipv6 = Ipv6Prefix { addr, len: 64 };
        let ipv4 = match self.ipv4 {
            Some(v4) => {
                let step = 1u32 << (32 - u32::from(self.ipv4_block_len));
                let offset = u32::try_from(index).ok()?.checked_mul(step)?;
                Some(Ipv4Subnet {
                    addr: Ipv4Addr::from(u32::from(v4.addr).checked_add(offset)?),
                    len: self.ipv4_block_len,
                })
            }
            None => None,
        };
        Some((ipv6, ipv4))
    }
}

/// Whether a host is alive, as its lease says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostStatus {
    /// It renewed its lease in time.
    Up,
    /// Its lease expired: it is dead, cut off, or stopped.
    Down,
}

impl HostStatus {
    /// The status as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Up => "UP",
            HostStatus::Down => "DOWN",
        }
    }
}

/// A registered host, as the store has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    /// What it registered.
    pub registration: HostRegistration,
    /// Its place in the fleet's address space.
    pub index: u64,
    /// When its lease ends (ms since the Unix epoch, on the store's clock).
    pub lease_expires_ms: i64,
    /// Whether that is still ahead of the store's clock.
    pub status: HostStatus,
    /// VMs stored on it, in any state.
    pub vms: u64,
}

/// What a host holds, as placement weighs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLoad {
    /// The host.
    pub host: HostId,
    /// VMs stored on it, in any state (each reserves its size there).
    pub vms: u64,
    /// Their vCPUs.
    pub vcpus: u64,
    /// Their guest memory, in bytes (without VMM headroom).
    pub memory_bytes: u64,
    /// How many of them are the placing customer's.
    pub customer_vms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids_are_dns_labels() {
        for ok in ["a", "host-1", &"x".repeat(63)] {
            assert!(ok.parse::<HostId>().is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert_eq!(bad.parse::<HostId>(), Err(BadHostId), "{bad}");
        }
    }

    #[test]
    fn each_host_gets_its_own_64_and_ipv4_block() {
        let fleet = FleetPrefixes {
            ipv6: Ipv6Prefix::parse_len("fd00:1::/48", 16..=63).unwrap(),
            ipv4: Some("10.200.0.0/16".parse().unwrap()),
            ipv4_block_len: 24,
        };
        assert_eq!(fleet.capacity(), 256);
        let (v6, v4) = fleet.host_blocks(0).unwrap();
        assert_eq!(v6, "fd00:1::/64".parse().unwrap());
        assert_eq!(v4, Some("10.200.0.0/24".parse().unwrap()));
        let (v6, v4) = fleet.host_blocks(3).unwrap();
        assert_eq!(v6, "fd00:1:0:3::/64".parse().unwrap());
        assert_eq!(v4, Some("10.200.3.0/24".parse().unwrap()));
        assert_eq!(fleet.host_blocks(256), None);
    }

    #[test]
    fn without_ipv4_the_ipv6_prefix_bounds_the_fleet() {
        let fleet = FleetPrefixes {
            ipv6: Ipv6Prefix::parse_len("fd00:1::/62", 16..=63).unwrap(),
            ipv4: None,
            ipv4_block_len: 24,
        };
        assert_eq!(fleet.capacity(), 4);
        assert_eq!(
            fleet.host_blocks(3).unwrap().0,
            "fd00:1:0:3::/64".parse().unwrap()
        );
        assert_eq!(fleet.host_blocks(4), None);
    }
}
