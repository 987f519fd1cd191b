//! What `metald-jail SPEC` does: runs in a fresh single-threaded process (exec'd by metald)
//! and turns itself into the jailed VMM, one step after another, each of which needs the
//! privileges the next one drops. Any failure ends the process with the step's name and the
//! OS error on stderr, which is the VM's VMM log.

use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode};
use rustix::mount::{
    mount, mount_bind, mount_change, mount_remount, unmount, MountFlags, MountPropagationFlags,
    UnmountFlags,
};
use rustix::process::{Resource, Rlimit};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use super::warm::{Assignment, WarmSpec};
use super::{tap, JailSpec, VmmRun};

/// A step of the jail set-up failed.
#[derive(Debug, thiserror::Error)]
#[error("metald-jail: {step}")]
pub struct StepError {
    /// The step.
    pub step: String,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

fn step<T>(name: impl Into<String>, r: io::Result<T>) -> Result<T, StepError> {
    r.map_err(|source| StepError {
        step: name.into(),
        source,
    })
}

/// Builds the jail described by `spec` and execs the VMM in it; returns only on failure.
pub fn run(spec: &JailSpec) -> Result<Infallible, StepError> {
    // 1. Nothing inherited but stdin/stdout/stderr, and no environment.
    clean_start(3)?;
    // 2. The VM's network namespace, and its TAP made inside it.
    if let Some(net) = &spec.net {
        let ns = step(
            format!("open {}", net.netns.display()),
            File::open(&net.netns),
        )?;
        enter_network(
            &ns,
            &net.tap,
            &net.bridge,
            &net.peer_if,
            spec.vmm.uid,
            spec.vmm.gid,
        )?;
        for args in &net.tc {
            run_tool(&net.tc_bin, args)?;
        }
    }
    // 3. Resource limits.
    limits(spec.nofile)?;
    // 4. The VM's cgroup(s).
    join_cgroups(&spec.cgroup_procs)?;
    own_files(&spec.vmm)?;
    // 5. The chroot: a private mount namespace whose root is a small tmpfs holding only the
    // files the VMM needs, bind-mounted at their host paths.
    build_root(spec)?;
    // 6, 7. The VM's own uid/gid, no capabilities, and the VMM.
    exec_vmm(&spec.vmm)
}

/// `metald-jail warm SPEC`: builds the VM-independent part of a jail, says
/// [`super::warm::READY`] on its socket (stdin), waits for its [`Assignment`] and becomes
/// that VM's VMM; returns only on failure, which it also reports on the socket. The end of
/// the socket before an assignment (metald gone or done with it) ends it quietly.
pub fn serve_warm(spec: &WarmSpec) -> Result<Infallible, StepError> {
    clean_start(3)?;
    // The socket moves above stdio, close-on-exec: its end tells metald the VMM exec'd.
    let sock = step(
        "keep the socket",
        // SAFETY: descriptor 0 is the socket the spawner gave as stdin, open for this call.
        rustix::io::fcntl_dupfd_cloexec(unsafe { std::os::fd::BorrowedFd::borrow_raw(0) }, 3)
            .map_err(io::Error::from),
    )?;
    let served = warm(spec, &sock);
    if let Err(e) = &served {
        let _ignored = rustix::net::send(
            &sock,
            crate::report::chain(e).as_bytes(),
            rustix::net::SendFlags::NOSIGNAL,
        );
    }
    served
}

fn warm(spec: &WarmSpec, sock: &OwnedFd) -> Result<Infallible, StepError> {
    let null = step("open /dev/null", File::open("/dev/null"))?;
    redirect(&null, 0, "stdin")?;
    drop(null);
    limits(spec.nofile)?;
    // From the prepared root: the jail's root is made on its JAIL_DIR and moved over it;
    // otherwise made on `root` from the base namespace and pivoted into.
    let (root, from) = match &spec.prepared {
        Some(prepared) => (Path::new(JAIL_DIR), Some(prepared.as_path())),
        None => (spec.root.as_path(), spec.mount_ns.as_deref()),
    };
    new_root(root, from)?;
    bind_all(root, &spec.mounts)?;
    make_devices(root, &spec.devices)?;
    match spec.prepared {
        Some(_) => move_root(root)?,
        None => pivot(root)?,
    }
    step(
        "say ready",
        rustix::net::send(sock, super::warm::READY, rustix::net::SendFlags::NOSIGNAL)
            .map_err(io::Error::from),
    )?;
    let mut buf = vec![0u8; super::warm::MAX_ASSIGNMENT];
    let mut space =
        [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(super::warm::MAX_FDS))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [io::IoSliceMut::new(&mut buf)],
            &mut control,
            rustix::net::RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break step("wait for a VM", other.map_err(io::Error::from))?,
        }
    };
    if got.bytes == 0 {
        // Never given a VM.
        std::process::exit(0);
    }
    let fds: Vec<OwnedFd> = control
        .drain()
        .filter_map(|m| match m {
            rustix::net::RecvAncillaryMessage::ScmRights(fds) => Some(fds.collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    let truncated = got.flags.contains(rustix::net::ReturnFlags::TRUNC)
        || got.flags.contains(rustix::net::ReturnFlags::CTRUNC);
    let assignment = match truncated {
        true => Err(io::Error::from(io::ErrorKind::InvalidData)),
        false => serde_json::from_slice::<Assignment>(buf.get(..got.bytes).unwrap_or_default())
            .map_err(io::Error::from),
    };
    let assignment = step("read the assignment", assignment)?;
    become_vm(&assignment, fds, &spec.devices)
}

/// The VM-specific half of a warm jail (see [`super::warm`]), in the order a cold jail takes.
fn become_vm(
    a: &Assignment,
    fds: Vec<OwnedFd>,
    devices: &[super::JailDevice],
) -> Result<Infallible, StepError> {
    let mut fds = fds.into_iter();
    let mut next = |what: &str| {
        step(
            format!("receive the {what} descriptor"),
            fds.next()
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput)),
        )
    };
    let (out, err) = (next("stdout")?, next("stderr")?);
    redirect(&out, 1, "stdout")?;
    redirect(&err, 2, "stderr")?;
    if let Some(net) = &a.net {
        let ns = File::from(next("network namespace")?);
        enter_network(
            &ns,
            &net.tap,
            &net.bridge,
            &net.peer_if,
            a.vmm.uid,
            a.vmm.gid,
        )?;
    }
    // The VM's cgroup(s): "0" is this process, whose only thread moves (see `join_cgroups`).
    for _ in 0..a.cgroups {
        let file = File::from(next("cgroup")?);
        step(
            "join the VM's cgroup",
            rustix::io::write(&file, b"0")
                .map(drop)
                .map_err(io::Error::from),
        )?;
    }
    for m in &a.mounts {
        let tree = next("mount")?;
        let stat = step(
            format!("stat {}", m.path.display()),
            rustix::fs::fstat(&tree).map_err(io::Error::from),
        )?;
        let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
        mount_point(&m.path, is_dir)?;
        step(
            format!("attach {}", m.path.display()),
            rustix::mount::move_mount(
                &tree,
                "",
                rustix::fs::CWD,
                &m.path,
                rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            )
            .map_err(io::Error::from),
        )?;
        // A clone of a shared mount joins its peer group: private, as a cold jail's binds
        // are, so no mount event crosses between the host and the jail.
        step(
            format!("make {} private", m.path.display()),
            mount_change(&m.path, MountPropagationFlags::PRIVATE).map_err(io::Error::from),
        )?;
        restrict(&m.path, m)?;
    }
    own_devices(Path::new("/"), devices, a.vmm.uid, a.vmm.gid)?;
    own_files(&a.vmm)?;
    seal_root()?;
    exec_vmm(&a.vmm)
}

/// Makes descriptor `to` a copy of `fd`.
fn redirect(fd: &impl AsFd, to: i32, what: &str) -> Result<(), StepError> {
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto a standard descriptor number this process owns; no Rust object holds
    // it as an OwnedFd.
    let r = unsafe { libc::dup2(fd.as_fd().as_raw_fd(), to) };
    step(format!("redirect {what}"), check(libc::c_long::from(r)))
}

/// Closes every inherited descriptor from `first` on and clears the environment.
fn clean_start(first: u32) -> Result<(), StepError> {
    // SAFETY: close_range only closes descriptors; nothing in this single-threaded process holds
    // descriptors from `first` on that it still needs.
    let closed = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    step("close inherited descriptors", check(closed))?;
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    Ok(())
}

/// Enters the network namespace `ns` and makes the VM's TAP in it, bridged to the veth end.
fn enter_network(
    ns: &File,
    tap_name: &str,
    bridge: &str,
    peer_if: &str,
    uid: u32,
    gid: u32,
) -> Result<(), StepError> {
    step(
        "enter the network namespace",
        rustix::thread::move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
            .map_err(io::Error::from),
    )?;
    step(
        format!("create TAP {tap_name}"),
        tap::create_tap(tap_name, Some((uid, gid))),
    )?;
    step(
        format!("bridge {tap_name} and {peer_if}"),
        tap::bridge(bridge, &[tap_name, peer_if]),
    )
}

/// RLIMIT_NOFILE to `nofile`, no core dumps.
fn limits(nofile: u64) -> Result<(), StepError> {
    let nofile = Rlimit {
        current: Some(nofile),
        maximum: Some(nofile),
    };
    step(
        "set RLIMIT_NOFILE",
        rustix::process::setrlimit(Resource::Nofile, nofile).map_err(io::Error::from),
    )?;
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    step(
        "set RLIMIT_CORE",
        rustix::process::setrlimit(Resource::Core, none).map_err(io::Error::from),
    )
}

/// Hands the VM's directory and its files to the VM's uid.
fn own_files(vmm: &VmmRun) -> Result<(), StepError> {
    let (dir, files, uid) = (&vmm.owned_dir, &vmm.owned_files, vmm.uid);
    // The VM's directory and files belong to the VM's uid from here on; the group stays
    // metald's. No setgid bit: metald reads what the VMM makes through CAP_DAC_OVERRIDE, and
    // systemd's RestrictSUIDSGID would refuse the bit anyway.
    let metald_gid = rustix::process::getegid().as_raw();
    own(dir, uid, metald_gid, 0o770, FileType::Directory)?;
    for f in files.iter().filter(|f| f.exists()) {
        own(f, uid, metald_gid, 0o660, FileType::RegularFile)?;
    }
    Ok(())
}

/// Drops to the VM's uid/gid with no capabilities and no way to gain any, and execs the VMM.
fn exec_vmm(vmm: &VmmRun) -> Result<Infallible, StepError> {
    let VmmRun {
        uid,
        gid,
        workdir,
        exec,
        args,
        env,
        ..
    } = vmm;
    let (uid, gid) = (*uid, *gid);
    drop_privileges(uid, gid)?;
    // Files the VMM makes (sockets, logs) stay readable by metald's group, nobody else's.
    rustix::process::umask(Mode::from_raw_mode(0o007));
    step(
        format!("chdir {}", workdir.display()),
        std::env::set_current_dir(workdir),
    )?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exec)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .exec();
    Err(StepError {
        step: format!("exec {}", exec.display()),
        source: err,
    })
}

/// Hands `path` to the VM's uid. After a first boot the VM's directory is the VM's to write:
/// a VMM taken over by its guest may have put a symlink (to a host file) or a FIFO where a
/// disk was. So the file is opened without following a symlink and without blocking, must be
/// of the expected type, and is changed through its fd, never by name.
fn own(path: &Path, uid: u32, gid: u32, mode: u32, kind: FileType) -> Result<(), StepError> {
    use rustix::fs::OFlags;
    let what = |op: &str| format!("{op} {}", path.display());
    let fd = step(
        what("open"),
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from),
    )?;
    let stat = step(
        what("stat"),
        rustix::fs::fstat(&fd).map_err(io::Error::from),
    )?;
    if FileType::from_raw_mode(stat.st_mode) != kind {
        return step(
            what("check the type of"),
            Err(io::Error::other(format!("not a {kind:?}"))),
        );
    }
    // Mode first: once the file belongs to the VM, changing it would need CAP_FOWNER.
    match rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)) {
        // Handed over on an earlier boot: the VM's already, with the mode set then.
        Err(rustix::io::Errno::PERM) if stat.st_uid == uid => {}
        r => step(what("chmod"), r.map_err(io::Error::from))?,
    }
    step(
        what("chown"),
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(io::Error::from),
    )
}

/// Moves this process into the cgroups whose `cgroup.procs` files are given.
///
/// A write of a pid to `cgroup.procs` write-locks the kernel's global threadgroup semaphore,
/// which (unless the hierarchy is mounted with `favordynmods`) waits for an RCU grace period:
/// 7 ms for the five v1 hierarchies on the development machines, on every boot. Since Linux
/// 6.2 a thread moving itself (`0` written to a v1 `tasks` file) skips that lock, and for this
/// single-threaded process moving its only thread moves the process, and everything it
/// execs and forks after. Measured 0.7 ms for the five. v2 has no `tasks` file (and
/// `cgroup.threads` moves threads only within a threaded subtree), so it keeps `cgroup.procs`.
fn join_cgroups(procs_files: &[PathBuf]) -> Result<(), StepError> {
    let single_threaded = step(
        "count this process's threads",
        std::fs::read_dir("/proc/self/task").map(|d| d.count() == 1),
    )?;
    let pid = std::process::id().to_string();
    for procs in procs_files {
        let (file, what) = match tasks_file(procs).filter(|_| single_threaded) {
            Some(tasks) => (tasks, "0"),
            None => (procs.clone(), pid.as_str()),
        };
        step(
            format!("join cgroup {}", file.display()),
            std::fs::write(&file, what),
        )?;
    }
    Ok(())
}

/// The v1 `tasks` file beside a `cgroup.procs` file, where the hierarchy has one: writing `0`
/// there moves the writing thread without the global lock (see `join_cgroups`).
pub(super) fn tasks_file(procs: &Path) -> Option<PathBuf> {
    Some(procs.with_file_name("tasks")).filter(|t| t.exists())
}

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn run_tool(bin: &Path, args: &[String]) -> Result<(), StepError> {
    let name = format!("{} {}", bin.display(), args.join(" "));
    let out = step(
        name.clone(),
        std::process::Command::new(bin).args(args).output(),
    )?;
    if out.status.success() {
        return Ok(());
    }
    Err(StepError {
        step: name,
        source: io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    })
}

fn inside(root: &Path, host_path: &Path) -> PathBuf {
    root.join(host_path.strip_prefix("/").unwrap_or(host_path))
}

fn build_root(spec: &JailSpec) -> Result<(), StepError> {
    let root = &spec.root;
    // In metald's own jail directory for the VM (the VM's uid cannot write there); a reboot's
    // jail finds it made.
    match std::fs::create_dir(root) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        made => step(format!("create {}", root.display()), made)?,
    }
    new_root(root, spec.mount_ns.as_deref())?;
    bind_all(root, &spec.mounts)?;
    make_devices(root, &spec.devices)?;
    own_devices(root, &spec.devices, spec.vmm.uid, spec.vmm.gid)?;
    pivot(root)?;
    seal_root()
}

/// A private mount namespace (from the jails' base one, if given) with a small tmpfs on
/// `root`, the jail's root to be.
pub(super) fn new_root(root: &Path, mount_ns: Option<&Path>) -> Result<(), StepError> {
    // The small base namespace metald made, so the copy below does not hold a mount per VM.
    if let Some(ns) = mount_ns {
        let ns = step(format!("open {}", ns.display()), File::open(ns))?;
        step(
            "enter the jails' base mount namespace",
            rustix::thread::move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Mount))
                .map_err(io::Error::from),
        )?;
    }
    // SAFETY: NEWNS (with the CLONE_FS it implies) only gives this process (or, for the
    // prepared root, this thread of metald's) its own root, cwd and mount table; no file
    // descriptor table is unshared.
    let unshared = unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) };
    step("new mount namespace", unshared.map_err(io::Error::from))?;
    // Nothing mounted here may propagate back to the host.
    step(
        "make mounts private",
        mount_change(
            "/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
        .map_err(io::Error::from),
    )?;
    step(
        format!("mount tmpfs on {}", root.display()),
        mount(
            "tmpfs",
            root,
            "tmpfs",
            MountFlags::NOSUID,
            c"mode=0755,size=1m",
        )
        .map_err(io::Error::from),
    )
}

/// Bind-mounts each of `mounts` at its host path under `root`, restricted.
fn bind_all(root: &Path, mounts: &[super::JailMount]) -> Result<(), StepError> {
    for m in mounts {
        let target = inside(root, &m.path);
        mount_point(&target, m.path.is_dir())?;
        step(
            format!("bind {}", m.path.display()),
            mount_bind(&m.path, &target).map_err(io::Error::from),
        )?;
        restrict(&target, m)?;
    }
    Ok(())
}

/// Makes the empty directory or file a mount goes on.
fn mount_point(target: &Path, is_dir: bool) -> Result<(), StepError> {
    let made = if is_dir {
        std::fs::create_dir_all(target)
    } else {
        target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| File::create(target).map(drop))
    };
    step(format!("create mount point {}", target.display()), made)
}

/// Makes the mount at `target` nosuid, nodev, and read-only unless `m` is writable.
fn restrict(target: &Path, m: &super::JailMount) -> Result<(), StepError> {
    let mut flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV;
    if !m.writable {
        flags |= MountFlags::RDONLY;
    }
    step(
        format!("restrict {}", m.path.display()),
        mount_remount(target, flags, "").map_err(io::Error::from),
    )
}

/// Makes the device nodes under `root` (owned by this process until [`own_devices`]).
pub(super) fn make_devices(root: &Path, devices: &[super::JailDevice]) -> Result<(), StepError> {
    let dev = root.join("dev");
    step("create /dev", std::fs::create_dir_all(&dev))?;
    for d in devices {
        let target = inside(root, &d.path);
        if let Some(parent) = target.parent() {
            step(
                format!("create {}", parent.display()),
                std::fs::create_dir_all(parent),
            )?;
        }
        step(
            format!("mknod {}", d.path.display()),
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &target,
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o600),
                rustix::fs::makedev(d.major, d.minor),
            )
            .map_err(io::Error::from),
        )?;
    }
    Ok(())
}

/// Hands the device nodes under `root` to the VM's uid.
fn own_devices(
    root: &Path,
    devices: &[super::JailDevice],
    uid: u32,
    gid: u32,
) -> Result<(), StepError> {
    for d in devices {
        step(
            format!("chown {}", d.path.display()),
            rustix::fs::chown(
                inside(root, &d.path),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(io::Error::from),
        )?;
    }
    Ok(())
}

/// Makes `root` this process's root, with no path back to the host's file system.
pub(super) fn pivot(root: &Path) -> Result<(), StepError> {
    step(
        format!("chdir {}", root.display()),
        std::env::set_current_dir(root),
    )?;
    // pivot_root(".", "."): the old root ends up stacked on the new one and is then detached,
    // leaving no path back to the host's file system.
    step(
        "pivot_root",
        rustix::process::pivot_root(".", ".").map_err(io::Error::from),
    )?;
    step(
        "detach the host root",
        unmount(".", UnmountFlags::DETACH).map_err(io::Error::from),
    )?;
    step("chdir /", std::env::set_current_dir("/"))
}

/// Makes `root`, a mount in a copy of the prepared root (see [`super::mntns::PreparedRoot`]),
/// this process's root: moved over `/`, then `chroot` into it. Unlike `pivot_root`, neither
/// walks the host's threads. Beneath it lies only the prepared root, no host path.
fn move_root(root: &Path) -> Result<(), StepError> {
    step(
        format!("chdir {}", root.display()),
        std::env::set_current_dir(root),
    )?;
    step(
        "move the jail's root over /",
        rustix::mount::mount_move(".", "/").map_err(io::Error::from),
    )?;
    step(
        "chroot",
        rustix::process::chroot(".").map_err(io::Error::from),
    )?;
    step("chdir /", std::env::set_current_dir("/"))
}

/// Where a warm jail mounts its own root in the prepared root.
pub const JAIL_DIR: &str = "/.jail";

/// Builds the prepared root (see [`super::mntns::PreparedRoot`]) on `dir` and makes it this
/// thread's root and mount namespace: `mounts` bound read-only at their host paths, an empty
/// [`JAIL_DIR`], and no path back to the host.
pub(super) fn prepare_root(dir: &Path, mounts: &[super::JailMount]) -> Result<(), StepError> {
    new_root(dir, None)?;
    bind_all(dir, mounts)?;
    step(
        format!("create {JAIL_DIR}"),
        std::fs::create_dir(inside(dir, Path::new(JAIL_DIR))),
    )?;
    pivot(dir)?;
    seal_root()
}

/// Makes the jail's root (not the mounts on it) read-only.
fn seal_root() -> Result<(), StepError> {
    step(
        "make the jail root read-only",
        mount_remount("/", MountFlags::RDONLY | MountFlags::NOSUID, "").map_err(io::Error::from),
    )
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), StepError> {
    use caps::{CapSet, Capability};
    // The bounding set can only shrink while CAP_SETPCAP is effective; without it (metald
    // runs without that capability) no_new_privs below closes the same door.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            let _ignored = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    let gid_ = rustix::fs::Gid::from_raw(gid);
    let uid_ = rustix::fs::Uid::from_raw(uid);
    step(
        "setgroups",
        rustix::thread::set_thread_groups(&[]).map_err(io::Error::from),
    )?;
    step(
        format!("setresgid {gid}"),
        rustix::thread::set_thread_res_gid(gid_, gid_, gid_).map_err(io::Error::from),
    )?;
    step(
        format!("setresuid {uid}"),
        rustix::thread::set_thread_res_uid(uid_, uid_, uid_).map_err(io::Error::from),
    )?;
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        step(
            format!("clear {set:?} capabilities"),
            caps::clear(None, set).map_err(|e| io::Error::other(e.to_string())),
        )?;
    }
    step(
        "set no_new_privs",
        rustix::thread::set_no_new_privs(true).map_err(io::Error::from),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handing_over_never_follows_what_a_vmm_put_in_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let host_file = dir.path().join("shadow");
        std::fs::write(&host_file, "root secrets").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let vm = dir.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        // A symlinked disk: refused, and the host file keeps its mode (and owner).
        let disk = vm.join("rootfs.img");
        std::os::unix::fs::symlink(&host_file, &disk).unwrap();
        let err = own(&disk, 4_000_000, 0, 0o660, FileType::RegularFile).unwrap_err();
        assert!(err.to_string().contains("open"), "{err}");
        let meta = std::fs::metadata(&host_file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // A FIFO where a disk was: refused at once, not waited on.
        let fifo = vm.join("drive-data.img");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let err = own(&fifo, 4_000_000, 0, 0o660, FileType::RegularFile).unwrap_err();
        assert!(err.to_string().contains("check the type"), "{err}");
        // A directory where a file is expected, and the reverse.
        assert!(own(&vm, 4_000_000, 0, 0o770, FileType::RegularFile).is_err());
        assert!(own(&host_file, 4_000_000, 0, 0o770, FileType::Directory).is_err());
    }
}
