//! Address and jail-slot allocation rules. The store applies them inside one transaction, so
//! two creates never get the same address; this module only does the arithmetic.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::domain::VmId;

/// An IPv6 prefix, e.g. `fd6d:6574:616c::/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Prefix {
    /// The network address (host bits zero).
    pub addr: Ipv6Addr,
    /// Prefix length, 1-126.
    pub len: u8,
}

/// An IPv4 subnet, e.g. `10.200.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Subnet {
    /// The network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 1-30.
    pub len: u8,
}

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PrefixError(String);

fn split(s: &str) -> Result<(&str, u8), PrefixError> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| PrefixError("expected ADDRESS/LENGTH".into()))?;
    let len = l
        .parse::<u8>()
        .map_err(|_| PrefixError(format!("prefix length '{l}' is not a number")))?;
    Ok((a, len))
}

impl std::str::FromStr for Ipv6Prefix {
    type Err = PrefixError;
    /// A host's VM prefix: /64 to /120.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_len(s, 64..=120)
    }
}

impl Ipv6Prefix {
    /// `ADDRESS/LENGTH` with a length in `lens` and no host bits set.
    pub fn parse_len(s: &str, lens: std::ops::RangeInclusive<u8>) -> Result<Self, PrefixError> {
        let (a, len) = split(s)?;
        let addr: Ipv6Addr = a
            .parse()
            .map_err(|_| PrefixError(format!("'{a}' is not an IPv6 address")))?;
        if !lens.contains(&len) {
            return Err(PrefixError(format!(
                "prefix length must be {}-{}",
                lens.start(),
                lens.end()
            )));
        }
        let host_mask = u128::MAX >> len;
        if u128::from(addr) & host_mask != 0 {
            return Err(PrefixError(format!(
                "host bits are set (network is {})",
                Ipv6Addr::from(u128::from(addr) & !host_mask)
            )));
        }
        Ok(Self { addr, len })
    }
}

impl std::str::FromStr for Ipv4Subnet {
    type Err = PrefixError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, len) = split(s)?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| PrefixError(format!("'{a}' is not an IPv4 address")))?;
        if !(8..=29).contains(&len) {
            return Err(PrefixError("prefix length must be 8-29".into()));
        }
        let host_mask = u32::MAX >> len;
        if u32::from(addr) & host_mask != 0 {
            return Err(PrefixError(format!(
                "host bits are set (network is {})",
                Ipv4Addr::from(u32::from(addr) & !host_mask)
            )));
        }
        Ok(Self { addr, len })
    }
}

impl std::fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Host index 1 is the gateway; VMs get 2 and up.
pub const FIRST_VM_INDEX: u64 = 2;

impl Ipv6Prefix {
    /// The gateway address (host index 1).
    pub fn gateway(&self) -> Ipv6Addr {
        self.at(1)
    }

    /// The address with host index `i`.
    pub fn at(&self, i: u64) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) | u128::from(i))
    }

    /// Last usable host index (capped: a /64 has far more than any host will use).
    pub fn last_index(&self) -> u64 {
        let bits = 128 - u32::from(self.len);
        if bits >= 32 {
            u64::from(u32::MAX)
        } else {
            (1u64 << bits) - 1
        }
    }
}

impl Ipv4Subnet {
    /// The gateway address (host index 1).
    pub fn gateway(&self) -> Ipv4Addr {
        self.at(1)
    }

    /// The address with host index `i`.
    pub fn at(&self, i: u64) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | i as u32)
    }

    /// Last usable host index (the broadcast address is never handed out).
    pub fn last_index(&self) -> u64 {
        (1u64 << (32 - u32::from(self.len))) - 2
    }
}

/// What to allocate for each new VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationPlan {
    /// Number of jail uid/gid slots.
    pub slots: u32,
    /// Where IPv6 addresses come from.
    pub ipv6: Ipv6Prefix,
    /// Where IPv4 addresses come from, if IPv4 is on.
    pub ipv4: Option<Ipv4Subnet>,
}

/// The VM's MAC: locally administered, unicast, the rest from its UUID, so it is stable for the
/// VM's whole life and differs between VMs.
pub fn mac_for(vm: &VmId) -> String {
    let hex: String = vm
        .as_str()
        .trim_start_matches("vm-")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(10)
        .collect();
    let mut parts = vec!["02".to_string()];
    for i in 0..5 {
        parts.push(hex.get(i * 2..i * 2 + 2).unwrap_or("00").to_string());
    }
    parts.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_refuse_host_bits() {
        let p: Ipv6Prefix = "fd6d:6574:616c::/64".parse().unwrap();
        assert_eq!(p.gateway().to_string(), "fd6d:6574:616c::1");
        assert_eq!(p.at(7).to_string(), "fd6d:6574:616c::7");
        assert!("fd00::1/64"
            .parse::<Ipv6Prefix>()
            .unwrap_err()
            .to_string()
            .contains("host bits"));
        assert!("fd00::/48".parse::<Ipv6Prefix>().is_err());
        assert!("fd00::".parse::<Ipv6Prefix>().is_err());
        let s: Ipv4Subnet = "10.200.0.0/24".parse().unwrap();
        assert_eq!(s.gateway().to_string(), "10.200.0.1");
        assert_eq!(s.last_index(), 254);
        assert!("10.200.0.1/24".parse::<Ipv4Subnet>().is_err());
        assert!("10.200.0.0/31".parse::<Ipv4Subnet>().is_err());
    }

    #[test]
    fn macs_are_stable_unicast_and_local() {
        let id: VmId = "vm-6f1c7f0e-8d4b-4a53-9b5e-7f2b6f0c1d2e".parse().unwrap();
        assert_eq!(mac_for(&id), "02:6f:1c:7f:0e:8d");
        assert_eq!(mac_for(&id), mac_for(&id));
        assert_ne!(mac_for(&VmId::generate()), mac_for(&VmId::generate()));
    }
}
