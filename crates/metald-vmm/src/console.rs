//! A VM's serial console as metald reads it: tails for callers and error messages, and the
//! readiness line a guest prints.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use rustix::fs::{FileType, Mode, OFlags};

use super::{files, BackendError};

/// Opens, for reading, a file in a VM's directory, which the VMM (running as the VM's uid, and
/// possibly taken over by its guest) can write: without following a symlink it may have put
/// there, and only if it is a regular file, since a FIFO would block the reader and a device
/// such as `/dev/zero` would never end. The directory itself is looked up without following a
/// symlink either; its parent belongs to metald.
pub fn open_vm_file(path: &Path) -> io::Result<File> {
    open_vm_file_as(path, OFlags::RDONLY)
}

/// Connects to a Unix socket in a VM's directory (the VMM's API or QMP socket) without
/// following a symlink the VMM may have put in its place: pointed at another VM's socket, it
/// would send metald's pause or Ctrl-Alt-Del to that VM. The path is opened `O_PATH |
/// O_NOFOLLOW`, must be a socket, and is connected through `/proc/self/fd/N`, which names
/// exactly that inode.
pub async fn connect_vm_socket(path: &Path) -> io::Result<tokio::net::UnixStream> {
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let stat = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Socket {
        return Err(io::Error::other("not a socket"));
    }
    use std::os::fd::AsRawFd;
    let stream = tokio::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd())).await;
    drop(fd);
    stream
}

/// [`open_vm_file`] with `access` (`RDONLY` or `RDWR`).
fn open_vm_file_as(path: &Path, access: OFlags) -> io::Result<File> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    crate::vm_dir::VmDir::open_io(dir)?
        .open_typed(name, access, Mode::empty(), FileType::RegularFile)
        .map(File::from)
}

/// Keeps the console log in the VM directory `dir` under `max` bytes: once it is larger, its
/// oldest part is cut so that about half of `max` is left. Returns the bytes dropped.
///
/// The VMM appends to the file (O_APPEND), so cutting the head in place keeps its writes going
/// to the new end: `FALLOC_FL_COLLAPSE_RANGE` does that atomically on ext4 and XFS. Where the
/// filesystem cannot (tmpfs, ...), the tail is copied to the front and the file truncated; a
/// line written between the copy and the truncation is lost, and counted as dropped.
pub fn cap(dir: &Path, max: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let file = match open_vm_file_as(&dir.join(files::CONSOLE_LOG), OFlags::RDWR) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let stat = rustix::fs::fstat(&file)?;
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    if size <= max {
        return Ok(0);
    }
    let block = u64::try_from(stat.st_blksize).unwrap_or(4096).max(1);
    let cut = (size - max / 2) / block * block;
    if cut == 0 {
        return Ok(0);
    }
    let collapse = rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::COLLAPSE_RANGE, 0, cut);
    match collapse {
        Ok(()) => Ok(cut),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::INVAL => {
            let keep = max / 2;
            let mut tail = vec![0u8; usize::try_from(keep).unwrap_or(0)];
            let n = file.read_at(&mut tail, size - keep)?;
            file.write_all_at(&tail[..n], 0)?;
            let now = rustix::fs::fstat(&file)?;
            let before = u64::try_from(now.st_size).unwrap_or(size);
            file.set_len(n as u64)?;
            Ok(before - n as u64)
        }
        Err(e) => Err(e.into()),
    }
}

/// The tail of a console log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleTail {
    /// The text.
    pub output: String,
    /// Size of the whole log.
    pub total_bytes: u64,
    /// Only part of the log was returned.
    pub truncated: bool,
    /// Bytes cut from the log's head to keep it under its cap (set by the service).
    pub dropped_bytes: u64,
}

/// The last `max` bytes of the console log in the VM directory `dir`; empty when there is none.
pub fn tail(dir: &Path, max: u64) -> Result<ConsoleTail, BackendError> {
    let path = dir.join(files::CONSOLE_LOG);
    let mut file = match open_vm_file(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ConsoleTail {
                output: String::new(),
                total_bytes: 0,
                truncated: false,
                dropped_bytes: 0,
            })
        }
        Err(source) => {
            return Err(BackendError::Io {
                op: "open",
                path,
                source,
            })
        }
    };
    let io = |op| {
        let path = path.clone();
        move |source| BackendError::Io { op, path, source }
    };
    let total = file.metadata().map_err(io("stat"))?.len();
    let start = total.saturating_sub(max);
    file.seek(SeekFrom::Start(start)).map_err(io("seek"))?;
    let mut buf = Vec::with_capacity((total - start) as usize);
    file.take(max).read_to_end(&mut buf).map_err(io("read"))?;
    Ok(ConsoleTail {
        output: String::from_utf8_lossy(&buf).into_owned(),
        total_bytes: total,
        truncated: start > 0,
        dropped_bytes: 0,
    })
}

/// The file's size (0 when it does not exist yet): where new console output will start.
pub fn file_len(path: &Path) -> u64 {
    open_vm_file(path)
        .and_then(|f| f.metadata())
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Polls `path` from `offset` until `marker` appears (checks every 50 ms; reads only new bytes).
pub async fn wait_for_line(path: &Path, mut offset: u64, marker: &[u8]) {
    let mut window: Vec<u8> = Vec::new();
    loop {
        if let Ok(mut f) = open_vm_file(path) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let mut new = Vec::new();
                if let Ok(n) = f.read_to_end(&mut new) {
                    offset += n as u64;
                    window.extend_from_slice(&new);
                    if window.windows(marker.len()).any(|w| w == marker) {
                        return;
                    }
                    // Keep just enough to catch a marker split across two reads.
                    let keep = marker.len().saturating_sub(1);
                    if window.len() > keep {
                        window.drain(..window.len() - keep);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `max` bytes of a file, lossily as text (for error messages).
pub fn file_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = open_vm_file(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ignored = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ignored = f.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills `dir`'s console log with numbered lines (`size` bytes), as an appending VMM would.
    fn flood(dir: &Path, size: usize) -> Vec<u8> {
        let mut text = Vec::with_capacity(size);
        let mut n = 0u64;
        while text.len() < size {
            text.extend_from_slice(format!("line {n:09}\n").as_bytes());
            n += 1;
        }
        std::fs::write(dir.join(files::CONSOLE_LOG), &text).unwrap();
        text
    }

    fn check_cap(dir: &Path) {
        let text = flood(dir, 3 << 20);
        let cut = cap(dir, 1 << 20).unwrap();
        let left = std::fs::read(dir.join(files::CONSOLE_LOG)).unwrap();
        assert!(left.len() as u64 <= 1 << 20, "{}", left.len());
        assert_eq!(cut + left.len() as u64, text.len() as u64);
        assert!(text.ends_with(&left), "the newest output is kept");
        // Under the cap nothing happens; appending goes on at the new end.
        assert_eq!(cap(dir, 1 << 20).unwrap(), 0);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(files::CONSOLE_LOG))
            .unwrap();
        std::io::Write::write_all(&mut f, b"after\n").unwrap();
        let now = std::fs::read(dir.join(files::CONSOLE_LOG)).unwrap();
        assert_eq!(now.len(), left.len() + 6);
        assert!(now.ends_with(b"after\n"));
    }

    #[tokio::test]
    async fn vm_sockets_are_connected_only_if_they_are_sockets_not_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("other-vm.sock");
        let _listener = tokio::net::UnixListener::bind(&real).unwrap();
        connect_vm_socket(&real).await.unwrap();
        let link = dir.path().join("control.sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(connect_vm_socket(&link).await.is_err());
        let file = dir.path().join("api.sock");
        std::fs::write(&file, b"").unwrap();
        assert!(connect_vm_socket(&file).await.is_err());
    }

    #[test]
    fn a_console_over_its_cap_keeps_its_newest_output() {
        let disk = tempfile::tempdir().unwrap();
        check_cap(disk.path());
        // tmpfs has no COLLAPSE_RANGE: the copying fallback.
        if Path::new("/dev/shm").is_dir() {
            let shm = tempfile::tempdir_in("/dev/shm").unwrap();
            check_cap(shm.path());
        }
        // A console log the VMM replaced with a symlink is not followed.
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("host-file");
        std::fs::write(&target, vec![b'x'; 2 << 20]).unwrap();
        let vm = d.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        std::os::unix::fs::symlink(&target, vm.join(files::CONSOLE_LOG)).unwrap();
        assert!(cap(&vm, 1 << 20).is_err());
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 2 << 20);
    }

    #[test]
    fn a_console_replaced_by_a_symlink_a_fifo_or_a_device_is_never_read() {
        let root = tempfile::tempdir().unwrap();
        let secret = root.path().join("host-secret");
        std::fs::write(&secret, "root-only host data").unwrap();
        let vm = root.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        let console = vm.join(files::CONSOLE_LOG);

        std::os::unix::fs::symlink(&secret, &console).unwrap();
        assert!(tail(&vm, 1024).is_err());
        assert_eq!(file_tail(&console, 1024), "");
        assert_eq!(file_len(&console), 0);

        // A FIFO would block a reader that opened it; this one is refused at once.
        std::fs::remove_file(&console).unwrap();
        rustix::fs::mkfifoat(rustix::fs::CWD, &console, Mode::from_raw_mode(0o600)).unwrap();
        assert!(tail(&vm, 1024).is_err());

        std::fs::remove_file(&console).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &console).unwrap();
        assert!(tail(&vm, 1024).is_err());

        // A regular console is read, its tail only.
        std::fs::remove_file(&console).unwrap();
        std::fs::write(&console, "boot\nMETALD_GUEST_READY\n").unwrap();
        let t = tail(&vm, 19).unwrap();
        assert_eq!(t.output, "METALD_GUEST_READY\n");
        assert_eq!((t.total_bytes, t.truncated), (24, true));

        // The VM directory itself is not followed through a symlink either.
        let link = root.path().join("vm-link");
        std::os::unix::fs::symlink(&vm, &link).unwrap();
        assert!(tail(&link, 1024).is_err());
    }
}
