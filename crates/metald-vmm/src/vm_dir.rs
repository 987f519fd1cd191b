//! A VM's directory as a backend writes to it. The VMM runs as the VM's uid and owns the
//! directory (a guest that takes it over does too), so any name in it may have been replaced
//! by a symlink, a FIFO or a device since metald last looked. Every operation here is relative
//! to the directory's fd, opened without following a symlink, and never follows the last
//! component either; files are checked for their type through the fd they were opened as, and
//! changed (owner) only through it.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::BackendError;

/// An open VM directory.
pub struct VmDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl VmDir {
    /// Opens the VM directory `path` (its parent belongs to metald; the directory itself must
    /// not be a symlink).
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        Self::open_io(path).map_err(|e| io_error("open", path, e))
    }

    /// [`VmDir::open`], with the OS error as it came.
    pub(crate) fn open_io(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    fn error(&self, op: &'static str, name: &str, source: io::Error) -> BackendError {
        io_error(op, &self.path.join(name), source)
    }

    /// Opens `name` with `flags` (never following a symlink, non-blocking, so a FIFO cannot
    /// hold the open) and `mode` for a file it creates; anything but a `want` is refused.
    pub(crate) fn open_typed(
        &self,
        name: &str,
        flags: OFlags,
        mode: Mode,
        want: FileType,
    ) -> io::Result<OwnedFd> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            mode,
        )?;
        let stat = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(stat.st_mode) != want {
            return Err(io::Error::other(match want {
                FileType::Fifo => "not a FIFO",
                _ => "not a regular file",
            }));
        }
        Ok(fd)
    }

    /// Opens `name` for appending, creating it if missing (mode 0640): a log the VMM's stdout
    /// or stderr goes to. Anything but a regular file is refused.
    pub fn append(&self, name: &str) -> Result<File, BackendError> {
        let fd = self
            .open_typed(
                name,
                OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE,
                Mode::from_raw_mode(0o640),
                FileType::RegularFile,
            )
            .map_err(|e| self.error("open", name, e))?;
        // Back to blocking: the VMM inherits this description as its stdout or stderr.
        rustix::fs::fcntl_setfl(&fd, OFlags::APPEND)
            .map_err(|e| self.error("open", name, e.into()))?;
        Ok(File::from(fd))
    }

    /// [`VmDir::append`], after replacing whatever else than a regular file has the name (a
    /// symlink, FIFO or device the VMM left there) with a new, empty file: a VMM cannot stop
    /// its VM's next boot that way, and what it put there is never written through.
    pub fn append_replacing(&self, name: &str) -> Result<File, BackendError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile => {
                tracing::warn!(path = %self.path.join(name).display(), "replacing what the VMM put in place of its log");
                self.remove(name)?;
            }
            _ => {}
        }
        self.append(name)
    }

    /// Whether `name` is a regular file holding nothing (never through a symlink).
    pub fn is_empty_file(&self, name: &str) -> bool {
        rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
            FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && st.st_size == 0
        })
    }

    /// Creates `name`, which must not exist yet, for writing (mode 0600, metald's): a file a
    /// VMM is handed by descriptor, never by path.
    pub fn create_new(&self, name: &str) -> Result<File, BackendError> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| self.error("create", name, e.into()))?;
        Ok(File::from(fd))
    }

    /// Opens `name` for reading: a regular file only, never through a symlink.
    pub fn open_read(&self, name: &str) -> Result<File, BackendError> {
        let fd = self
            .open_typed(name, OFlags::RDONLY, Mode::empty(), FileType::RegularFile)
            .map_err(|e| self.error("open", name, e))?;
        rustix::fs::fcntl_setfl(&fd, OFlags::empty())
            .map_err(|e| self.error("open", name, e.into()))?;
        Ok(File::from(fd))
    }

    /// Removes `name` (a symlink is removed itself, never its target); a missing one is fine.
    pub fn remove(&self, name: &str) -> Result<(), BackendError> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(self.error("remove", name, e.into())),
        }
    }

    /// Renames `from` to `to` inside the directory (symlinks are renamed, not followed); a
    /// missing `from` is fine.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), BackendError> {
        match rustix::fs::renameat(&self.fd, from, &self.fd, to) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(self.error("rename", from, e.into())),
        }
    }

    /// Makes a new FIFO `name` (whatever had that name is removed first), opens its read end
    /// non-blocking, and gives it to `owner` (the jailed VMM's uid, which opens the write
    /// end) through that fd.
    pub fn fifo_receiver(&self, name: &str, owner: Option<u32>) -> Result<OwnedFd, BackendError> {
        self.remove(name)?;
        rustix::fs::mknodat(
            &self.fd,
            name,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .map_err(|e| self.error("create FIFO", name, e.into()))?;
        let fd = self
            .open_typed(name, OFlags::RDONLY, Mode::empty(), FileType::Fifo)
            .map_err(|e| self.error("open FIFO", name, e))?;
        if let Some(uid) = owner {
            rustix::fs::fchown(&fd, Some(rustix::fs::Uid::from_raw(uid)), None)
                .map_err(|e| self.error("chown FIFO", name, e.into()))?;
        }
        Ok(fd)
    }
}

/// Copies the regular file `name` of `dir` (never through a symlink) to the new file `dst`
/// (mode 0644, metald's, in a directory of metald's); returns the bytes copied. What the VMM
/// wrote can be no larger than what it could already put in its own directory.
pub fn copy_out(dir: &VmDir, name: &str, dst: &Path) -> Result<u64, BackendError> {
    let mut input = dir.open_read(name)?;
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dst)
        .map_err(|e| io_error("create", dst, e))?;
    std::io::copy(&mut input, &mut output).map_err(|e| io_error("copy", dst, e))
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> BackendError {
    BackendError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// What a VMM that took over its directory could leave at the names metald writes: a
    /// symlink to a host file, a FIFO, a device. None is followed, opened or written through.
    #[tokio::test]
    async fn nothing_a_vmm_put_in_its_directory_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        let host = dir.path().join("host-file");
        std::fs::write(&host, "secret").unwrap();
        std::os::unix::fs::symlink(&host, vm.join("vmm.log")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", vm.join("console.log")).unwrap();
        let d = VmDir::open(&vm).unwrap();
        assert!(d.append("vmm.log").is_err());
        assert!(d.append("console.log").is_err());
        rustix::fs::mknodat(
            rustix::fs::CWD,
            vm.join("fifo.log"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(d.append("fifo.log").is_err(), "a FIFO is no log");
        // Only a regular file of its own counts as an empty log, never a link to one.
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        std::os::unix::fs::symlink(dir.path().join("empty"), vm.join("empty-link")).unwrap();
        std::fs::write(vm.join("empty.log"), b"").unwrap();
        assert!(d.is_empty_file("empty.log"));
        for not in ["vmm.log", "empty-link", "fifo.log", "never-there"] {
            assert!(!d.is_empty_file(not), "{not}");
        }
        std::fs::write(vm.join("empty.log"), b"x").unwrap();
        assert!(!d.is_empty_file("empty.log"));
        // Where a log is due, what was put there is replaced by a new file.
        for name in ["vmm.log", "fifo.log"] {
            std::os::unix::fs::symlink(&host, vm.join("link.log")).unwrap();
            d.append_replacing("link.log")
                .unwrap()
                .write_all(b"x")
                .unwrap();
            d.append_replacing(name).unwrap();
            assert!(std::fs::symlink_metadata(vm.join(name)).unwrap().is_file());
            d.remove("link.log").unwrap();
        }
        // Renaming and removing act on the links themselves.
        std::os::unix::fs::symlink(&host, vm.join("vmm.log")).ok();
        d.rename("vmm.log", "vmm.old").unwrap();
        d.remove("vmm.old").unwrap();
        d.remove("never-there").unwrap();
        assert_eq!(std::fs::read_to_string(&host).unwrap(), "secret");
        // A symlinked FIFO name is replaced by a real FIFO, not followed.
        std::os::unix::fs::symlink(&host, vm.join("metrics.fifo")).unwrap();
        let _rx = d.fifo_receiver("metrics.fifo", None).unwrap();
        let meta = std::fs::symlink_metadata(vm.join("metrics.fifo")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
        assert_eq!(std::fs::read_to_string(&host).unwrap(), "secret");
        // The directory itself is not followed either.
        std::os::unix::fs::symlink(dir.path(), dir.path().join("vm-link")).unwrap();
        assert!(VmDir::open(&dir.path().join("vm-link")).is_err());
        // A real log is appended to, and the fd is blocking again for the VMM.
        let mut log = d.append("real.log").unwrap();
        log.write_all(b"line\n").unwrap();
        let flags = rustix::fs::fcntl_getfl(&log).unwrap();
        assert!(!flags.contains(OFlags::NONBLOCK) && flags.contains(OFlags::APPEND));
        assert_eq!(
            std::fs::read_to_string(vm.join("real.log")).unwrap(),
            "line\n"
        );
    }
}
