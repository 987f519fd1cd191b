//! Telling a changed file from the one last read, for files metald re-reads when an operator
//! (or SPIRE) replaces them: the quota file and the TLS certificate files.

use std::path::Path;

/// What tells a changed file from the one last read: inode (a rename-over is a new one even
/// within one mtime tick), size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file at `path` now (following a symlink, as readers of it do).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Self {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}
