//! A VM's serial console as metald reads it: tails for callers and error messages, and the
//! readiness line a guest prints.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use super::{files, BackendError};

/// The tail of a console log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleTail {
    /// The text.
    pub output: String,
    /// Size of the whole log.
    pub total_bytes: u64,
    /// Only part of the log was returned.
    pub truncated: bool,
}

/// The last `max` bytes of the console log in the VM directory `dir`; empty when there is none.
pub fn tail(dir: &Path, max: u64) -> Result<ConsoleTail, BackendError> {
    let path = dir.join(files::CONSOLE_LOG);
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ConsoleTail {
                output: String::new(),
                total_bytes: 0,
                truncated: false,
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
    })
}

/// The file's size (0 when it does not exist yet): where new console output will start.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Polls `path` from `offset` until `marker` appears (checks every 50 ms; reads only new bytes).
pub async fn wait_for_line(path: &Path, mut offset: u64, marker: &[u8]) {
    let mut window: Vec<u8> = Vec::new();
    loop {
        if let Ok(mut f) = std::fs::File::open(path) {
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
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ignored = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ignored = f.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}
