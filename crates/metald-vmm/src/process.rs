//! VMM process supervision through pidfds: race-free signals, exit notification on the tokio
//! reactor, and re-adoption of a VMM that outlived a previous metald.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::BackendError;
use crate::domain::VmId;

/// A VMM process as recorded: its pid and start time (so a reused pid is never mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmProcess {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// A VMM exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitEvent {
    /// Whose VMM.
    pub vm_id: VmId,
    /// Which process.
    pub pid: u32,
    /// How it ended, e.g. "exit status 1" or "killed by signal 9".
    pub status: String,
    /// metald asked it to stop (shutdown, kill); otherwise it died on its own.
    pub requested: bool,
}

/// A supervised VMM process.
pub struct Supervised {
    /// The process.
    pub process: VmmProcess,
    pidfd: Arc<OwnedFd>,
    requested: Arc<AtomicBool>,
    exited: watch::Receiver<Option<String>>,
}

impl Supervised {
    /// Spawns `cmd` (stdin from /dev/null, stdout and stderr to the given open files, its own
    /// process group so a terminal's Ctrl-C never reaches it) and supervises it.
    pub fn spawn(
        mut cmd: Command,
        stdout: std::fs::File,
        stderr: std::fs::File,
        vm_id: VmId,
        events: mpsc::UnboundedSender<ExitEvent>,
    ) -> Result<Arc<Self>, BackendError> {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        let binary = Path::new(cmd.get_program()).to_path_buf();
        let child = cmd
            .spawn()
            .map_err(|source| BackendError::Spawn { binary, source })?;
        let pid = child.id();
        // Reaping happens through the pidfd (waitid), so the std handle is not needed; dropping
        // it neither kills nor reaps the child.
        drop(child);
        Self::child(pid, vm_id, events)
    }

    /// Supervises `pid`, a child of this process started some other way (the jail's spawner);
    /// it is reaped here.
    pub fn child(
        pid: u32,
        vm_id: VmId,
        events: mpsc::UnboundedSender<ExitEvent>,
    ) -> Result<Arc<Self>, BackendError> {
        let pidfd = open_pidfd(pid)?;
        let start_ticks = start_ticks(pid).unwrap_or(0);
        Ok(Self::watch(
            VmmProcess { pid, start_ticks },
            pidfd,
            true,
            vm_id,
            events,
        ))
    }

    /// Re-attaches to a process recorded earlier; `None` if it is gone or the pid was reused.
    pub fn adopt(
        process: VmmProcess,
        vm_id: VmId,
        events: mpsc::UnboundedSender<ExitEvent>,
    ) -> Option<Arc<Self>> {
        let pidfd = open_pidfd(process.pid).ok()?;
        // Checked after opening the pidfd: if the start time matches now, the fd refers to the
        // recorded process for good. A zombie (dead, not yet reaped by its new parent) is gone.
        let (state, started) = proc_stat(process.pid)?;
        if started != process.start_ticks || state == 'Z' {
            return None;
        }
        Some(Self::watch(process, pidfd, false, vm_id, events))
    }

    fn watch(
        process: VmmProcess,
        pidfd: OwnedFd,
        is_child: bool,
        vm_id: VmId,
        events: mpsc::UnboundedSender<ExitEvent>,
    ) -> Arc<Self> {
        let pidfd = Arc::new(pidfd);
        let requested = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel(None);
        let task_fd = Arc::clone(&pidfd);
        let task_requested = Arc::clone(&requested);
        tokio::spawn(async move {
            let status = wait_for_exit(task_fd, is_child).await;
            let _ignored = tx.send(Some(status.clone()));
            // The receiver is gone only when metald is shutting down; nothing to tell then.
            let _ignored = events.send(ExitEvent {
                vm_id,
                pid: process.pid,
                status,
                requested: task_requested.load(Ordering::SeqCst),
            });
        });
        Arc::new(Self {
            process,
            pidfd,
            requested,
            exited: rx,
        })
    }

    /// True while the process has not exited.
    pub fn alive(&self) -> bool {
        self.exited.borrow().is_none()
    }

    /// How the process ended, once it has.
    pub fn exit_status(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    /// Marks the coming exit as asked for by metald.
    pub fn mark_requested(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Kills the process (SIGKILL through the pidfd, so never another process).
    pub fn kill(&self) -> Result<(), BackendError> {
        self.mark_requested();
        match pidfd_send_signal(self.pidfd.as_fd(), Signal::KILL) {
            Ok(()) => Ok(()),
            // ESRCH: already exited.
            Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(BackendError::Process {
                op: "kill",
                pid: self.process.pid,
                source: e.into(),
            }),
        }
    }

    /// Waits until the process exits or `timeout` passes; the exit status if it exited.
    pub async fn wait(&self, timeout: Duration) -> Option<String> {
        let mut rx = self.exited.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some())).await;
        match waited {
            Ok(Ok(status)) => status.clone(),
            _ => self.exit_status(),
        }
    }

    /// Kills the process and waits for it to be gone.
    pub async fn kill_and_wait(&self) -> Result<String, BackendError> {
        self.kill()?;
        // SIGKILL cannot be caught; the wait is bounded only to never hang an API call forever.
        self.wait(Duration::from_secs(10))
            .await
            .ok_or_else(|| BackendError::Process {
                op: "wait for killed",
                pid: self.process.pid,
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            })
    }
}

fn open_pidfd(pid: u32) -> Result<OwnedFd, BackendError> {
    let process_err = |source: std::io::Error| BackendError::Process {
        op: "open pidfd of",
        pid,
        source,
    };
    let raw =
        i32::try_from(pid).map_err(|_| process_err(std::io::ErrorKind::InvalidInput.into()))?;
    let pid_t =
        Pid::from_raw(raw).ok_or_else(|| process_err(std::io::ErrorKind::InvalidInput.into()))?;
    pidfd_open(pid_t, PidfdFlags::NONBLOCK).map_err(|e| process_err(e.into()))
}

/// Waits for the pidfd to become readable (the process exited) and describes how it ended.
async fn wait_for_exit(pidfd: Arc<OwnedFd>, is_child: bool) -> String {
    // SAFETY: PidFdRef owns an Arc of the OwnedFd, so the fd stays open and unchanged for as long as the AsyncFd lives.
    let registered = unsafe {
        AsyncFd::register_with_interest(PidFdRef(Arc::clone(&pidfd)), tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(async_fd) => {
            // Readable exactly once the process has exited. An error here means the fd is
            // unusable; waitid below still reports (or reaps) correctly.
            let _ignored = async_fd.readable().await;
        }
        Err(_) => {
            // Registration only fails when the reactor is out of resources; fall back to a
            // blocking poll on a worker thread rather than losing the exit.
            let fd = Arc::clone(&pidfd);
            let _ignored = tokio::task::spawn_blocking(move || {
                let mut fds = [rustix::event::PollFd::new(
                    &*fd,
                    rustix::event::PollFlags::IN,
                )];
                rustix::event::poll(&mut fds, None)
            })
            .await;
        }
    }
    if !is_child {
        return "exited (status unknown: adopted from a previous metald)".to_string();
    }
    let fd = Arc::clone(&pidfd);
    let reaped = tokio::task::spawn_blocking(move || {
        rustix::process::waitid(
            rustix::process::WaitId::PidFd(fd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        )
    })
    .await;
    match reaped {
        Ok(Ok(Some(status))) => describe(&status),
        Ok(Ok(None)) => "exited".to_string(),
        Ok(Err(e)) => format!("exited (status unavailable: {e})"),
        Err(e) => format!("exited (status unavailable: {e})"),
    }
}

fn describe(status: &rustix::process::WaitIdStatus) -> String {
    if let Some(code) = status.exit_status() {
        format!("exit status {code}")
    } else if let Some(sig) = status.terminating_signal() {
        format!("killed by signal {sig}")
    } else {
        "exited".to_string()
    }
}

/// Lets `AsyncFd` watch a pidfd that is shared with the handle used for signals.
struct PidFdRef(Arc<OwnedFd>);

impl std::os::fd::AsRawFd for PidFdRef {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self.0)
    }
}

/// Unjailed VMMs (isolation off) of VMs not in `keep`: every process under procfs `proc`
/// whose working directory is a VM directory in `vms_dir` (a backend starts each VMM there),
/// with the VM it runs for. metald killed between spawning a VMM and recording it leaves
/// such a process, which nothing else would ever stop. Jailed VMMs never match: their working
/// directory is inside their jail, and their cgroup is how they are found.
pub fn stray_vmms(
    proc: &Path,
    vms_dir: &Path,
    keep: &std::collections::HashSet<VmId>,
) -> Vec<(u32, VmId)> {
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            if cwd.parent() != Some(vms_dir) {
                return None;
            }
            let vm: VmId = cwd.file_name()?.to_str()?.parse().ok()?;
            (!keep.contains(&vm)).then_some((pid, vm))
        })
        .collect()
}

/// Kills process `pid` through a pidfd, so a pid reused since it was found is never hit.
pub fn kill_pid(pid: u32) -> std::io::Result<()> {
    let raw =
        i32::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let pid =
        Pid::from_raw(raw).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let fd = pidfd_open(pid, PidfdFlags::empty())?;
    pidfd_send_signal(fd.as_fd(), Signal::KILL)?;
    Ok(())
}

/// Start time of a process in clock ticks since boot, from `/proc/<pid>/stat`.
pub fn start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// State letter and start time of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // The command name (field 2) may contain spaces and parentheses; fields resume after the
    // last ')'. state is field 3 and starttime field 22, i.e. the 1st and 20th after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A log file opened for appending, as a backend opens its VMM's.
    pub(crate) fn log(path: &Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
    }

    /// A process working in a VM directory is that VM's VMM: found unless kept, and killed.
    #[test]
    fn strays_are_the_processes_working_in_a_vm_directory_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let vms = dir.path().join("vms");
        let (stray, kept) = (VmId::generate(), VmId::generate());
        let spawn = |vm: &VmId| {
            let cwd = vms.join(vm.as_str());
            std::fs::create_dir_all(&cwd).unwrap();
            Command::new("sleep")
                .arg("600")
                .current_dir(cwd)
                .spawn()
                .unwrap()
        };
        let (mut a, mut b) = (spawn(&stray), spawn(&kept));
        let keep = std::collections::HashSet::from([kept.clone()]);
        // Reading a new child's cwd may race its exec; it is there within moments.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = stray_vmms(Path::new("/proc"), &vms, &keep);
            if !found.is_empty() || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(found, vec![(a.id(), stray)]);
        kill_pid(a.id()).unwrap();
        assert!(a.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(b.try_wait().unwrap().is_none(), "the kept one runs on");
        b.kill().unwrap();
        b.wait().unwrap();
    }

    #[test]
    fn parses_start_time_past_odd_names() {
        let stat =
            "123 (qemu (x) y) S 1 123 123 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 98765 1000 10";
        assert_eq!(parse_stat(stat), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
        assert!(start_ticks(std::process::id()).is_some());
    }

    #[tokio::test]
    async fn reports_exit_status_and_kills() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let id = VmId::generate();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hi; exit 3"]);
        let p = Supervised::spawn(cmd, log(&out), log(&out), id.clone(), tx.clone()).unwrap();
        let ev = rx.recv().await.unwrap();
        assert_eq!(ev.status, "exit status 3");
        assert!(!ev.requested);
        assert!(!p.alive());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "hi\n");

        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let p = Supervised::spawn(cmd, log(&out), log(&out), id.clone(), tx.clone()).unwrap();
        assert!(p.alive());
        // The same process can be adopted while it runs; a wrong start time is refused.
        // (Adopters report on their own channel so this test's channel sees only `p`.)
        let (adopt_tx, mut adopt_rx) = mpsc::unbounded_channel();
        assert!(Supervised::adopt(p.process, id.clone(), adopt_tx.clone()).is_some());
        let mut wrong = p.process;
        wrong.start_ticks += 1;
        assert!(Supervised::adopt(wrong, id.clone(), adopt_tx).is_none());
        assert_eq!(p.kill_and_wait().await.unwrap(), "killed by signal 9");
        let ev = rx.recv().await.unwrap();
        assert!(ev.requested);
        assert!(!std::path::Path::new(&format!("/proc/{}", p.process.pid)).exists());
        let adopted = adopt_rx.recv().await.unwrap();
        assert!(adopted.status.contains("adopted"), "{}", adopted.status);
    }
}
