//! Mount namespaces metald holds for its jails to start from: the base namespace every jail
//! copies, and the prepared root warm jails copy.
//!
//! A parked thread of metald lives in each, and jails enter it through that thread's
//! `/proc/<pid>/task/<tid>/ns/mnt`, instead of through a bind mount of the namespace on a file:
//! the kernel refuses (EINVAL) to bind a mount namespace file unless that namespace is newer
//! than the caller's, and since Linux 6.18 namespace ids come from per-CPU batches, so a
//! namespace made on one CPU may be "older" than metald's own made earlier on another. Under
//! a parent that gave metald a mount namespace of its own (a container, a test harness, a
//! unit with `PrivateTmp`), the pin then failed on about one start in two, and every jail
//! silently copied metald's whole table.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;

use super::JailMount;
use crate::report::Chain;

/// A mount namespace held by a parked thread of metald until released or dropped.
#[derive(Debug)]
pub(super) struct HeldMountNs {
    /// Where jails open it.
    pub(super) path: PathBuf,
    /// Dropped to end the thread, and with it the namespace (unless a jail is still entering
    /// it; a jail holds its own copy once made).
    release: Mutex<Option<Sender<()>>>,
}

impl HeldMountNs {
    /// Runs `setup` on a new thread named `name`, which then waits in the namespace `setup`
    /// left it in until [`HeldMountNs::release`].
    fn make(
        name: &str,
        setup: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> io::Result<Self> {
        let (made_tx, made_rx) = channel::<io::Result<i32>>();
        let (release_tx, release_rx) = channel::<()>();
        // Namespaces are per thread: the new one is made on a thread of its own, which holds
        // it until released (a closed channel) and then ends.
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let made = setup().map(|()| rustix::thread::gettid().as_raw_nonzero().get());
                let holds = made.is_ok();
                let _ = made_tx.send(made);
                if holds {
                    let _released = release_rx.recv();
                }
            })?;
        let tid = made_rx
            .recv()
            .map_err(|_| io::Error::other("its thread ended"))??;
        Ok(Self {
            path: PathBuf::from(format!("/proc/{}/task/{tid}/ns/mnt", std::process::id())),
            release: Mutex::new(Some(release_tx)),
        })
    }

    /// Ends the thread holding the namespace (at a clean stop).
    pub(super) fn release(&self) {
        self.release
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// The mount namespace every jail starts from: a copy of metald's, private, without the
/// network namespace pins (nsfs mounts). Each jail's `unshare(CLONE_NEWNS)` copies the whole
/// mount table it is in, and metald's holds one pin per VM network: about 4 ms more per jail
/// with 1000 of them here, so a boot would cost more the more VMs run (issue 14). It holds the
/// host's mounts of the moment metald started; mounts made later on the host are not in it (a
/// restart takes them in).
pub(super) fn base() -> io::Result<HeldMountNs> {
    HeldMountNs::make("metald-mntns", || {
        // SAFETY: NEWNS (with the CLONE_FS it implies) only gives this thread its own root,
        // cwd and mount table; no file descriptor table is unshared.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }?;
        rustix::mount::mount_change(
            "/",
            rustix::mount::MountPropagationFlags::REC
                | rustix::mount::MountPropagationFlags::PRIVATE,
        )?;
        let mounts = std::fs::read_to_string("/proc/thread-self/mountinfo")?;
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ... - FSTYPE SOURCE SUPER`
        for line in mounts.lines() {
            let fstype = line.split(" - ").nth(1).and_then(|r| r.split(' ').next());
            let point = line.split(' ').nth(4);
            if let (Some("nsfs"), Some(point)) = (fstype, point) {
                let point = point.replace("\\040", " ");
                let _gone =
                    rustix::mount::unmount(point.as_str(), rustix::mount::UnmountFlags::DETACH);
            }
        }
        Ok(())
    })
}

/// Which file a path names, and its last change: a VMM binary replaced or rewritten on the
/// host differs.
type FileId = (u64, u64, i64, i64);

fn identity(mounts: &[JailMount]) -> Vec<Option<FileId>> {
    mounts
        .iter()
        .map(|m| {
            std::fs::metadata(&m.path)
                .ok()
                .map(|md| (md.dev(), md.ino(), md.ctime(), md.ctime_nsec()))
        })
        .collect()
}

/// The warm jails' prepared root: a mount namespace whose root is a read-only tmpfs holding
/// the VMM's binary, libraries and files (bound read-only at their host paths) and the empty
/// [`super::child::JAIL_DIR`], and nothing else of the host.
///
/// A warm jail copies it, mounts its own tmpfs on `JAIL_DIR`, binds the VMM's files into it
/// from the copy, and moves that tmpfs over `/` and `chroot`s into it. It needs no
/// `pivot_root`, whose `chroot_fs_refs` walks every thread on the host under the task list
/// lock, which each new thread on the host (a vCPU of a booting VM) waits for: with it, a warm
/// jail's making grew from 2.6 to 5.4 ms over 1000 boots here; without, 1.6 ms throughout.
/// Beneath the jail's root lies only this namespace's: the VMM's own files.
#[derive(Debug)]
pub(super) struct PreparedRoot {
    ns: HeldMountNs,
    /// The VMM's files as they were bound.
    files: Vec<Option<FileId>>,
}

impl PreparedRoot {
    /// Builds it on `dir` (a host directory, mounted on only in the new namespace).
    pub(super) fn make(dir: &Path, mounts: &[JailMount]) -> io::Result<Self> {
        let files = identity(mounts);
        let (dir, binds) = (dir.to_path_buf(), mounts.to_vec());
        let ns = HeldMountNs::make("metald-jailroot", move || {
            super::child::prepare_root(&dir, &binds)
                .map_err(|e| io::Error::other(Chain(&e).to_string()))
        })?;
        Ok(Self { ns, files })
    }

    /// Where a jail enters it.
    pub(super) fn path(&self) -> &Path {
        &self.ns.path
    }

    /// Whether the VMM's files on the host are still the ones it holds.
    pub(super) fn is_current(&self, mounts: &[JailMount]) -> bool {
        identity(mounts) == self.files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vmm_file_replaced_or_rewritten_on_the_host_is_another_one() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("vmm");
        std::fs::write(&bin, b"one").unwrap();
        let mounts = [JailMount {
            path: bin.clone(),
            writable: false,
        }];
        let first = identity(&mounts);
        assert!(first.iter().all(Option::is_some));
        assert_eq!(identity(&mounts), first, "nothing changed");
        // Renamed over, as package managers install.
        let new = dir.path().join("vmm.new");
        std::fs::write(&new, b"two").unwrap();
        std::fs::rename(&new, &bin).unwrap();
        let second = identity(&mounts);
        assert_ne!(second, first);
        // Rewritten in place: same inode, new change time.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&bin, b"three").unwrap();
        assert_ne!(identity(&mounts), second);
        // Gone is a change too.
        std::fs::remove_file(&bin).unwrap();
        assert_eq!(identity(&mounts), vec![None]);
    }
}
