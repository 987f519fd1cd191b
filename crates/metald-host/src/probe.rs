//! What the host offers, checked without changing it: executables and hardware KVM.

use std::path::{Path, PathBuf};

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

#[cfg(test)]
mod tests {
    use super::*;

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
