//! Persistent network namespaces, each bind-mounted on a file (as `ip netns add` does), so a
//! VM's namespace outlives the process that made it and can be entered by path.
//!
//! Namespaces are per thread: creating one moves the calling thread into it. That is done on a
//! dedicated OS thread that exits right after, never on a tokio worker.

use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::{mount_bind, unmount, UnmountFlags};
use rustix::thread::UnshareFlags;

/// Pins the namespace file `source` (a `/proc/.../ns/...` file or another pin) on `at`, a new
/// empty file; on failure `at` is removed again.
fn pin(source: &Path, at: &Path) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(at)?;
    if let Err(e) = mount_bind(source, at) {
        let _ignored = std::fs::remove_file(at);
        return Err(e.into());
    }
    Ok(())
}

/// Creates a new network namespace without IPv6 on its interfaces and pins it on `path` (a new
/// empty file).
pub fn create(path: &Path) -> io::Result<()> {
    let target = path.to_path_buf();
    std::thread::Builder::new()
        .name("metald-netns".into())
        .spawn(move || -> io::Result<()> {
            // SAFETY: NEWNET only changes this thread's network namespace; no file descriptor
            // table is unshared, so no fd is hidden from other threads.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNET) }?;
            // A VM's namespace only bridges frames between its veth end and the TAP: without
            // IPv6 on them, their link-local addresses' duplicate detection, router
            // solicitations and listener reports never cross into metald's namespace, where
            // each would be routed past one multicast route per VM, and never hold the
            // kernel's network lock. `/proc/sys/net` is this thread's namespace's.
            for conf in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")?;
            }
            pin(Path::new("/proc/thread-self/ns/net"), &target)
        })?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Moves a namespace's pin from `from` to the new file `to` (a pinned file cannot be renamed:
/// it is a mount point). The namespace lives on through the new pin.
pub fn repin(from: &Path, to: &Path) -> io::Result<()> {
    pin(from, to)?;
    remove(from)
}

/// Runs `work` on a dedicated OS thread moved into the namespace pinned at `path` (namespaces
/// are per thread; the thread exits right after, so nothing else ever runs in it).
fn inside<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = std::fs::File::open(path)?;
    std::thread::Builder::new()
        .name("metald-netns".into())
        .spawn(move || -> io::Result<T> {
            use std::os::fd::AsFd;
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            work()
        })?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Inside the namespace at `path`: the persistent TAP `tap`, without an owner until the jail
/// gives it to the VM's uid, and the bridge `bridge` joining it to `peer`, all up: what the
/// jail would otherwise make at every start.
pub fn wire(path: &Path, tap: &str, bridge: &str, peer: &str) -> io::Result<()> {
    let (tap, bridge, peer) = (tap.to_string(), bridge.to_string(), peer.to_string());
    inside(path, move || {
        crate::jailer::tap::create_tap(&tap, None)?;
        crate::jailer::tap::bridge(&bridge, &[&tap, &peer])
    })
}

/// Unpins and removes a namespace file (of any kind); the namespace itself goes when its last
/// process does. A missing or never-mounted file is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match unmount(path, UnmountFlags::DETACH) {
        Ok(()) => {}
        // EINVAL: not a mount point; ENOENT: no file.
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The namespace files in `dir` (for the start-up sweep).
pub fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The inode of the network namespace pinned at `path` (compare with `/proc/PID/ns/net`).
pub fn inode(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.ino())
}
