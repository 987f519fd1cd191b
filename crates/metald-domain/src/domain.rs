//! The nouns of metald: ids, VM configuration and VM records, free of any transport or OS detail.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::state::{VmLife, VmState};

/// Why an id string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(String);

/// A VM's id: `vm-` followed by a lowercase hyphenated UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(String);

impl VmId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(format!("vm-{}", uuid::Uuid::new_v4()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VmId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s
            .strip_prefix("vm-")
            .and_then(|rest| uuid::Uuid::try_parse(rest).ok());
        match parsed {
            // Only the canonical spelling is an id, so one VM has exactly one name.
            Some(u) if format!("vm-{u}") == s => Ok(Self(s.to_string())),
            _ => Err(IdError(format!(
                "'{}' is not a VM id (expected vm-<lowercase uuid>)",
                truncate_for_message(s)
            ))),
        }
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The customer a call runs as; every VM belongs to exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CustomerId(String);

impl CustomerId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CustomerId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_token(s, 64) {
            Ok(Self(s.to_string()))
        } else {
            Err(IdError(format!(
                "'{}' is not a customer id (1-64 of A-Z a-z 0-9 _ -)",
                truncate_for_message(s)
            )))
        }
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True when `s` is 1..=max characters of `[A-Za-z0-9_-]`.
pub fn is_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Shortens caller-supplied text before it is echoed back in an error.
pub fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

/// One extra block device of a VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DriveConfig {
    /// Unique within the VM.
    pub drive_id: String,
    /// Asset the drive is made from.
    pub image_id: String,
    /// Shared read-only with the asset instead of a private writable copy.
    pub read_only: bool,
}

/// What a VM is made of, as the caller asked for it (validated by the service).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Kernel asset id.
    pub kernel_image_id: String,
    /// Root filesystem asset id.
    pub rootfs_image_id: String,
    /// Extra drives, in attach order.
    pub drives: Vec<DriveConfig>,
    /// Appended to the kernel command line.
    pub kernel_args: String,
    /// Caller-owned labels.
    pub metadata: BTreeMap<String, String>,
    /// Network interface settings (rate limits).
    #[serde(default)]
    pub network: NetworkSettings,
}

/// A token-bucket limit on one direction of a VM's network interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimit {
    /// Sustained rate in bytes per second.
    pub bandwidth_bytes_per_sec: u64,
    /// Bytes that may pass at once above the sustained rate.
    pub burst_bytes: u64,
}

/// The caller's settings for the VM's network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkSettings {
    /// Limit on traffic to the guest.
    pub rx_rate_limit: Option<RateLimit>,
    /// Limit on traffic from the guest.
    pub tx_rate_limit: Option<RateLimit>,
}

/// What metald allocated for a VM at create: its jail id slot and its network identity.
/// Persisted, unique among live VMs, freed on delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNet {
    /// Index into the jailer's uid/gid range.
    pub slot: u32,
    /// The guest's IPv6 address.
    pub ipv6: std::net::Ipv6Addr,
    /// The guest's IPv4 address, when IPv4 is on.
    pub ipv4: Option<std::net::Ipv4Addr>,
    /// The guest's MAC address, derived from the VM id.
    pub mac: String,
}

impl VmConfig {
    /// Guest memory in MiB (callers validated it is whole).
    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes / MIB
    }
}

/// Bytes in a mebibyte.
pub const MIB: u64 = 1024 * 1024;

/// A VM as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    /// The VM's id.
    pub id: VmId,
    /// Its owner.
    pub customer: CustomerId,
    /// What it is made of.
    pub config: VmConfig,
    /// Backend that runs it ("qemu" or "firecracker").
    pub backend: String,
    /// Creation time, Unix milliseconds.
    pub created_at_ms: i64,
    /// Last change, Unix milliseconds.
    pub updated_at_ms: i64,
    /// Its state and VMM, changed only through [`VmLife::apply`].
    pub life: VmLife,
    /// Insertion order, used for stable paging.
    pub seq: i64,
    /// Jail slot and addresses, allocated at create.
    pub net: Option<VmNet>,
}

impl VmRecord {
    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        self.life.state()
    }
}

/// Current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Formats Unix milliseconds as RFC 3339.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Which VMM a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Firecracker, over its REST API.
    Firecracker,
    /// QEMU, over QMP.
    Qemu,
}

impl BackendKind {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Firecracker => "firecracker",
            BackendKind::Qemu => "qemu",
        }
    }

    /// The backend [`BackendKind::as_str`] names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "firecracker" => Some(BackendKind::Firecracker),
            "qemu" => Some(BackendKind::Qemu),
            _ => None,
        }
    }

    /// VMM memory overhead above guest memory, in MiB: the jail's cgroup limit allows it and
    /// host capacity counts it. Firecracker needs a few MiB; QEMU (and TCG's translation cache)
    /// much more.
    pub fn memory_headroom_mib(self) -> u64 {
        match self {
            BackendKind::Firecracker => 64,
            BackendKind::Qemu => 384,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_id_round_trips_and_rejects_non_ids() {
        let id = VmId::generate();
        assert_eq!(id.as_str().parse::<VmId>().unwrap(), id);
        for bad in [
            "",
            "vm-",
            "vm-123",
            "VM-6f1c7f0e-8d4b-4a53-9b5e-7f2b6f0c1d2e",
            "vm-6F1C7F0E-8D4B-4A53-9B5E-7F2B6F0C1D2E",
            "6f1c7f0e-8d4b-4a53-9b5e-7f2b6f0c1d2e",
            "vm-6f1c7f0e8d4b4a539b5e7f2b6f0c1d2e",
            "../../etc/passwd",
        ] {
            let err = bad.parse::<VmId>().unwrap_err();
            assert!(err.to_string().contains("is not a VM id"), "{bad}: {err}");
        }
    }

    #[test]
    fn customer_ids_are_tokens() {
        assert!("acme-1_x".parse::<CustomerId>().is_ok());
        assert!("".parse::<CustomerId>().is_err());
        assert!("a b".parse::<CustomerId>().is_err());
        assert!("x".repeat(65).parse::<CustomerId>().is_err());
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
    }
}
