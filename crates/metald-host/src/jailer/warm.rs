//! Warm jails: jail children started ahead of boots, each waiting for the VM it will become.
//!
//! Most of what `metald-jail` does before it execs a VMM is the same for every VM of a kind:
//! its exec, the private mount namespace, the tmpfs root with the VMM's binary, libraries and
//! device nodes, made over a copy of the prepared root (`mntns::PreparedRoot`)
//! without a `pivot_root`. A warm jail (`metald-jail warm SPEC`) does all of that ahead, says
//! `ready` on its socket and waits, with every privilege it started with and no VM's anything
//! yet. A boot
//! then sends it an [`Assignment`] with the VM's descriptors (SCM_RIGHTS): its console and log
//! files, its network namespace, its cgroup files, and its files as detached mount trees
//! (`open_tree(OPEN_TREE_CLONE)`, attached inside the jail with `move_mount`, since no host
//! path is reachable there any more). The child joins them, hands the VM's files and devices
//! to the VM's uid, makes its root read-only, drops to the VM's uid and execs the VMM: the same
//! end state as a cold jail ([`super::child::run`]), checked by the same tests.
//!
//! A warm jail holds nothing on the host but its process: its mounts are in its own namespace.
//! It exits when its socket closes, so metald dying, stopping or dropping it ends it, and
//! nothing is left to sweep. The pool is refilled by one thread of its own; a boot that finds
//! it empty (or a jail with `tc` work, which needs host binaries) builds its jail cold.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rustix::net::{RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde::{Deserialize, Serialize};

use super::mntns::PreparedRoot;
use super::{JailDevice, JailMount, VmmRun};
use crate::report::Chain;
use crate::spawner::{SpawnRequest, Spawner};
use crate::starts::{Starts, Stock};

/// Most descriptors one assignment carries (stdout, stderr, namespace, cgroup files, mounts).
pub const MAX_FDS: usize = 64;
/// Largest assignment message.
pub const MAX_ASSIGNMENT: usize = 256 * 1024;
/// What a warm jail says once it waits for a VM.
pub const READY: &[u8] = b"ready";
/// How long a warm jail may take to get ready, or to exec once given a VM.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Most warm jails a jailer keeps.
pub const MAX_WARM_JAILS: usize = 64;
/// Assignments in a row that may fail before the pool is closed (the kernel refusing a step
/// every time; each failed boot is then started cold).
const MAX_FAILURES: u32 = 3;

/// What every warm jail of one jailer is made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmSpec {
    /// Host directory the prepared root's tmpfs is mounted on (or, without one, each jail's;
    /// either in a namespace of its own).
    pub root: PathBuf,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// The VMM's binary and libraries, bind-mounted read-only at their host paths.
    pub mounts: Vec<JailMount>,
    /// Device nodes, handed to the VM's uid once it is known.
    pub devices: Vec<JailDevice>,
    /// The jails' base mount namespace to start from.
    pub mount_ns: Option<PathBuf>,
    /// The prepared root to start from instead (see `mntns::PreparedRoot`): the jail's
    /// root is then made on [`super::child::JAIL_DIR`] there and moved over `/`, with no
    /// `pivot_root`. Set by the pool for each jail.
    #[serde(default)]
    pub prepared: Option<PathBuf>,
}

/// The VM's network as a warm jail sets it up (its namespace comes as a descriptor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedNet {
    /// TAP to create.
    pub tap: String,
    /// Bridge joining the TAP and the veth end.
    pub bridge: String,
    /// The veth end in the namespace.
    pub peer_if: String,
}

/// The VM a warm jail becomes. Its descriptors come with it, in this order: stdout, stderr,
/// the network namespace (with `net`), `cgroups` cgroup files to write `0` to, one detached
/// mount tree per entry of `mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The VM, its uid and gid, and its VMM (as in a cold jail's spec).
    #[serde(flatten)]
    pub vmm: VmmRun,
    /// Its network, if it has one.
    pub net: Option<AssignedNet>,
    /// How many cgroup files follow the namespace.
    pub cgroups: usize,
    /// The VM's own mounts (its directory, control directory, kernel, read-only drives).
    pub mounts: Vec<JailMount>,
}

/// One warm jail: a child of metald waiting on its socket.
#[derive(Debug)]
pub struct Warm {
    pid: u32,
    /// Until the child is handed over (or reaped): killed and reaped when dropped.
    pidfd: Option<OwnedFd>,
    sock: OwnedFd,
}

impl Warm {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn exited(&self) -> bool {
        let Some(pidfd) = &self.pidfd else {
            return true;
        };
        // Readable once the process has exited.
        let mut fds = [rustix::event::PollFd::new(
            pidfd,
            rustix::event::PollFlags::IN,
        )];
        !matches!(
            rustix::event::poll(&mut fds, Some(&rustix::time::Timespec::default())),
            Ok(0)
        )
    }

    /// Gives the jail its VM: sends `a` with `fds` (in [`Assignment`]'s order) and waits,
    /// without holding a runtime thread, for the VMM's exec. The pid, now the caller's to
    /// supervise and reap. Dropped before it returns, the jail is killed and reaped.
    pub async fn assign(self, a: &Assignment, fds: &[BorrowedFd<'_>]) -> io::Result<u32> {
        self.send(a, fds)?;
        tokio::time::timeout(REPLY_TIMEOUT, self.started())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the warm jail did not exec"))?
    }

    fn send(&self, a: &Assignment, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let msg = serde_json::to_vec(a).map_err(io::Error::from)?;
        if msg.len() > MAX_ASSIGNMENT || fds.len() > MAX_FDS {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // One message on an idle SEQPACKET socket: room for it, so this does not block.
        rustix::net::sendmsg(
            &self.sock,
            &[IoSlice::new(&msg)],
            &mut control,
            SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
        )?;
        Ok(())
    }

    /// Waits for the end of the jail's socket, which is close-on-exec: the exec, unless the
    /// jail said why it failed or exited.
    async fn started(mut self) -> io::Result<u32> {
        // SAFETY: the AsyncFd owns its duplicate of the socket, so the descriptor stays open
        // and unchanged while registered.
        let readable = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                self.sock.try_clone()?,
                tokio::io::Interest::READABLE,
            )
        }?;
        let mut buf = [0u8; 4096];
        let n = loop {
            let mut ready = readable.readable().await?;
            match rustix::net::recv(readable.get_ref(), &mut buf, RecvFlags::DONTWAIT) {
                Ok((n, _)) => break n,
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        if n > 0 {
            let said = String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned();
            return Err(io::Error::other(said));
        }
        if let Some(pidfd) = &self.pidfd {
            let gone = rustix::process::waitid(
                rustix::process::WaitId::PidFd(pidfd.as_fd()),
                rustix::process::WaitIdOptions::EXITED
                    | rustix::process::WaitIdOptions::NOHANG
                    | rustix::process::WaitIdOptions::NOWAIT,
            )?;
            if gone.is_some() {
                return Err(io::Error::other("the warm jail exited before its exec"));
            }
        }
        // Handed over: its supervisor reaps it.
        self.pidfd = None;
        Ok(self.pid)
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd.take() {
            let _ignored =
                rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            // SIGKILL'd, it exits at once.
            crate::spawner::reap(&pidfd);
        }
    }
}

/// The pool of warm jails of one jailer.
#[derive(Debug)]
pub struct WarmJails {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: usize,
    spec: WarmSpec,
    /// What jails start from.
    prepared: Mutex<Prepared>,
    jail_exe: PathBuf,
    spawner: Arc<Spawner>,
    /// The VM starts in flight: a refill waits them out (see [`crate::starts`]).
    starts: Arc<Starts>,
    state: Mutex<State>,
    wake: Condvar,
    /// VMMs started in a warm jail.
    warm_starts: AtomicU64,
    /// VMMs whose jail was built at their boot (none ready, or not one a warm jail can be).
    cold_starts: AtomicU64,
}

/// What the pool's jails start from.
#[derive(Debug)]
enum Prepared {
    /// Each builds its root and pivots (not asked for, or preparing one failed).
    Off,
    /// The prepared root, to be made (again) before the next jail.
    Unmade,
    /// The prepared root; remade when the VMM's files change on the host.
    Made(PreparedRoot),
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<Warm>,
    started: bool,
    closed: bool,
    failures: u32,
}

impl WarmJails {
    /// A pool of `target` warm jails made with `spec` by `jail_exe warm`, started through
    /// `spawner`, each once no VM start is in flight (`starts`), from a prepared root if
    /// `prepare`; nothing is started before [`WarmJails::start`].
    pub fn new(
        target: usize,
        spec: &WarmSpec,
        prepare: bool,
        jail_exe: PathBuf,
        spawner: Arc<Spawner>,
        starts: Arc<Starts>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                target: target.min(MAX_WARM_JAILS),
                spec: spec.clone(),
                prepared: Mutex::new(match prepare {
                    true => Prepared::Unmade,
                    false => Prepared::Off,
                }),
                jail_exe,
                spawner,
                starts,
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                warm_starts: AtomicU64::new(0),
                cold_starts: AtomicU64::new(0),
            }),
        }
    }

    /// Starts filling the pool in the background (once; not after [`WarmJails::close`]).
    pub fn start(&self) {
        let mut st = self.inner.lock();
        if self.inner.target == 0 || st.started || st.closed {
            return;
        }
        st.started = true;
        let inner = Arc::clone(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("metald-warm-jails".into())
            .spawn(move || fill(&inner));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "starting the warm jail pool failed; jails are built at each boot");
            st.closed = true;
        }
    }

    /// A ready warm jail, if there is one. The pool refills behind it once the caller
    /// [`WarmJails::record`]s how its assignment went: a new jail's mount work (its
    /// `pivot_root` holds the kernel's global mount lock while it walks every thread on the
    /// host, 2.3 ms near 1000 VMs) would otherwise run beside this one's `open_tree` and
    /// `move_mount`, which wait for that lock.
    pub fn take(&self) -> Option<Warm> {
        let mut st = self.inner.lock();
        let mut dead = Vec::new();
        let found = loop {
            match st.ready.pop_front() {
                Some(w) if w.exited() => dead.push(w),
                other => break other,
            }
        };
        if found.is_none() || !dead.is_empty() {
            // Nothing will be recorded for these: refill now.
            self.inner.wake.notify_all();
        }
        drop(st);
        // Reaped outside the lock.
        drop(dead);
        found
    }

    /// Records how the assignment of a jail from [`WarmJails::take`] went, and lets the pool
    /// refill: after [`MAX_FAILURES`] failures in a row it is closed (every boot builds its
    /// jail cold, as with no pool).
    pub fn record(&self, ok: bool) {
        let mut st = self.inner.lock();
        self.inner.wake.notify_all();
        if ok {
            st.failures = 0;
            self.inner.warm_starts.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.failures = st.failures.saturating_add(1);
        if st.failures >= MAX_FAILURES {
            drop(st);
            tracing::error!(
                "{MAX_FAILURES} warm jails in a row failed to take their VM; closing the pool"
            );
            self.close();
        }
    }

    /// Counts a VMM whose jail was built at its boot.
    pub fn record_cold_start(&self) {
        self.inner.cold_starts.fetch_add(1, Ordering::Relaxed);
    }

    /// VMMs started so far in a warm jail, and in a jail built at their boot.
    pub fn starts(&self) -> (u64, u64) {
        (
            self.inner.warm_starts.load(Ordering::Relaxed),
            self.inner.cold_starts.load(Ordering::Relaxed),
        )
    }

    /// How many jails are ready now.
    pub fn ready(&self) -> usize {
        self.inner.lock().ready.len()
    }

    /// Ends every ready jail and stops refilling.
    pub fn close(&self) {
        let mut st = self.inner.lock();
        st.closed = true;
        let ready: Vec<Warm> = st.ready.drain(..).collect();
        self.inner.wake.notify_all();
        drop(st);
        drop(ready);
        // Its thread ends.
        let mut prepared = self.inner.prepared_root();
        if matches!(*prepared, Prepared::Made(_)) {
            *prepared = Prepared::Unmade;
        }
    }
}

/// One pool is equal only to itself.
impl PartialEq for WarmJails {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for WarmJails {}

impl Drop for WarmJails {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Queue operations cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn prepared_root(&self) -> MutexGuard<'_, Prepared> {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next jail's spec: from the prepared root, made first, or remade (and the ready
    /// jails, which hold the old files, ended) if the VMM's files changed on the host since.
    fn next_spec(&self) -> String {
        let mut spec = self.spec.clone();
        let mut prepared = self.prepared_root();
        if matches!(&*prepared, Prepared::Made(p) if !p.is_current(&spec.mounts)) {
            tracing::info!(
                "the VMM's files changed on the host; the warm jails start again from them"
            );
            *prepared = Prepared::Unmade;
            let stale: Vec<Warm> = self.lock().ready.drain(..).collect();
            drop(stale);
        }
        if matches!(*prepared, Prepared::Unmade) {
            *prepared = match PreparedRoot::make(&spec.root, &spec.mounts) {
                Ok(p) => {
                    tracing::debug!(path = %p.path().display(), "warm jails' root prepared");
                    Prepared::Made(p)
                }
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), "preparing the warm jails' root failed; each jail builds its own");
                    Prepared::Off
                }
            };
        }
        if let Prepared::Made(p) = &*prepared {
            spec.prepared = Some(p.path().to_path_buf());
        }
        // Plain data built by metald: serializing it cannot fail.
        serde_json::to_string(&spec).unwrap_or_default()
    }

    /// Starts one warm jail and waits until it is ready.
    fn start_one(&self) -> io::Result<Warm> {
        let (ours, theirs) = crate::spawner::socket_pair(REPLY_TIMEOUT)?;
        let null = std::fs::File::open("/dev/null")?;
        let req = SpawnRequest {
            program: self.jail_exe.clone(),
            args: vec!["warm".into(), self.next_spec()],
            env: Vec::new(),
            cwd: "/".into(),
        };
        let pid = self
            .spawner
            .spawn(&req, Some(theirs.as_fd()), null.as_fd(), null.as_fd())
            .map_err(io::Error::other)?;
        drop(theirs);
        let pidfd = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
            .and_then(|p| {
                rustix::process::pidfd_open(p, rustix::process::PidfdFlags::NONBLOCK)
                    .map_err(io::Error::from)
            });
        let pidfd = match pidfd {
            Ok(fd) => fd,
            Err(e) => {
                // Our child all the same: killed and reaped by pid.
                if let Some(p) = i32::try_from(pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ignored = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                    let _ignored =
                        rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
                }
                return Err(e);
            }
        };
        let warm = Warm {
            pid,
            pidfd: Some(pidfd),
            sock: ours,
        };
        let mut buf = [0u8; 4096];
        let (n, _) = rustix::net::recv(&warm.sock, &mut buf, RecvFlags::empty())?;
        match buf.get(..n) {
            Some(said) if said == READY => Ok(warm),
            Some([]) => Err(io::Error::other("exited before it was ready")),
            Some(said) => Err(io::Error::other(String::from_utf8_lossy(said).into_owned())),
            None => Err(io::ErrorKind::InvalidData.into()),
        }
    }
}

/// The pool's thread: keeps `target` jails ready until the pool closes, backing off while
/// starting them fails.
fn fill(inner: &Inner) {
    let mut delay = Duration::ZERO;
    loop {
        {
            let mut st = inner.lock();
            if !delay.is_zero() && !st.closed {
                st = inner
                    .wake
                    .wait_timeout(st, delay)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            while !st.closed && st.ready.len() >= inner.target {
                // Woken by a record (or an empty take); the timeout covers a boot given up
                // between its take and its record, which records nothing.
                st = inner
                    .wake
                    .wait_timeout(st, Duration::from_secs(1))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            if st.closed {
                return;
            }
        }
        // Not beside a boot: its exec and mounts would slow that boot down.
        inner
            .starts
            .before_refill(|| Stock::of(inner.lock().ready.len(), inner.target));
        let t0 = std::time::Instant::now();
        match inner.start_one() {
            Ok(warm) => {
                delay = Duration::ZERO;
                let mut st = inner.lock();
                if st.closed {
                    drop(st);
                    drop(warm);
                    return;
                }
                tracing::debug!(
                    pid = warm.pid(),
                    ready_ms = t0.elapsed().as_secs_f64() * 1000.0,
                    "warm jail ready"
                );
                st.ready.push_back(warm);
            }
            Err(e) => {
                delay = (delay * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                tracing::warn!(error = %Chain(&e), retry_in_s = delay.as_secs(), "starting a warm jail failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{AddressFamily, SocketFlags, SocketType};

    /// A warm jail whose "child" is `cmd` and whose other socket end the test holds.
    fn fake(cmd: &mut std::process::Command) -> (Warm, OwnedFd, std::process::Child) {
        let (ours, theirs) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let child = cmd.spawn().unwrap();
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        let pidfd =
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).unwrap();
        let warm = Warm {
            pid: child.id(),
            pidfd: Some(pidfd),
            sock: ours,
        };
        (warm, theirs, child)
    }

    fn assignment() -> Assignment {
        Assignment {
            vmm: VmmRun {
                vm_id: "vm-1".into(),
                uid: 1,
                gid: 1,
                exec: "/bin/true".into(),
                args: Vec::new(),
                env: Vec::new(),
                workdir: "/".into(),
                owned_dir: "/".into(),
                owned_files: Vec::new(),
            },
            net: None,
            cgroups: 0,
            mounts: Vec::new(),
        }
    }

    fn assign(warm: Warm, a: &Assignment, fds: &[BorrowedFd<'_>]) -> io::Result<u32> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(warm.assign(a, fds))
    }

    /// A pool of one that is never started (its jails are put in by the test).
    fn unstarted_pool() -> WarmJails {
        WarmJails::new(
            1,
            &WarmSpec {
                root: "/nonexistent".into(),
                nofile: 1,
                mounts: Vec::new(),
                devices: Vec::new(),
                mount_ns: None,
                prepared: None,
            },
            false,
            "/nonexistent".into(),
            Arc::new(Spawner::new("/nonexistent".into())),
            Arc::new(Starts::default()),
        )
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z ") && !s.contains(") X "))
    }

    /// Waits until `pid` has exited (a zombie until reaped).
    fn until_exited(pid: u32) {
        while alive(pid) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The jail's side: reads its assignment from its socket end.
    fn read_its_vm(theirs: &OwnedFd) {
        let mut buf = vec![0u8; MAX_ASSIGNMENT];
        rustix::net::recv(theirs, &mut buf, RecvFlags::empty()).unwrap();
    }

    #[test]
    fn an_assignment_carries_its_descriptors_and_the_end_of_the_socket_is_the_exec() {
        let (warm, theirs, mut child) = fake(std::process::Command::new("sleep").arg("30"));
        let pid = warm.pid();
        let log = tempfile::tempfile().unwrap();
        let sent = std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_ASSIGNMENT];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
            let got = rustix::net::recvmsg(
                &theirs,
                &mut [io::IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .unwrap();
            let fds = control
                .drain()
                .map(|m| match m {
                    rustix::net::RecvAncillaryMessage::ScmRights(f) => f.count(),
                    _ => 0,
                })
                .sum::<usize>();
            let a: Assignment = serde_json::from_slice(&buf[..got.bytes]).unwrap();
            // Closing its end, as the exec does.
            drop(theirs);
            (a, fds)
        });
        let got = assign(warm, &assignment(), &[log.as_fd(), log.as_fd()]);
        assert_eq!(got.unwrap(), pid);
        let (a, fds) = sent.join().unwrap();
        assert_eq!((a, fds), (assignment(), 2));
        // Handed over: not killed with the `Warm`, the caller's to reap.
        assert!(alive(pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn what_the_child_says_is_the_error_and_a_failed_jail_is_killed_and_reaped() {
        let (warm, theirs, _child) = fake(std::process::Command::new("sleep").arg("30"));
        let pid = warm.pid();
        let answer = std::thread::spawn(move || {
            read_its_vm(&theirs);
            rustix::net::send(
                &theirs,
                b"metald-jail: attach /vm: EPERM",
                SendFlags::empty(),
            )
            .unwrap();
            theirs
        });
        let err = assign(warm, &assignment(), &[]).unwrap_err();
        assert_eq!(err.to_string(), "metald-jail: attach /vm: EPERM");
        drop(answer.join().unwrap());
        // Killed and reaped by the dropped `Warm`: no process, not even a zombie.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn a_jail_that_died_is_never_taken_for_an_exec() {
        let (warm, theirs, _child) = fake(&mut std::process::Command::new("true"));
        let pid = warm.pid();
        drop(theirs);
        // Exited (a zombie until reaped): its socket's end is not an exec.
        until_exited(pid);
        let pool = unstarted_pool();
        pool.inner.lock().ready.push_back(warm);
        assert!(pool.take().is_none(), "a dead jail is skipped");
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        let (warm, theirs, _child) = fake(&mut std::process::Command::new("true"));
        drop(theirs);
        until_exited(warm.pid());
        // Its socket's other end is gone with it.
        let err = assign(warm, &assignment(), &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    }

    #[test]
    fn a_jail_that_took_its_vm_and_exited_did_not_exec() {
        let (warm, theirs, _child) = fake(&mut std::process::Command::new("true"));
        until_exited(warm.pid());
        // It reads its VM, and its socket's end goes with the thread.
        let reader = std::thread::spawn(move || read_its_vm(&theirs));
        let err = assign(warm, &assignment(), &[]).unwrap_err();
        reader.join().unwrap();
        assert!(err.to_string().contains("exited before its exec"), "{err}");
    }

    #[test]
    fn a_boot_given_up_while_its_jail_starts_kills_the_jail() {
        let (warm, theirs, _child) = fake(std::process::Command::new("sleep").arg("30"));
        let pid = warm.pid();
        // The jail reads its VM and never gets to its exec.
        let reader = std::thread::spawn(move || {
            read_its_vm(&theirs);
            theirs
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let a = assignment();
        let gave_up = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), warm.assign(&a, &[])).await
        });
        assert!(gave_up.is_err(), "still waiting for the exec");
        // The dropped assignment took the jail with it: killed and reaped.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        drop(reader.join().unwrap());
    }

    #[test]
    fn failed_assignments_in_a_row_close_the_pool() {
        let pool = unstarted_pool();
        pool.record(false);
        pool.record(true);
        pool.record(false);
        pool.record(false);
        assert!(
            !pool.inner.lock().closed,
            "a success in between resets the count"
        );
        pool.record(false);
        assert!(pool.inner.lock().closed);
    }
}
