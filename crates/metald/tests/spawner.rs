//! The jail's spawner (`metald-jail spawner`, [`metald::spawner`]) against the real
//! binary: what it starts is the caller's own child, with exactly what was asked for and
//! nothing of the caller's or the spawner's descriptors, and a failure is reported, reaped
//! and survived.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use metald::spawner::{SpawnError, SpawnRequest, Spawner};
use rustix::process::{Pid, WaitOptions};

fn spawner() -> Spawner {
    Spawner::new(PathBuf::from(env!("CARGO_BIN_EXE_metald-jail")))
}

fn sh(script: &str, cwd: &Path) -> SpawnRequest {
    SpawnRequest {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: vec![("ONLY".into(), "this".into())],
        cwd: cwd.to_path_buf(),
    }
}

/// Waits for `pid`, which must be this process's child; its exit code.
fn wait_child(pid: u32) -> i32 {
    let (_, status) = rustix::process::waitpid(
        Some(Pid::from_raw(pid as i32).unwrap()),
        WaitOptions::empty(),
    )
    .unwrap()
    .unwrap();
    status.exit_status().unwrap()
}

#[test]
fn a_spawned_process_is_the_callers_child_with_only_what_was_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let err_path = dir.path().join("err");
    let out = File::create(&out_path).unwrap();
    let err = File::create(&err_path).unwrap();
    // Descriptors of the caller that must not reach the child (std opens them close-on-exec,
    // as metald's are).
    let _held: Vec<File> = (0..50).map(|_| File::open("/dev/null").unwrap()).collect();
    let s = spawner();
    let script =
        "echo \"cwd=$(pwd) env=$(env | grep -v '^PWD=\\|^SHLVL=\\|^_=' | tr '\\n' ' ')\"; \
                  ls /proc/self/fd | tr '\\n' ' '; echo; \
                  grep -E '^(SigIgn|SigBlk)' /proc/self/status; \
                  echo \"pgid=$(cut -d' ' -f5 /proc/$$/stat) pid=$$\"; \
                  read line; echo \"stdin=[$line]\"; echo oops >&2; exit 3";
    let pid = s
        .spawn(&sh(script, dir.path()), None, out.as_fd(), err.as_fd())
        .unwrap();
    assert_eq!(
        wait_child(pid),
        3,
        "exit code through waitpid: our own child"
    );
    let out = std::fs::read_to_string(&out_path).unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    assert!(
        out.contains(&format!("cwd={} env=ONLY=this \n", cwd.display())),
        "{out}"
    );
    // stdin, stdout, stderr and the one ls itself opened.
    assert!(out.contains("\n0 1 2 3 \n"), "{out}");
    // SIGPIPE (13) back to its default: Rust (the caller's and the spawner's) ignores it.
    let ignored = out
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
    assert!(out.contains(&format!("pgid={pid} pid={pid}")), "{out}");
    assert!(out.contains("stdin=[]"), "{out}");
    assert_eq!(std::fs::read_to_string(&err_path).unwrap(), "oops\n");
    // The spawner holds its socket (stdin), stdout, stderr and /dev/null: nothing of its
    // caller's, never a request's files.
    let fd_dir = format!("/proc/{}/fd", s.pids()[0]);
    let spawner_fds: Vec<String> = std::fs::read_dir(&fd_dir)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_link(e.path()).unwrap().display().to_string())
        .collect();
    assert_eq!(spawner_fds.len(), 4, "{spawner_fds:?}");
}

#[test]
fn a_failed_start_is_reported_and_reaped_and_a_dead_spawner_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let log = File::create(dir.path().join("log")).unwrap();
    let s = spawner();
    let mut missing = sh("", dir.path());
    missing.program = dir.path().join("no-such-binary");
    match s.spawn(&missing, None, log.as_fd(), log.as_fd()) {
        Err(SpawnError::Child { step, source, .. }) => {
            assert_eq!(step, "exec");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("{other:?}"),
    }
    let mut bad_cwd = sh("exit 0", dir.path());
    bad_cwd.cwd = dir.path().join("gone");
    match s.spawn(&bad_cwd, None, log.as_fd(), log.as_fd()) {
        Err(SpawnError::Child { step, .. }) => assert_eq!(step, "chdir"),
        other => panic!("{other:?}"),
    }
    // Both failed children were reaped by the spawner's caller: none is left a zombie.
    assert_eq!(zombie_children(), Vec::<u32>::new());
    // The spawner dies: the next request says so, the one after starts a new spawner.
    let first = s.pids()[0];
    rustix::process::kill_process(
        Pid::from_raw(first as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    match s.spawn(&sh("exit 0", dir.path()), None, log.as_fd(), log.as_fd()) {
        Err(SpawnError::Spawner { .. }) => {}
        other => panic!("{other:?}"),
    }
    let pid = s
        .spawn(&sh("exit 5", dir.path()), None, log.as_fd(), log.as_fd())
        .unwrap();
    assert_eq!(wait_child(pid), 5);
    assert_ne!(s.pids(), vec![first]);
}

/// This process's children that exited and were not reaped.
fn zombie_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // After the command name (in parentheses): state, ppid.
            let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
            (rest.next()? == "Z" && rest.next()? == me).then_some(pid)
        })
        .collect()
}

#[tokio::test]
async fn run_feeds_stdin_returns_the_output_and_kills_what_it_stops_waiting_for() {
    let dir = tempfile::tempdir().unwrap();
    let s = spawner();
    let out = s
        .run(&sh("cat; echo err >&2", dir.path()), b"hello\n")
        .await
        .unwrap();
    assert!(out.success);
    assert_eq!(out.output, "hello\nerr\n");
    let out = s.run(&sh("exit 1", dir.path()), b"").await.unwrap();
    assert!(!out.success);
    // Given up on: killed and reaped, not left running or a zombie.
    let marker = dir.path().join("pid");
    let script = format!("echo $$ > {}; exec sleep 30", marker.display());
    let waited = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        s.run(&sh(&script, dir.path()), b""),
    )
    .await;
    assert!(waited.is_err(), "{waited:?}");
    let pid: u32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(std::time::Instant::now() < deadline, "{pid} still there");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
