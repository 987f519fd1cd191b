//! Test harness: runs the real `metald` binary on a free loopback port with a temporary data
//! directory, the default guest image imported, and removes every process and file it made.
#![allow(dead_code)]
// Test support code: a failed set-up step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

pub mod netns;
use netns::{Relay, TestNetns};

mod bench;
mod billaged;
mod fleet;
mod issuer;
mod metald;
mod pki;
mod rest;
mod tiny_guest;
mod vmm;

// Each binary (the e2e tests, each bench) uses a different part of the support code.
#[allow(unused_imports)]
pub use bench::*;
#[allow(unused_imports)]
pub use billaged::*;
#[allow(unused_imports)]
pub use fleet::*;
#[allow(unused_imports)]
pub use issuer::*;
pub use metald::*;
#[allow(unused_imports)]
pub use pki::*;
pub use rest::*;
pub use tiny_guest::*;
pub use vmm::*;

/// Image ids the default guest is imported under (the same ids the README uses).
pub const KERNEL_ID: &str = "vmlinux-6.1";
/// Root filesystem id.
pub const ROOTFS_ID: &str = "busybox-rootfs";
/// The line the default guest prints once it is up (the guest contract: `guest/README.md`).
pub const READY_MARKER: &str = "METALD_GUEST_READY";

/// Directory holding the built guest image (scripts/build-guest-image.sh output).
pub fn guest_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("METALD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
    ["vmlinux", "initrd.img", "rootfs.ext4"]
        .iter()
        .all(|f| dir.join(f).exists())
        .then_some(dir)
}

/// The QEMU binary, if installed.
pub fn qemu_bin() -> Option<PathBuf> {
    find_exe("UNKEY_METALD_QEMU_BIN", "qemu-system-x86_64")
}

/// The Firecracker binary, if installed.
pub fn firecracker_bin() -> Option<PathBuf> {
    find_exe("UNKEY_METALD_FIRECRACKER_BIN", "firecracker")
}

fn find_exe(var: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Why the guest image is missing (the e2e harness's skip reason and a required test's failure).
pub const NO_GUEST: &str =
    "guest image not built (scripts/build-guest-image.sh target/guest, or `make test`)";
/// Why QEMU is missing.
pub const NO_QEMU: &str =
    "qemu-system-x86_64 not installed (scripts/install-deps.sh, or `make test`)";

/// The guest image directory for a test that boots it with QEMU. The e2e harness skips such a
/// test when either is missing, unless METALD_REQUIRE_E2E=1: then the test runs and this fails.
pub fn qemu_guest() -> PathBuf {
    assert!(
        qemu_bin().is_some(),
        "required prerequisite missing: {NO_QEMU}"
    );
    guest_dir().unwrap_or_else(|| panic!("required prerequisite missing: {NO_GUEST}"))
}

/// A binary of this workspace (`metaldctl`, `billaged`), built beside `metald` by
/// `cargo build --workspace --bins` (as `make test` does).
pub fn workspace_bin(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_BIN_EXE_metald")).with_file_name(name);
    p.is_file().then_some(p)
}

/// The buf CLI (`METALD_BUF_BIN`, or what scripts/install-deps.sh put in target/tools).
pub fn buf_bin() -> Option<PathBuf> {
    let p = std::env::var_os("METALD_BUF_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/node_modules/.bin/buf")
        });
    p.exists().then_some(p)
}
