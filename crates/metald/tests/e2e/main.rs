//! metald's end-to-end tests, in one binary: the real metald binary, real VMs (QEMU, and
//! Firecracker where its binary exists), real SQLite files, real namespaces and real clients.
//!
//! The harness is libtest-mimic rather than `#[test]` because what a test needs (root, QEMU, the
//! guest image, a Firecracker binary, hardware KVM) is only known on the machine that runs it. A
//! test whose needs are missing is listed as ignored, so both cargo test and nextest count it as
//! skipped, never as passed; `--skip-report` prints each skipped test with its reason (make test
//! does so after the run). Under `METALD_REQUIRE_E2E=1` (as make test sets) only what no
//! registry provides may be missing: a test that needs QEMU, the guest image, root or a
//! workspace binary then runs and fails with the reason instead.

// Tests: a failed step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod billing;
mod chaos;
mod firecracker;
mod firewall;
mod fleet;
mod identity;
mod isolation;
mod lifecycle;
mod metering;
mod qemu;
mod snapshots;
mod startup;

use std::path::Path;

use libtest_mimic::{Arguments, Trial};

/// Something a test needs from the machine it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Root: tests make network namespaces, cgroups and jails.
    Root,
    /// `qemu-system-x86_64`.
    Qemu,
    /// The default guest image (scripts/build-guest-image.sh).
    Guest,
    /// `billaged`, built beside metald.
    Billaged,
    /// `metaldctl`, built beside metald.
    Metaldctl,
    /// The buf CLI.
    Buf,
    /// `/dev/kvm`.
    Kvm,
    /// A Firecracker binary.
    Firecracker,
    /// Hardware KVM (kvm_intel or kvm_amd), not kvm-pvm: full guests under Firecracker.
    HardwareKvm,
    /// A PostgreSQL server the test starts (Debian's postgresql-15, run as `postgres`).
    Postgres,
}

impl Need {
    /// Why this machine lacks it, if it does.
    fn missing(self) -> Option<String> {
        let present = match self {
            Need::Root => rustix::process::geteuid().is_root(),
            Need::Qemu => support::qemu_bin().is_some(),
            Need::Guest => support::guest_dir().is_some(),
            Need::Billaged => support::workspace_bin("billaged").is_some(),
            Need::Metaldctl => support::workspace_bin("metaldctl").is_some(),
            Need::Buf => support::buf_bin().is_some(),
            Need::Kvm => Path::new("/dev/kvm").exists(),
            Need::Firecracker => support::firecracker_bin().is_some(),
            Need::HardwareKvm => {
                let (hw, why) = metald::config::hardware_kvm(Path::new("/sys"), Path::new("/dev"));
                return (!hw).then(|| format!("needs hardware KVM: {why}"));
            }
            Need::Postgres => {
                return metald_store::testing::pg::TestPostgres::unavailable();
            }
        };
        (!present).then(|| self.why().to_string())
    }

    fn why(self) -> &'static str {
        match self {
            Need::Root => "needs root (network namespaces, cgroups, jails)",
            Need::Qemu => support::NO_QEMU,
            Need::Guest => support::NO_GUEST,
            Need::Billaged | Need::Metaldctl => {
                "workspace binaries not built (cargo build --workspace --bins, or `make test`)"
            }
            Need::Buf => "buf CLI not installed (scripts/install-deps.sh, or `make test`)",
            Need::Kvm => "no /dev/kvm (Firecracker needs KVM)",
            Need::Firecracker => {
                "no firecracker binary on PATH or in UNKEY_METALD_FIRECRACKER_BIN (Firecracker \
                 is in no package registry)"
            }
            Need::HardwareKvm => "needs hardware KVM",
            Need::Postgres => "needs PostgreSQL 15 (scripts/install-deps.sh, or `make test`)",
        }
    }

    /// Whether `make test` provides it. Under METALD_REQUIRE_E2E=1 a test that lacks such a need
    /// runs (and fails with the reason) instead of being skipped.
    fn provided_by_make(self) -> bool {
        !matches!(self, Need::Kvm | Need::Firecracker | Need::HardwareKvm)
    }
}

/// One end-to-end test: its name, what it needs from the machine, and its body.
pub struct E2e {
    name: &'static str,
    needs: &'static [Need],
    run: fn(),
}

/// `e2e![needs; test_fn, …]`: the tests of a module that need the same things.
#[macro_export]
macro_rules! e2e {
    ($needs:expr; $($test:ident),+ $(,)?) => {
        vec![$($crate::E2e { name: stringify!($test), needs: $needs, run: $test }),+]
    };
}

/// What booting the default guest under QEMU inside a test namespace needs.
pub const QEMU_GUEST: &[Need] = &[Need::Root, Need::Qemu, Need::Guest];

fn main() {
    let mut report = false;
    let args = Arguments::from_iter(std::env::args().filter(|a| {
        let ours = a == "--skip-report";
        report |= ours;
        !ours
    }));
    let require = std::env::var("METALD_REQUIRE_E2E").is_ok_and(|v| v == "1");
    let modules = [
        ("lifecycle", lifecycle::tests()),
        ("qemu", qemu::tests()),
        ("isolation", isolation::tests()),
        ("firewall", firewall::tests()),
        ("metering", metering::tests()),
        ("billing", billing::tests()),
        ("firecracker", firecracker::tests()),
        ("startup", startup::tests()),
        ("identity", identity::tests()),
        ("snapshots", snapshots::tests()),
        ("fleet", fleet::tests()),
        ("chaos", chaos::tests()),
    ];
    // Why → the tests skipped for it, in the order they are listed.
    let mut skipped: Vec<(String, Vec<String>)> = Vec::new();
    let mut trials = Vec::new();
    for (module, tests) in modules {
        for test in tests {
            let name = format!("{module}::{}", test.name);
            let why: Vec<String> = test
                .needs
                .iter()
                .filter(|n| !(require && n.provided_by_make()))
                .filter_map(|n| n.missing())
                .collect();
            if !why.is_empty() {
                let why = why.join("; ");
                match skipped.iter_mut().find(|(w, _)| *w == why) {
                    Some((_, names)) => names.push(name.clone()),
                    None => skipped.push((why, vec![name.clone()])),
                }
            }
            let run = test.run;
            trials.push(
                Trial::test(name, move || {
                    run();
                    Ok(())
                })
                .with_ignored_flag(!why.is_empty()),
            );
        }
    }
    let count: usize = skipped.iter().map(|(_, names)| names.len()).sum();
    let mut summary = if count == 0 {
        "e2e: no test skipped: every prerequisite is present".to_string()
    } else {
        format!("e2e: {count} test(s) skipped on this machine:")
    };
    for (why, names) in &skipped {
        summary.push_str(&format!("\n  SKIPPED because {why}:"));
        for name in names {
            summary.push_str(&format!("\n    {name}"));
        }
    }
    if report {
        println!("{summary}");
        return;
    }
    // A whole-suite run under cargo test says why up front; nextest's one-test runs (--exact)
    // and listings do not repeat it.
    if !args.list && !args.exact {
        eprintln!("{summary}");
    }
    libtest_mimic::run(&args, trials).exit();
}
