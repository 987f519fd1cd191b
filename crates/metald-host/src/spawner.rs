//! Starts jail children from a small process that holds none of metald's descriptors.
//!
//! A process started from metald gets a copy of metald's descriptor table, and its exec closes
//! every close-on-exec entry one by one: with 1000 VMs running metald holds several
//! descriptors per VM (pidfd, metrics FIFO, metering files), and issue 14's profile of 1000
//! jailed boots (`perf record -a -g` during `benches/scale.rs`) put `do_close_on_exec` at 6 %
//! of both cores near the end against 2 % at the start: about 4 ms per boot, growing with
//! the VMs running. The spawner (`metald-jail spawner`, started by metald when it first
//! starts a jail) receives each request over a socket pair with the child's stdout and stderr,
//! forks itself (a few descriptors, a few MB) with `CLONE_PARENT` so the child is metald's
//! own, and answers with its pid once it exec'd. metald then supervises and reaps it through a
//! pidfd exactly as one it started itself.
//!
//! No crate starts a process as the caller's sibling (`CLONE_PARENT`) or passes descriptors to
//! a fork server, hence the system calls here.

use std::ffi::CString;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

/// Largest request (program, arguments, environment; a jail spec is a few KB).
pub const MAX_REQUEST: usize = 256 * 1024;

/// How long metald waits for the spawner's answer: a fork and an exec, normally a millisecond.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What to start: exactly this environment (nothing inherited), in its own process group,
/// stdin, stdout and stderr from the descriptors passed with the request (stdin from
/// /dev/null when none is passed for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// The binary (also `argv[0]`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment.
    pub env: Vec<(String, String)>,
    /// Its working directory.
    pub cwd: PathBuf,
}

/// The spawner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Reply {
    /// The child exec'd.
    Started { pid: u32 },
    /// A step before the exec (or the exec) failed; the child, if any, exited and is the
    /// caller's to reap.
    Failed {
        pid: Option<u32>,
        step: String,
        errno: i32,
    },
}

/// Starting a process through the spawner failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The spawner itself could not be started or talked to (the caller may start the
    /// process itself).
    #[error("spawner {exe}")]
    Spawner {
        /// The `metald-jail` binary.
        exe: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The request is larger than [`MAX_REQUEST`].
    #[error("spawn request of {0} bytes is larger than {MAX_REQUEST}")]
    TooLarge(usize),
    /// The child failed before or at its exec.
    #[error("{step} for {program}")]
    Child {
        /// The step (`exec`, `chdir`, ...).
        step: String,
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What [`Spawner::run`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// It exited with status 0.
    pub success: bool,
    /// What it wrote to stdout and stderr.
    pub output: String,
}

/// The most of a child's output [`Spawner::run`] keeps.
pub const MAX_OUTPUT: usize = 64 * 1024;

fn memfd(name: &str) -> io::Result<std::fs::File> {
    Ok(rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?.into())
}

/// A child of this process, killed and reaped if dropped before it was waited for.
struct ChildGuard {
    pidfd: Option<OwnedFd>,
}

impl ChildGuard {
    fn new(pid: u32) -> io::Result<Self> {
        let pid = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or(io::ErrorKind::InvalidInput)?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK)?;
        Ok(Self { pidfd: Some(pidfd) })
    }

    /// Waits for the exit (the pidfd turns readable) and reaps it.
    async fn wait(mut self) -> io::Result<rustix::process::WaitIdStatus> {
        // A duplicate is registered: the guard keeps its own until the child is reaped, so a
        // wait given up on (the future dropped) still kills and reaps it.
        let pidfd = self
            .pidfd
            .as_ref()
            .ok_or(io::ErrorKind::InvalidInput)?
            .try_clone()?;
        // SAFETY: the AsyncFd owns the pidfd, so it stays open and unchanged while registered.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        }?;
        loop {
            let mut ready = fd.readable().await?;
            match rustix::process::waitid(
                rustix::process::WaitId::PidFd(fd.get_ref().as_fd()),
                rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
            ) {
                Ok(Some(status)) => {
                    self.pidfd = None;
                    return Ok(status);
                }
                Ok(None) => ready.clear_ready(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd.take() {
            let _ignored =
                rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            // Reaped off the caller's thread: a killed process exits promptly, but not
            // necessarily before this returns.
            std::thread::spawn(move || reap(&pidfd));
        }
    }
}

/// A connected SEQPACKET pair, close-on-exec: (metald's end, whose reads give up after
/// `timeout`; the child's end).
pub(crate) fn socket_pair(timeout: Duration) -> io::Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_socket_timeout(
        &ours,
        rustix::net::sockopt::Timeout::Recv,
        Some(timeout),
    )?;
    Ok((ours, theirs))
}

/// Waits for the exit of the child behind `pidfd` (non-blocking: it waits for the pidfd to
/// turn readable first) and reaps it.
pub(crate) fn reap(pidfd: &OwnedFd) {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let _ignored = rustix::event::poll(&mut fds, None);
    let _ignored = rustix::process::waitid(
        rustix::process::WaitId::PidFd(pidfd.as_fd()),
        rustix::process::WaitIdOptions::EXITED,
    );
}

/// metald's end: [`SPAWNERS`] spawner processes, each started on first use and again after it
/// failed, each serving one request at a time.
#[derive(Debug)]
pub struct Spawner {
    exe: PathBuf,
    conns: [Mutex<Option<Conn>>; SPAWNERS],
}

/// Spawner processes per [`Spawner`]: a boot starts its jail and its `nft` at the same moment,
/// and neither should wait for the other's fork and exec.
pub const SPAWNERS: usize = 2;

#[derive(Debug)]
struct Conn {
    sock: OwnedFd,
    child: Child,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closing the socket ends it too; the kill does not wait for it to notice.
        let _ignored = self.child.kill();
        let _ignored = self.child.wait();
    }
}

/// Spawners of the same binary are alike (what runs, and whether it runs now, is not
/// configuration).
impl PartialEq for Spawner {
    fn eq(&self, other: &Self) -> bool {
        self.exe == other.exe
    }
}

impl Eq for Spawner {}

impl Spawner {
    /// A spawner run as `exe spawner` (the `metald-jail` binary).
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            conns: [const { Mutex::new(None) }; SPAWNERS],
        }
    }

    /// Starts `req` as a child of the calling process; its pid, once it exec'd. Blocks for
    /// the exchange (a fork and an exec, about a millisecond).
    pub fn spawn(
        &self,
        req: &SpawnRequest,
        stdin: Option<BorrowedFd<'_>>,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
    ) -> Result<u32, SpawnError> {
        let msg = serde_json::to_vec(req).map_err(|e| self.broken(e.into()))?;
        if msg.len() > MAX_REQUEST {
            return Err(SpawnError::TooLarge(msg.len()));
        }
        // The first idle one, or else the first.
        let free = self.conns.iter().find_map(|c| match c.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        });
        let mut conn = match free {
            Some(g) => g,
            None => self
                .conns
                .first()
                .ok_or_else(|| self.broken(io::ErrorKind::NotConnected.into()))?
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        };
        if conn.is_none() {
            *conn = Some(self.start().map_err(|e| self.broken(e))?);
        }
        let fds: Vec<BorrowedFd<'_>> = stdin.into_iter().chain([stdout, stderr]).collect();
        let reply = match conn.as_ref().map(|c| exchange(&c.sock, &msg, &fds)) {
            Some(Ok(reply)) => reply,
            Some(Err(e)) => {
                // Dead, or out of step with us: the next request starts a new one.
                *conn = None;
                return Err(self.broken(e));
            }
            None => return Err(self.broken(io::ErrorKind::NotConnected.into())),
        };
        drop(conn);
        match reply {
            Reply::Started { pid } => Ok(pid),
            Reply::Failed { pid, step, errno } => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    // Our child (CLONE_PARENT), already exiting: reaped here, not left a zombie.
                    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                        let _ignored = rustix::process::waitpid(
                            Some(pid),
                            rustix::process::WaitOptions::empty(),
                        );
                    }
                }
                Err(SpawnError::Child {
                    step,
                    program: req.program.clone(),
                    source: io::Error::from_raw_os_error(errno),
                })
            }
        }
    }

    /// Runs `req` to its end with `input` on its stdin: whether it exited with status 0, and
    /// what it wrote to stdout and stderr (the first [`MAX_OUTPUT`] bytes). Dropping the
    /// future kills it.
    pub async fn run(&self, req: &SpawnRequest, input: &[u8]) -> Result<Output, SpawnError> {
        let io_err = |source: io::Error| SpawnError::Child {
            step: "run".into(),
            program: req.program.clone(),
            source,
        };
        use std::io::{Read, Seek, Write};
        let mut stdin = memfd("spawn-stdin").map_err(io_err)?;
        stdin
            .write_all(input)
            .and_then(|()| stdin.rewind())
            .map_err(io_err)?;
        let mut output = memfd("spawn-output").map_err(io_err)?;
        let pid = self.spawn(req, Some(stdin.as_fd()), output.as_fd(), output.as_fd())?;
        let status = ChildGuard::new(pid)
            .map_err(io_err)?
            .wait()
            .await
            .map_err(io_err)?;
        // Grown to what was written (usually nothing): a buffer of MAX_OUTPUT on every run
        // (one per boot) left metald's heap about 15 KiB larger per running VM.
        let mut buf = Vec::new();
        output
            .rewind()
            .and_then(|()| (&output).take(MAX_OUTPUT as u64).read_to_end(&mut buf))
            .map_err(io_err)?;
        Ok(Output {
            success: status.exit_status() == Some(0),
            output: String::from_utf8_lossy(&buf).into_owned(),
        })
    }

    /// The pids of the spawner processes running now.
    pub fn pids(&self) -> Vec<u32> {
        self.conns
            .iter()
            .filter_map(|c| {
                c.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .as_ref()
                    .map(|c| c.child.id())
            })
            .collect()
    }

    fn broken(&self, source: io::Error) -> SpawnError {
        SpawnError::Spawner {
            exe: self.exe.clone(),
            source,
        }
    }

    fn start(&self) -> io::Result<Conn> {
        let (ours, theirs) = socket_pair(REPLY_TIMEOUT)?;
        // Its socket is its stdin; no environment (every request brings its own).
        let child = Command::new(&self.exe)
            .arg("spawner")
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Conn { sock: ours, child })
    }
}

/// Sends one request with its descriptors ([stdin,] stdout, stderr) and reads the answer.
fn exchange(sock: &OwnedFd, msg: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<Reply> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(msg)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    let mut buf = [0u8; 1024];
    let (n, _) = rustix::net::recv(sock, &mut buf, RecvFlags::empty())?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    serde_json::from_slice(buf.get(..n).unwrap_or_default()).map_err(io::Error::from)
}

/// The spawner's loop (`metald-jail spawner`, its socket on stdin): one request at a time
/// until metald closes the socket or dies.
pub fn serve() -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    // Nothing inherited beyond stdio (a parent's descriptors left open, such as a jobserver's
    // pipe, would otherwise reach every child).
    // SAFETY: close_range only closes descriptors; this single-threaded process holds none
    // above 2 that it needs.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd 0 is the socket metald gave as stdin; nothing else in this process owns it.
    let sock: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(0) };
    let null = std::fs::File::open("/dev/null")?;
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &sock,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let got = match got {
            Ok(got) => got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if got.bytes == 0 {
            return Ok(());
        }
        let fds: Vec<OwnedFd> = control
            .drain()
            .filter_map(|m| match m {
                RecvAncillaryMessage::ScmRights(fds) => Some(fds.collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect();
        let request = buf.get(..got.bytes).unwrap_or_default();
        let reply = match (
            got.flags.contains(ReturnFlags::TRUNC) || got.flags.contains(ReturnFlags::CTRUNC),
            fds.as_slice(),
            serde_json::from_slice::<SpawnRequest>(request),
        ) {
            (false, [out, err], Ok(req)) => start(&req, null.as_fd(), out.as_fd(), err.as_fd()),
            (false, [input, out, err], Ok(req)) => {
                start(&req, input.as_fd(), out.as_fd(), err.as_fd())
            }
            _ => Reply::Failed {
                pid: None,
                step: "read the request".into(),
                errno: libc::EINVAL,
            },
        };
        drop(fds);
        let reply = serde_json::to_vec(&reply).map_err(io::Error::from)?;
        rustix::net::send(&sock, &reply, SendFlags::NOSIGNAL)?;
    }
}

/// The steps of a child before its exec, by number (what it reports on failure).
const STEPS: [&str; 7] = [
    "stdin",
    "stdout",
    "stderr",
    "error pipe",
    "close descriptors",
    "process group",
    "chdir",
];

/// Forks a child of metald (this process's parent) that execs `req`.
fn start(
    req: &SpawnRequest,
    input: BorrowedFd<'_>,
    out: BorrowedFd<'_>,
    err: BorrowedFd<'_>,
) -> Reply {
    let failed = |step: &str, errno: i32| Reply::Failed {
        pid: None,
        step: step.into(),
        errno,
    };
    // Everything the child needs is made here: after the fork it only makes system calls.
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| libc::EINVAL);
    let prepared = (|| {
        let program = cstr(req.program.as_os_str().as_bytes())?;
        let mut argv = vec![program.clone()];
        for a in &req.args {
            argv.push(cstr(a.as_bytes())?);
        }
        let mut envp = Vec::with_capacity(req.env.len());
        for (k, v) in &req.env {
            envp.push(cstr(format!("{k}={v}").as_bytes())?);
        }
        let cwd = cstr(req.cwd.as_os_str().as_bytes())?;
        Ok::<_, i32>((program, argv, envp, cwd))
    })();
    let (program, argv, envp, cwd) = match prepared {
        Ok(p) => p,
        Err(errno) => return failed("read the request", errno),
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    let (pipe_r, pipe_w) = match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
        Ok(p) => p,
        Err(e) => return failed("error pipe", e.raw_os_error()),
    };
    let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: a fork (no CLONE_VM, the child runs on its own copy of this stack) of this
    // single-threaded process; the child below only makes system calls and never returns.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid == 0 {
        // SAFETY: the child: every pointer is into memory prepared above, copied by the fork.
        unsafe {
            child(
                input.as_raw_fd(),
                out.as_raw_fd(),
                err.as_raw_fd(),
                pipe_w.as_raw_fd(),
                &program,
                &argv_ptrs,
                &envp_ptrs,
                &cwd,
            )
        }
    }
    drop(pipe_w);
    if pid < 0 {
        return failed(
            "fork",
            io::Error::last_os_error().raw_os_error().unwrap_or(0),
        );
    }
    let pid = u32::try_from(pid).unwrap_or(0);
    // The write end closes at the exec (close-on-exec) or the child's exit: 8 bytes if a step
    // failed, none if the exec succeeded.
    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        match rustix::io::read(&pipe_r, report.get_mut(got..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    if got < report.len() {
        return Reply::Started { pid };
    }
    let [s0, s1, s2, s3, e0, e1, e2, e3] = report;
    let step = u32::from_ne_bytes([s0, s1, s2, s3]) as usize;
    Reply::Failed {
        pid: Some(pid),
        step: STEPS.get(step).copied().unwrap_or("exec").to_string(),
        errno: i32::from_ne_bytes([e0, e1, e2, e3]),
    }
}

/// The forked child: stdio, a descriptor table of those three and the error pipe, its own
/// process group, default signal handling, the working directory, and the exec. On failure
/// it writes the step and errno to the pipe and exits.
///
/// # Safety
/// Only in the child of the fork in [`start`], with NUL-terminated pointer arrays.
#[allow(clippy::too_many_arguments)]
unsafe fn child(
    input: i32,
    out: i32,
    err: i32,
    pipe_w: i32,
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    cwd: &CString,
) -> ! {
    // SAFETY: raw system calls on descriptors and NUL-terminated strings the caller prepared;
    // this process is a fresh fork with no other thread.
    unsafe {
        let fail = |step: u32, pipe: i32| -> ! {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            let (s, e) = msg.split_at_mut(4);
            s.copy_from_slice(&step.to_ne_bytes());
            e.copy_from_slice(&errno.to_ne_bytes());
            libc::write(pipe, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        };
        // Every descriptor received is above 2 (0 is the socket, 1 and 2 the spawner's own).
        if libc::dup2(input, 0) < 0 {
            fail(0, pipe_w)
        }
        if libc::dup2(out, 1) < 0 {
            fail(1, pipe_w)
        }
        if libc::dup2(err, 2) < 0 {
            fail(2, pipe_w)
        }
        let mut pipe = pipe_w;
        if pipe != 3 {
            if libc::dup3(pipe_w, 3, libc::O_CLOEXEC) < 0 {
                fail(3, pipe_w)
            }
            pipe = 3;
        }
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) < 0 {
            fail(4, pipe)
        }
        if libc::setpgid(0, 0) < 0 {
            fail(5, pipe)
        }
        // Rust ignores SIGPIPE, and an ignored signal stays ignored across an exec.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if libc::chdir(cwd.as_ptr()) < 0 {
            fail(6, pipe)
        }
        libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(7, pipe)
    }
}
