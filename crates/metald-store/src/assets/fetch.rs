//! Fetching an asset this host lacks. A fleet shares its catalog but not its files: a host
//! that needs an image it has no file of takes it from a source (a directory, a peer host),
//! capped at the catalog's size and time, and keeps it only if its sha256 is the catalog's.
//! The bytes go to a temporary name of their own in the assets directory and are renamed into
//! place once verified, so the final path never holds anything half written or unverified,
//! and two fetches of the same asset at once cannot spoil each other.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{io_err, valid_image_id, AssetError, AssetStore};
use crate::AssetRecord;

/// Where this host gets an asset's file it lacks. What a source sends is not trusted:
/// [`AssetStore::ensure_local`] reads at most the catalog's size, until the deadline, and
/// keeps it only if its sha256 is the catalog's.
pub trait AssetSource: Send + Sync {
    /// What errors call this source ("directory /mnt/assets", "peer host-2").
    fn name(&self) -> String;

    /// The content of `record`, if this source has it (`Ok(None)` if not). A source that waits
    /// on a network gives up at `deadline`, when the whole fetch must be done.
    fn open(&self, record: &AssetRecord, deadline: Instant) -> Result<Option<Fetched>, AssetError>;
}

/// What a source found.
pub struct Fetched {
    /// Where exactly it comes from ("peer host-2", a file), for errors and logs.
    pub from: String,
    /// The bytes, not yet trusted.
    pub content: Box<dyn Read + Send>,
}

/// How long fetching `size_bytes` may take: a minute, plus the time at 8 MiB/s (a slow link;
/// a faster one finishes early).
pub fn fetch_time(size_bytes: u64) -> Duration {
    Duration::from_secs(60 + size_bytes / (8 << 20))
}

/// A directory of asset files named by their sha256 (hex) or by their id, such as an NFS
/// mount the operator fills.
pub struct DirSource {
    dir: PathBuf,
}

impl DirSource {
    /// The source of the files in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
}

impl AssetSource for DirSource {
    fn name(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    fn open(
        &self,
        record: &AssetRecord,
        _deadline: Instant,
    ) -> Result<Option<Fetched>, AssetError> {
        // The content's own name first: an id may have been reused for other content there.
        for name in [&record.sha256, &record.id] {
            // Both are plain names (hex, an image id): never a path out of the directory.
            if !valid_image_id(name) {
                continue;
            }
            let path = self.dir.join(name);
            match fs::metadata(&path) {
                // Only a regular file: opening a FIFO someone left there would wait forever.
                Ok(m) if m.is_file() => {}
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("stat", &path)(e)),
            }
            let file = File::open(&path).map_err(io_err("open", &path))?;
            return Ok(Some(Fetched {
                from: format!("file {}", path.display()),
                content: Box::new(file),
            }));
        }
        Ok(None)
    }
}

/// Makes each fetch's temporary name its own, with the process id.
static FETCHES: AtomicU64 = AtomicU64::new(0);

impl AssetStore {
    /// Sets where [`AssetStore::ensure_local`] fetches a missing file from, tried in order.
    pub fn set_sources(&self, sources: Vec<Arc<dyn AssetSource>>) {
        *self.sources.write().unwrap_or_else(|p| p.into_inner()) = sources;
    }

    /// The path of this host's file of `record`, fetched first from the sources if this host
    /// has none. A source that fails is passed over for the next; what a source sends that is
    /// not the catalog's content is an error naming it, and nothing of it is kept.
    pub fn ensure_local(&self, record: &AssetRecord) -> Result<PathBuf, AssetError> {
        let dest = self.path_of(record);
        if dest.exists() {
            return Ok(dest);
        }
        let sources = self
            .sources
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let deadline = Instant::now() + fetch_time(record.size_bytes);
        let mut failed = None;
        for source in &sources {
            match source.open(record, deadline) {
                Ok(Some(found)) => {
                    self.take(record, &found.from, found.content, deadline)?;
                    return Ok(dest);
                }
                Ok(None) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        Err(failed.unwrap_or_else(|| AssetError::Missing(record.id.clone())))
    }

    /// This host's file of the content with hash `sha256`, and its size, if it has one.
    pub fn local_by_sha256(&self, sha256: &str) -> Result<Option<(PathBuf, u64)>, AssetError> {
        Ok(self
            .store
            .list_assets()?
            .into_iter()
            .filter(|a| a.sha256 == sha256)
            .map(|a| (self.path_of(&a), a.size_bytes))
            .find(|(path, _)| path.is_file()))
    }

    /// Writes what `reader` sends to a temporary file of its own, verifies it and renames it
    /// to `record`'s path; the temporary file is removed if anything fails.
    fn take(
        &self,
        record: &AssetRecord,
        from: &str,
        reader: Box<dyn Read + Send>,
        deadline: Instant,
    ) -> Result<(), AssetError> {
        let n = FETCHES.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            ".{}.fetch-{}-{n}",
            record.file_name,
            std::process::id()
        ));
        let result = (|| {
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            let sha256 = copy_capped(reader, &mut out, &tmp, record, from, deadline)?;
            if sha256 != record.sha256 {
                return Err(AssetError::Corrupt {
                    id: record.id.clone(),
                    from: from.to_string(),
                    recorded: record.sha256.clone(),
                    got: sha256,
                });
            }
            out.sync_data().map_err(io_err("sync", &tmp))?;
            let dest = self.path_of(record);
            fs::rename(&tmp, &dest).map_err(io_err("move into place", &dest))
        })();
        if result.is_err() {
            let _ignored = fs::remove_file(&tmp);
        }
        result
    }
}

/// Copies `reader` to `out` (at `path`), hashing it: at most `record.size_bytes` bytes, until
/// `deadline`; the content's sha256 if it had exactly that size.
fn copy_capped(
    mut reader: Box<dyn Read + Send>,
    out: &mut File,
    path: &Path,
    record: &AssetRecord,
    from: &str,
    deadline: Instant,
) -> Result<String, AssetError> {
    let wrong_size = || AssetError::WrongSize {
        id: record.id.clone(),
        from: from.to_string(),
        size: record.size_bytes,
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        if Instant::now() > deadline {
            return Err(AssetError::TimedOut {
                id: record.id.clone(),
                from: from.to_string(),
            });
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(AssetError::TimedOut {
                    id: record.id.clone(),
                    from: from.to_string(),
                })
            }
            Err(e) => {
                return Err(AssetError::Source {
                    from: from.to_string(),
                    source: Box::new(e),
                })
            }
        };
        total += n as u64;
        // One byte more than recorded is enough to refuse: the rest is never read.
        if total > record.size_bytes {
            return Err(wrong_size());
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err("write", path))?;
    }
    if total != record.size_bytes {
        return Err(wrong_size());
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assets::ImportRequest;
    use crate::{AssetKind, Store};
    use std::sync::Mutex;

    /// Host `a` imported the asset; host `b` shares the catalog and has no file of it.
    struct Fleet {
        dir: tempfile::TempDir,
        b: AssetStore,
        record: AssetRecord,
        source: PathBuf,
    }

    fn fleet(content: &[u8]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(Store::open(&dir.path().join("db")).unwrap());
        let a = AssetStore::open(dir.path().join("a"), catalog.clone()).unwrap();
        let b = AssetStore::open(dir.path().join("b"), catalog).unwrap();
        let file = dir.path().join("original");
        fs::write(&file, content).unwrap();
        let record = a
            .import(&ImportRequest {
                id: "rootfs".into(),
                kind: AssetKind::Rootfs,
                source: file,
                initrd_id: None,
                ready_marker: None,
                owner: None,
            })
            .unwrap();
        let source = dir.path().join("nfs");
        fs::create_dir(&source).unwrap();
        Fleet {
            dir,
            b,
            record,
            source,
        }
    }

    fn from_dir(f: &Fleet) {
        f.b.set_sources(vec![Arc::new(DirSource::new(f.source.clone()))]);
    }

    /// Only the final file of each asset: no temporary file left behind.
    fn files_of(store_dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(store_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_missing_file_comes_from_the_directory_by_sha256_first() {
        let f = fleet(b"disk");
        from_dir(&f);
        fs::write(f.source.join(&f.record.sha256), b"disk").unwrap();
        // Other content under the id: the content's own name wins.
        fs::write(f.source.join("rootfs"), b"old disk").unwrap();
        let path = f.b.ensure_local(&f.record).unwrap();
        assert_eq!(path, f.b.path_of(&f.record));
        assert_eq!(fs::read(&path).unwrap(), b"disk");
        assert_eq!(files_of(&f.dir.path().join("b")), ["rootfs"]);
        // Present now: not fetched again, even with the source gone.
        fs::remove_dir_all(&f.source).unwrap();
        assert_eq!(f.b.ensure_local(&f.record).unwrap(), path);
    }

    #[test]
    fn a_missing_file_comes_from_the_directory_by_id() {
        let f = fleet(b"disk");
        from_dir(&f);
        fs::write(f.source.join("rootfs"), b"disk").unwrap();
        assert_eq!(
            fs::read(f.b.ensure_local(&f.record).unwrap()).unwrap(),
            b"disk"
        );
    }

    #[test]
    fn other_content_is_refused_naming_the_source_and_nothing_is_left() {
        let f = fleet(b"disk");
        from_dir(&f);
        fs::write(f.source.join("rootfs"), b"dusk").unwrap();
        let err = f.b.ensure_local(&f.record).unwrap_err();
        assert!(matches!(err, AssetError::Corrupt { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&f.source.display().to_string()),
            "{err}"
        );
        assert!(files_of(&f.dir.path().join("b")).is_empty());
    }

    #[test]
    fn a_file_of_another_size_is_refused_and_nothing_is_left() {
        let f = fleet(b"disk");
        from_dir(&f);
        fs::write(f.source.join("rootfs"), b"disk and more").unwrap();
        let err = f.b.ensure_local(&f.record).unwrap_err();
        assert!(
            matches!(err, AssetError::WrongSize { size: 4, .. }),
            "{err:?}"
        );
        fs::write(f.source.join("rootfs"), b"dis").unwrap();
        let err = f.b.ensure_local(&f.record).unwrap_err();
        assert!(matches!(err, AssetError::WrongSize { .. }), "{err:?}");
        assert!(files_of(&f.dir.path().join("b")).is_empty());
    }

    #[test]
    fn nothing_anywhere_is_missing() {
        let f = fleet(b"disk");
        from_dir(&f);
        let err = f.b.ensure_local(&f.record).unwrap_err();
        assert!(matches!(err, AssetError::Missing(_)), "{err:?}");
        f.b.set_sources(Vec::new());
        assert!(matches!(
            f.b.ensure_local(&f.record),
            Err(AssetError::Missing(_))
        ));
    }

    /// A source that sends what it is given, and counts the fetches.
    struct Fake {
        content: Option<Vec<u8>>,
        endless: bool,
        opened: Mutex<u32>,
    }

    impl Fake {
        fn new(content: Option<&[u8]>) -> Arc<Self> {
            Arc::new(Self {
                content: content.map(<[u8]>::to_vec),
                endless: false,
                opened: Mutex::new(0),
            })
        }
    }

    impl AssetSource for Fake {
        fn name(&self) -> String {
            "fake".into()
        }

        fn open(
            &self,
            _record: &AssetRecord,
            _deadline: Instant,
        ) -> Result<Option<Fetched>, AssetError> {
            *self.opened.lock().unwrap() += 1;
            let content: Box<dyn Read + Send> = match &self.content {
                _ if self.endless => Box::new(io::repeat(b'x')),
                Some(c) => Box::new(io::Cursor::new(c.clone())),
                None => return Ok(None),
            };
            Ok(Some(Fetched {
                from: self.name(),
                content,
            }))
        }
    }

    #[test]
    fn sources_are_tried_in_order_until_one_has_it() {
        let f = fleet(b"disk");
        let (none, some, later) = (Fake::new(None), Fake::new(Some(b"disk")), Fake::new(None));
        f.b.set_sources(vec![none.clone(), some.clone(), later.clone()]);
        assert_eq!(
            fs::read(f.b.ensure_local(&f.record).unwrap()).unwrap(),
            b"disk"
        );
        assert_eq!(
            [
                none.opened.lock().unwrap(),
                some.opened.lock().unwrap(),
                later.opened.lock().unwrap()
            ]
            .map(|n| *n),
            [1, 1, 0]
        );
    }

    #[test]
    fn an_endless_source_is_cut_at_the_catalogs_size() {
        let f = fleet(b"disk");
        let endless = Arc::new(Fake {
            content: None,
            endless: true,
            opened: Mutex::new(0),
        });
        f.b.set_sources(vec![endless]);
        let err = f.b.ensure_local(&f.record).unwrap_err();
        assert!(matches!(err, AssetError::WrongSize { .. }), "{err:?}");
        assert!(files_of(&f.dir.path().join("b")).is_empty());
    }

    #[test]
    fn fetches_at_once_all_end_with_the_one_verified_file() {
        let content = vec![7u8; 3 << 20];
        let f = fleet(&content);
        f.b.set_sources(vec![Fake::new(Some(&content))]);
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| f.b.ensure_local(&f.record)))
                .collect();
            for r in runs {
                r.join().unwrap().unwrap();
            }
        });
        assert_eq!(fs::read(f.b.path_of(&f.record)).unwrap(), content);
        assert_eq!(files_of(&f.dir.path().join("b")), ["rootfs"]);
    }

    #[test]
    fn local_files_are_found_by_sha256() {
        let f = fleet(b"disk");
        assert_eq!(f.b.local_by_sha256(&f.record.sha256).unwrap(), None);
        from_dir(&f);
        fs::write(f.source.join("rootfs"), b"disk").unwrap();
        let path = f.b.ensure_local(&f.record).unwrap();
        assert_eq!(
            f.b.local_by_sha256(&f.record.sha256).unwrap(),
            Some((path, 4))
        );
        assert_eq!(f.b.local_by_sha256("00").unwrap(), None);
    }
}
