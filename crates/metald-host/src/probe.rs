//! What the host offers, checked without changing it: executables, hardware KVM, and the
//! totals host capacity is measured against ([`HostProbe`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the host's kernel interfaces are mounted. Always `/proc`, `/sys` and `/dev` in
/// production; a test points them at a directory it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoots {
    /// procfs.
    pub proc: PathBuf,
    /// sysfs.
    pub sys: PathBuf,
    /// devtmpfs.
    pub dev: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        Self {
            proc: "/proc".into(),
            sys: "/sys".into(),
            dev: "/dev".into(),
        }
    }
}

impl HostRoots {
    /// The KVM device.
    pub fn kvm(&self) -> PathBuf {
        self.dev.join("kvm")
    }

    /// The cgroup filesystem.
    pub fn cgroup(&self) -> PathBuf {
        self.sys.join("fs/cgroup")
    }

    /// Whether the host has hardware KVM, and why (see [`hardware_kvm`]).
    pub fn hardware_kvm(&self) -> (bool, String) {
        hardware_kvm(&self.sys, &self.dev)
    }
}

/// True for a regular file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether the host has hardware KVM (not the software kvm-pvm many nested hosts have, which
/// stock guest kernels crash under), judged from `<sys>/module` and `<dev>/kvm`.
pub fn hardware_kvm(sys: &Path, dev: &Path) -> (bool, String) {
    if !dev.join("kvm").exists() {
        return (
            false,
            format!("{} does not exist", dev.join("kvm").display()),
        );
    }
    for module in ["kvm_intel", "kvm_amd"] {
        if sys.join("module").join(module).exists() {
            return (true, format!("{module} is loaded"));
        }
    }
    if sys.join("module/kvm_pvm").exists() {
        return (
            false,
            "/dev/kvm is kvm_pvm (software nested virtualization), not hardware KVM".into(),
        );
    }
    (false, "neither kvm_intel nor kvm_amd is loaded".into())
}

/// The host's totals, behind a trait so the capacity logic above it is tested with small
/// made-up numbers.
pub trait HostProbe: Send + Sync {
    /// Physical memory (`MemTotal`), in bytes.
    fn memory_bytes(&self) -> Result<u64, ProbeError>;
    /// CPUs metald may run on (its affinity mask and cgroup CPU quota).
    fn cpus(&self) -> Result<u64, ProbeError>;
    /// Size and free space of the filesystem holding `path`.
    fn disk(&self, path: &Path) -> Result<DiskSpace, ProbeError>;
}

/// A filesystem's size and what an unprivileged writer may still use of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Size, in bytes.
    pub total_bytes: u64,
    /// Free to unprivileged users (`f_bavail`), in bytes.
    pub available_bytes: u64,
}

/// Errors from reading the host's totals.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A kernel file or filesystem could not be read.
    #[error("read {path}")]
    Read {
        /// The file, or the filesystem's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A kernel file did not say what was expected.
    #[error("{path} has no {what}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
}

/// How long [`LinuxHost`] answers its memory total and CPU count from its last reading: every
/// create and boot asks for both, and reading the CPU count (the affinity mask and the
/// cgroup's quota files) cost a create and its boot 0.3-0.5 ms together; they change only with
/// hotplug or an operator's cgroup change, which a second's delay does not hurt.
pub const REREAD_AFTER: Duration = Duration::from_secs(1);

/// A value read at an instant.
type Reading = Arc<Mutex<Option<(Instant, u64)>>>;

/// The real host, reading `<proc>/meminfo`, the scheduler's CPU count and `statvfs`.
#[derive(Debug, Clone)]
pub struct LinuxHost {
    proc: PathBuf,
    reread_after: Duration,
    memory: Reading,
    cpus: Reading,
}

impl LinuxHost {
    /// Reads memory from `<proc>/meminfo` (`/proc` in production, see [`HostRoots`]).
    pub fn new(proc: PathBuf) -> Self {
        Self {
            proc,
            reread_after: REREAD_AFTER,
            memory: Reading::default(),
            cpus: Reading::default(),
        }
    }

    /// The same host, answering from a reading for `after` ([`REREAD_AFTER`] by default).
    pub fn reread_after(mut self, after: Duration) -> Self {
        self.reread_after = after;
        self
    }

    /// `reading`'s value if younger than `reread_after`, else `read`'s (kept when it worked).
    fn cached(
        &self,
        reading: &Reading,
        read: impl FnOnce() -> Result<u64, ProbeError>,
    ) -> Result<u64, ProbeError> {
        // A value and its time cannot be left inconsistent.
        let mut last = reading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, value)) = *last {
            if at.elapsed() < self.reread_after {
                return Ok(value);
            }
        }
        let value = read()?;
        *last = Some((Instant::now(), value));
        Ok(value)
    }

    fn read_memory_bytes(&self) -> Result<u64, ProbeError> {
        let path = self.proc.join("meminfo");
        let text = std::fs::read_to_string(&path).map_err(|source| ProbeError::Read {
            path: path.clone(),
            source,
        })?;
        mem_total_bytes(&text).ok_or(ProbeError::Missing {
            path,
            what: "MemTotal line in kB",
        })
    }

    fn read_cpus(&self) -> Result<u64, ProbeError> {
        // Counts the CPUs of metald's affinity mask, bounded by its cgroup's CPU quota.
        std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .map_err(|source| ProbeError::Read {
                path: PathBuf::from("sched_getaffinity"),
                source,
            })
    }
}

impl HostProbe for LinuxHost {
    fn memory_bytes(&self) -> Result<u64, ProbeError> {
        self.cached(&self.memory, || self.read_memory_bytes())
    }

    fn cpus(&self) -> Result<u64, ProbeError> {
        self.cached(&self.cpus, || self.read_cpus())
    }

    fn disk(&self, path: &Path) -> Result<DiskSpace, ProbeError> {
        let st = rustix::fs::statvfs(path).map_err(|e| ProbeError::Read {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        Ok(DiskSpace {
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
            available_bytes: st.f_bavail.saturating_mul(st.f_frsize),
        })
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_meminfo_under_the_given_root() {
        let root = tempfile::tempdir().unwrap();
        let host = LinuxHost::new(root.path().to_path_buf()).reread_after(Duration::ZERO);
        assert!(matches!(host.memory_bytes(), Err(ProbeError::Read { .. })));
        std::fs::write(
            root.path().join("meminfo"),
            "MemFree:  100 kB\nMemTotal:       24683584 kB\n",
        )
        .unwrap();
        assert_eq!(host.memory_bytes().unwrap(), 24683584 * 1024);
        for bad in [
            "MemTotal: 12 MB\n",
            "MemTotal: x kB\n",
            "MemTotal: 99999999999999999 kB\n",
            "",
        ] {
            std::fs::write(root.path().join("meminfo"), bad).unwrap();
            let err = host.memory_bytes().unwrap_err();
            assert!(
                err.to_string().ends_with("has no MemTotal line in kB"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_reading_is_reused_for_a_while_and_a_failed_one_never() {
        let root = tempfile::tempdir().unwrap();
        let meminfo = root.path().join("meminfo");
        let host =
            LinuxHost::new(root.path().to_path_buf()).reread_after(Duration::from_secs(3600));
        assert!(host.memory_bytes().is_err(), "nothing to read yet");
        std::fs::write(&meminfo, "MemTotal: 1024 kB\n").unwrap();
        assert_eq!(host.memory_bytes().unwrap(), 1 << 20);
        std::fs::write(&meminfo, "MemTotal: 2048 kB\n").unwrap();
        assert_eq!(host.memory_bytes().unwrap(), 1 << 20, "within the hour");
        // Clones share the reading (the service hands the probe around).
        assert_eq!(host.clone().memory_bytes().unwrap(), 1 << 20);
        let fresh = host.reread_after(Duration::ZERO);
        assert_eq!(fresh.memory_bytes().unwrap(), 2 << 20);
    }

    #[test]
    fn cpus_and_disk_come_from_the_running_host() {
        let host = LinuxHost::new("/proc".into());
        assert!(host.cpus().unwrap() >= 1);
        let dir = tempfile::tempdir().unwrap();
        let disk = host.disk(dir.path()).unwrap();
        assert!(disk.total_bytes > 0 && disk.available_bytes <= disk.total_bytes);
        assert!(host.disk(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn hardware_kvm_is_told_apart_from_kvm_pvm() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path().join("sys");
        let dev = root.path().join("dev");
        std::fs::create_dir_all(sys.join("module/kvm_pvm")).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        assert!(!hardware_kvm(&sys, &dev).0);
        std::fs::write(dev.join("kvm"), "").unwrap();
        let (hw, why) = hardware_kvm(&sys, &dev);
        assert!(!hw);
        assert!(why.contains("kvm_pvm"), "{why}");
        std::fs::create_dir_all(sys.join("module/kvm_intel")).unwrap();
        assert!(hardware_kvm(&sys, &dev).0);
    }
}
