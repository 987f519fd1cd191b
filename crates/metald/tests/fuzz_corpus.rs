//! Replays the fuzz seed corpus (`fuzz/corpus/<target>/`) through the same checks the libFuzzer
//! targets run (`metald::fuzzing`), so `make test` catches a regression on stable without
//! nightly or cargo-fuzz. Crashes the fuzzer finds are added to the corpus and replayed here.

// A test: an unreadable corpus should fail it where it happens.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use metald::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn replay(target: &str) {
    let check = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, check)| *check)
        .unwrap_or_else(|| panic!("{target} is not in metald::fuzzing::TARGETS"));
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seeds", dir.display());
    for file in files {
        let data = std::fs::read(&file).unwrap();
        // Printed before the check so a failure names its input (the output of a passing test
        // is not shown).
        eprintln!("{}", file.display());
        check(&data);
    }
}

#[test]
fn corpus_strict_json() {
    replay("strict_json");
}

#[test]
fn corpus_firecracker_metrics() {
    replay("firecracker_metrics");
}

#[test]
fn corpus_qmp_reader() {
    replay("qmp_reader");
}

#[test]
fn corpus_ids_and_kernel_args() {
    replay("ids_and_kernel_args");
}

#[test]
fn corpus_netlink_stats() {
    replay("netlink_stats");
}

/// Every fuzz target has a check, a seed directory and a replay here: a target added on one
/// side only fails this test.
#[test]
fn corpus_covers_every_fuzz_target() {
    let names = |dir: &str, ext: Option<&str>| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(fuzz_dir().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let mut checks: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    checks.sort();
    assert_eq!(names("fuzz_targets", Some("rs")), checks);
    assert_eq!(names("corpus", None), checks);
    let replayed = include_str!("fuzz_corpus.rs");
    for name in &checks {
        assert!(
            replayed.contains(&format!("fn corpus_{name}()")),
            "no replay test for {name}"
        );
    }
}
