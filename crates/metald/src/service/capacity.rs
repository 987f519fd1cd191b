//! Host capacity: what this host admits, from its totals ([`HostProbe`]) less what metald
//! leaves to the host, times the overcommit ratios. Boots are admitted against it in the
//! store's reservation transaction; creates check the data directory's free space.

use super::*;
use crate::probe::{DiskSpace, ProbeError};
use crate::store::{HostLimits, HostUsage, Shortage};

/// An overcommit ratio, held in hundredths so capacity is whole-number arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    hundredths: u32,
}

impl Ratio {
    /// No overcommit.
    pub const ONE: Ratio = Ratio { hundredths: 100 };

    /// `hundredths` / 100.
    pub const fn from_hundredths(hundredths: u32) -> Self {
        Self { hundredths }
    }

    /// A decimal such as `1`, `1.5` or `4.0` (to the hundredth), within `min..=max`
    /// hundredths.
    pub fn parse(s: &str, min: u32, max: u32) -> Option<Self> {
        let v: f64 = s.trim().parse().ok().filter(|v: &f64| v.is_finite())?;
        let h = (v * 100.0).round();
        (f64::from(min)..=f64::from(max))
            .contains(&h)
            // In range, so a whole number that fits u32.
            .then(|| Self::from_hundredths(h as u32))
    }

    /// `n` times the ratio, rounded down (saturating).
    pub fn apply(self, n: u64) -> u64 {
        let scaled = u128::from(n) * u128::from(self.hundredths) / 100;
        u64::try_from(scaled).unwrap_or(u64::MAX)
    }

    /// The ratio as a float, for reporting.
    pub fn as_f64(self) -> f64 {
        f64::from(self.hundredths) / 100.0
    }
}

/// What metald leaves to the host and how far it overcommits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSettings {
    /// Memory kept for the host (bytes), taken off MemTotal before the overcommit ratio.
    pub memory_reserve_bytes: u64,
    /// Guest memory plus VMM headroom may reach (MemTotal - reserve) times this.
    pub memory_overcommit: Ratio,
    /// Running vCPUs may reach the host's CPUs times this.
    pub cpu_overcommit: Ratio,
    /// A create is refused when the data directory's free space would fall below this
    /// (bytes) with the new VM's writable disks.
    pub disk_reserve_bytes: u64,
}

/// One resource of [`HostCapacity`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    /// What metald admits (after reserve and overcommit); 0 when unbounded.
    pub total: u64,
    /// What is held.
    pub used: u64,
    /// `total - used`, never below 0.
    pub free: u64,
}

impl Amount {
    fn new(total: u64, used: u64) -> Self {
        Self {
            total,
            used,
            free: total.saturating_sub(used),
        }
    }
}

/// The host's capacity and use (GetHostCapacity).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostCapacity {
    /// Guest memory plus VMM headroom of VMs that run, are paused or are being booted.
    pub memory_bytes: Amount,
    /// Their vCPUs.
    pub vcpus: Amount,
    /// The data directory's filesystem less the disk reserve; used is what is not free on it.
    pub disk_bytes: Amount,
    /// Stored VMs against jail slots (total 0: no slot limit, VMs are not isolated).
    pub vms: Amount,
    /// The memory overcommit ratio.
    pub memory_overcommit: f64,
    /// The vCPU overcommit ratio.
    pub cpu_overcommit: f64,
}

impl VmService {
    /// What boots are admitted against now.
    pub(super) fn host_limits(&self) -> Result<HostLimits, ServiceError> {
        let h = &self.cfg.host;
        let memory = self.cfg.probe.memory_bytes().map_err(probe_error)?;
        let cpus = self.cfg.probe.cpus().map_err(probe_error)?;
        Ok(HostLimits {
            memory_bytes: Some(
                h.memory_overcommit
                    .apply(memory.saturating_sub(h.memory_reserve_bytes)),
            ),
            vcpus: Some(h.cpu_overcommit.apply(cpus)),
        })
    }

    /// Refuses a create whose writable disks would leave the data directory's filesystem
    /// with less than the disk reserve free.
    pub(super) fn check_disk_room(&self, writable_bytes: u64) -> Result<(), ServiceError> {
        check_disk_room(
            &*self.cfg.probe,
            &self.cfg.vms_dir,
            self.cfg.host.disk_reserve_bytes,
            writable_bytes,
        )
    }

    fn disk_space(&self) -> Result<DiskSpace, ServiceError> {
        self.cfg.probe.disk(&self.cfg.vms_dir).map_err(probe_error)
    }

    /// The host's capacity and what its VMs hold (every customer's).
    pub fn host_capacity(&self) -> Result<HostCapacity, ServiceError> {
        let limits = self.host_limits()?;
        let disk = self.disk_space()?;
        let HostUsage {
            memory_bytes,
            vcpus,
            vms,
            disk_bytes: _,
        } = self.store.host_usage()?;
        let slots = self
            .isolation
            .allocation()
            .map_or(0, |plan| u64::from(plan.slots));
        Ok(HostCapacity {
            memory_bytes: Amount::new(limits.memory_bytes.unwrap_or(0), memory_bytes),
            vcpus: Amount::new(limits.vcpus.unwrap_or(0), vcpus),
            disk_bytes: Amount::new(
                disk_capacity(disk, self.cfg.host.disk_reserve_bytes),
                disk.total_bytes.saturating_sub(disk.available_bytes),
            ),
            vms: Amount::new(slots, vms),
            memory_overcommit: self.cfg.host.memory_overcommit.as_f64(),
            cpu_overcommit: self.cfg.host.cpu_overcommit.as_f64(),
        })
    }

    /// Bytes of the VM's own writable disks: its root disk copy and each writable drive's
    /// copy (read-only drives are shared images and cost nothing per VM).
    pub(super) fn writable_disk_bytes(&self, c: &VmConfig) -> Result<u64, ServiceError> {
        let rootfs = self
            .assets
            .get_kind(&c.rootfs_image_id, AssetKind::Rootfs)
            .map_err(|e| validate::asset_field_error("config.rootfs.image_id", e))?;
        let mut total = rootfs.size_bytes;
        for (i, d) in c.drives.iter().enumerate().filter(|(_, d)| !d.read_only) {
            let asset = self
                .assets
                .get_kind(&d.image_id, AssetKind::Rootfs)
                .map_err(|e| {
                    validate::asset_field_error(&format!("config.drives[{i}].image_id"), e)
                })?;
            total = total
                .checked_add(asset.size_bytes)
                .ok_or_else(|| invalid("config.drives", "writable disks total over 2^64 bytes"))?;
        }
        Ok(total)
    }
}

/// Refuses `bytes` more on the file system of `vms_dir` when they would leave it with less than
/// `reserve` free: a create's disk copies, and a spare disk copy made ahead of one.
pub(super) fn check_disk_room(
    probe: &dyn HostProbe,
    vms_dir: &Path,
    reserve: u64,
    bytes: u64,
) -> Result<(), ServiceError> {
    let disk = probe.disk(vms_dir).map_err(probe_error)?;
    Shortage::check(
        "disk",
        "MiB",
        MIB,
        disk.total_bytes.saturating_sub(disk.available_bytes),
        bytes,
        Some(disk_capacity(disk, reserve)),
    )
    .map_err(ServiceError::HostExhausted)
}

/// What VMs may fill of a file system: all of it but the reserve.
fn disk_capacity(disk: DiskSpace, reserve: u64) -> u64 {
    disk.total_bytes.saturating_sub(reserve)
}

fn probe_error(source: ProbeError) -> ServiceError {
    ServiceError::Probe(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_parse_to_the_hundredth_within_their_range() {
        let r = |s| Ratio::parse(s, 10, 100_000);
        assert_eq!(r("1"), Some(Ratio::ONE));
        assert_eq!(r("1.5").unwrap().apply(1000), 1500);
        assert_eq!(r(" 4.0 ").unwrap().apply(3), 12);
        assert_eq!(r("0.333").unwrap().apply(100), 33);
        for bad in ["0", "0.05", "1001", "-1", "NaN", "inf", "x", ""] {
            assert_eq!(r(bad), None, "{bad}");
        }
        assert_eq!(Ratio::from_hundredths(100_000).apply(u64::MAX), u64::MAX);
    }
}
