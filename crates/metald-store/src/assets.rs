//! The local asset store: kernels, initrds and disk images by `image_id`, under
//! `<data dir>/assets/`, with their kind, size and sha256 in the catalog ([`AssetCatalog`]).
//!
//! VMs get their own writable disks as reflinks where the filesystem supports them (btrfs, xfs)
//! and as sparse copies elsewhere, so a mostly empty image costs only its used blocks.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

mod fetch;
pub use fetch::{fetch_time, AssetSource, DirSource, Fetched};

use crate::domain::now_ms;
use crate::{AssetCatalog, AssetKind, AssetRecord, StoreError};

/// Errors from the asset store.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// No asset has this id.
    #[error("unknown image id '{0}'")]
    Unknown(String),
    /// The asset exists but is of another kind.
    #[error("image '{id}' is a {actual} image, not a {wanted} image")]
    WrongKind {
        /// The id.
        id: String,
        /// Its kind.
        actual: &'static str,
        /// What was needed.
        wanted: &'static str,
    },
    /// The id is not acceptable.
    #[error("'{0}' is not a valid image id (1-128 of a-z A-Z 0-9 . _ -, not starting with '.')")]
    BadId(String),
    /// An asset with this id exists.
    #[error("image id '{0}' already exists")]
    Exists(String),
    /// The catalog (a fleet's, shared) has this id for other content.
    #[error("image id '{id}' is recorded with other content (sha256 {recorded}) than this file's ({offered})")]
    Differs {
        /// The id.
        id: String,
        /// The recorded content's hash.
        recorded: String,
        /// The offered file's hash.
        offered: String,
    },
    /// The asset is still needed.
    #[error("image '{id}' is used by {users}")]
    InUse {
        /// The id.
        id: String,
        /// Who uses it.
        users: String,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The catalog failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This host has no file of the asset, and no source has it either.
    #[error("image '{0}' is not on this host, and no asset source has it")]
    Missing(String),
    /// A source sent other content than the catalog records.
    #[error("image '{id}' from {from} has sha256 {got}, not the catalog's {recorded}")]
    Corrupt {
        /// The id.
        id: String,
        /// The source.
        from: String,
        /// The catalog's hash.
        recorded: String,
        /// The hash of what the source sent.
        got: String,
    },
    /// A source sent more or fewer bytes than the catalog records.
    #[error("image '{id}' from {from} is not the catalog's {size} bytes")]
    WrongSize {
        /// The id.
        id: String,
        /// The source.
        from: String,
        /// The catalog's size.
        size: u64,
    },
    /// A source took longer than a fetch of this size may.
    #[error("fetching image '{id}' from {from} took too long")]
    TimedOut {
        /// The id.
        id: String,
        /// The source.
        from: String,
    },
    /// A source failed (a peer could not be reached, say).
    #[error("asset source {from}")]
    Source {
        /// The source.
        from: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AssetError + 'a {
    move |source| AssetError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// Id callers will use.
    pub id: String,
    /// Kind of file.
    pub kind: AssetKind,
    /// Source file.
    pub source: PathBuf,
    /// For kernels: an initrd asset booted with it.
    pub initrd_id: Option<String>,
    /// For root filesystems: the console line that proves the guest is up.
    pub ready_marker: Option<String>,
    /// The one customer who may use it; `None`: public.
    pub owner: Option<String>,
}

/// The files a VM boots from, resolved from its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd, when the kernel asset names one.
    pub initrd: Option<PathBuf>,
    /// Readiness marker of the root filesystem, when it declares one.
    pub ready_marker: Option<String>,
}

/// The asset store.
pub struct AssetStore {
    dir: PathBuf,
    // Only the catalog: the file store works the same over any store implementation.
    store: Arc<dyn AssetCatalog>,
    // Where a missing file is fetched from, in order; set once the daemon knows its peers.
    sources: RwLock<Vec<Arc<dyn AssetSource>>>,
}

impl AssetStore {
    /// Opens the store rooted at `dir` (created if missing), with its catalog in `store`.
    pub fn open(dir: PathBuf, store: Arc<dyn AssetCatalog>) -> Result<Self, AssetError> {
        fs::create_dir_all(&dir).map_err(io_err("create asset dir", &dir))?;
        Ok(Self {
            dir,
            store,
            sources: RwLock::new(Vec::new()),
        })
    }

    /// Copies a file into the store and records it.
    pub fn import(&self, req: &ImportRequest) -> Result<AssetRecord, AssetError> {
        if !valid_image_id(&req.id) {
            return Err(AssetError::BadId(req.id.clone()));
        }
        if let Some(known) = self.store.get_asset(&req.id)? {
            // A fleet shares its catalog: another host imported it. This host takes its own
            // copy of the same content; different content under the same id is refused.
            if self.path_of(&known).exists() {
                return Err(AssetError::Exists(req.id.clone()));
            }
            return self.place_copy(&known, &req.source).map(|()| known);
        }
        if let Some(initrd) = &req.initrd_id {
            // A kernel boots with its initrd for whoever may boot the kernel.
            let initrd = self.get_kind(initrd, AssetKind::Initrd)?;
            if initrd.owner.is_some() && initrd.owner != req.owner {
                return Err(AssetError::Unknown(initrd.id));
            }
        }
        let file_name = req.id.clone();
        let dest = self.dir.join(&file_name);
        let tmp = self.dir.join(format!(".{file_name}.importing"));
        let result = (|| {
            clone_file(&req.source, &tmp)?;
            let (size_bytes, sha256) = hash_file(&tmp)?;
            fs::rename(&tmp, &dest).map_err(io_err("move into place", &dest))?;
            let record = AssetRecord {
                id: req.id.clone(),
                kind: req.kind,
                file_name,
                size_bytes,
                sha256,
                initrd_id: req.initrd_id.clone(),
                ready_marker: req.ready_marker.clone(),
                created_at_ms: now_ms(),
                owner: req.owner.clone(),
            };
            self.store.insert_asset(&record)?;
            Ok(record)
        })();
        if result.is_err() {
            // Leave nothing behind from a failed import.
            let _ignored = fs::remove_file(&tmp);
            let _ignored = fs::remove_file(&dest);
        }
        result
    }

    /// Puts this host's copy of the recorded asset `known` in place from `source`, if its
    /// content is the recorded one; nothing is left behind otherwise.
    pub fn place_copy(&self, known: &AssetRecord, source: &Path) -> Result<(), AssetError> {
        let dest = self.path_of(known);
        let tmp = self.dir.join(format!(".{}.importing", known.file_name));
        let result = (|| {
            clone_file(source, &tmp)?;
            let (_, sha256) = hash_file(&tmp)?;
            if sha256 != known.sha256 {
                return Err(AssetError::Differs {
                    id: known.id.clone(),
                    recorded: known.sha256.clone(),
                    offered: sha256,
                });
            }
            fs::rename(&tmp, &dest).map_err(io_err("move into place", &dest))
        })();
        if result.is_err() {
            let _ignored = fs::remove_file(&tmp);
        }
        result
    }

    /// The catalog.
    pub fn list(&self) -> Result<Vec<AssetRecord>, AssetError> {
        Ok(self.store.list_assets()?)
    }

    /// Removes an asset; `vm_users` lists the VMs and snapshots that still reference it
    /// (refused if any).
    pub fn remove(&self, id: &str, vm_users: &[String]) -> Result<(), AssetError> {
        let record = self
            .store
            .get_asset(id)?
            .ok_or_else(|| AssetError::Unknown(id.to_string()))?;
        let mut users: Vec<String> = vm_users.to_vec();
        users.extend(
            self.store
                .assets_using_initrd(id)?
                .into_iter()
                .map(|k| format!("kernel {k}")),
        );
        if !users.is_empty() {
            return Err(AssetError::InUse {
                id: id.to_string(),
                users: users.join(", "),
            });
        }
        self.store.delete_asset(id)?;
        let path = self.dir.join(&record.file_name);
        fs::remove_file(&path).map_err(io_err("remove", &path))?;
        Ok(())
    }

    /// An asset of the given kind, or a clear error.
    pub fn get_kind(&self, id: &str, kind: AssetKind) -> Result<AssetRecord, AssetError> {
        let record = self
            .store
            .get_asset(id)?
            .ok_or_else(|| AssetError::Unknown(id.to_string()))?;
        if record.kind != kind {
            return Err(AssetError::WrongKind {
                id: id.to_string(),
                actual: record.kind.as_str(),
                wanted: kind.as_str(),
            });
        }
        Ok(record)
    }

    /// An asset of the given kind that `customer` may use: a public one or their own.
    /// Another customer's asset is [`AssetError::Unknown`], exactly like an id never imported,
    /// whatever its kind.
    pub fn get_for(
        &self,
        customer: &str,
        id: &str,
        kind: AssetKind,
    ) -> Result<AssetRecord, AssetError> {
        let visible = self
            .store
            .get_asset(id)?
            .is_some_and(|a| a.owner.as_deref().is_none_or(|o| o == customer));
        if !visible {
            return Err(AssetError::Unknown(id.to_string()));
        }
        self.get_kind(id, kind)
    }

    /// Path of an asset's file.
    pub fn path_of(&self, record: &AssetRecord) -> PathBuf {
        self.dir.join(&record.file_name)
    }

    /// Resolves the kernel, its initrd and the root filesystem's readiness marker.
    pub fn boot_files(&self, kernel_id: &str, rootfs_id: &str) -> Result<BootFiles, AssetError> {
        let kernel = self.get_kind(kernel_id, AssetKind::Kernel)?;
        let initrd = match &kernel.initrd_id {
            Some(id) => Some(self.path_of(&self.get_kind(id, AssetKind::Initrd)?)),
            None => None,
        };
        let rootfs = self.get_kind(rootfs_id, AssetKind::Rootfs)?;
        Ok(BootFiles {
            kernel: self.path_of(&kernel),
            initrd,
            ready_marker: rootfs.ready_marker,
        })
    }
}

/// True for ids that are safe as file names and pleasant in URLs.
pub fn valid_image_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn hash_file(path: &Path) -> Result<(u64, String), AssetError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// How a disk copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// Shared extents, copy-on-write (FICLONE).
    Reflink,
    /// Only the data ranges copied; holes stay holes.
    Sparse,
}

/// Copies `src` to a new file `dst` as cheaply as the filesystem allows, on stable storage
/// when it returns.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneMethod, AssetError> {
    let input = File::open(src).map_err(io_err("open", src))?;
    clone_open_file(&input, src, dst)
}

/// [`clone_file`] from a file already open (`src` names it in errors): for a source opened
/// without following links, in a directory someone else can write.
pub fn clone_open_file(input: &File, src: &Path, dst: &Path) -> Result<CloneMethod, AssetError> {
    let (method, output) = clone_open_file_unsynced(input, src, dst)?;
    if let Err(e) = output.sync_data() {
        let _ignored = fs::remove_file(dst);
        return Err(io_err("sync", dst)(e));
    }
    Ok(method)
}

/// [`clone_file`] without waiting for stable storage: the copy is complete for every reader
/// (the page cache is shared) but may not survive a host crash until the returned file is
/// synced (`File::sync_data`). For copies made on a latency path that sync them later.
pub fn clone_file_unsynced(src: &Path, dst: &Path) -> Result<(CloneMethod, File), AssetError> {
    let input = File::open(src).map_err(io_err("open", src))?;
    clone_open_file_unsynced(&input, src, dst)
}

fn clone_open_file_unsynced(
    input: &File,
    src: &Path,
    dst: &Path,
) -> Result<(CloneMethod, File), AssetError> {
    let output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err("create", dst))?;
    let result = if rustix::fs::ioctl_ficlone(&output, input).is_ok() {
        Ok(CloneMethod::Reflink)
    } else {
        sparse_copy(input, &output, src, dst).map(|()| CloneMethod::Sparse)
    };
    match result {
        Ok(method) => Ok((method, output)),
        Err(e) => {
            let _ignored = fs::remove_file(dst);
            Err(e)
        }
    }
}

/// Copies only the data ranges of `input` (SEEK_DATA/SEEK_HOLE), so holes cost nothing.
fn sparse_copy(input: &File, output: &File, src: &Path, dst: &Path) -> Result<(), AssetError> {
    use rustix::fs::{seek, SeekFrom};
    let len = input.metadata().map_err(io_err("stat", src))?.len();
    output.set_len(len).map_err(io_err("size", dst))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(input, SeekFrom::Data(pos)) {
            Ok(off) => off,
            // ENXIO: no data after `pos`; the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io_err("seek data", src)(e.into())),
        };
        let hole = seek(input, SeekFrom::Hole(data))
            .map_err(|e| io_err("seek hole", src)(e.into()))?
            .min(len);
        let mut off = data;
        while off < hole {
            let want = usize::try_from(hole - off)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            // In the kernel where it can (no copy through this process); read and write
            // where it cannot (across file systems on old kernels, or file systems without it).
            let (mut from, mut to) = (off, off);
            match rustix::fs::copy_file_range(input, Some(&mut from), output, Some(&mut to), want) {
                Ok(0) => break,
                Ok(n) => {
                    off += n as u64;
                    continue;
                }
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::OPNOTSUPP,
                ) => {}
                Err(e) => return Err(io_err("copy", dst)(e.into())),
            }
            let n = input
                .read_at(&mut buf[..want], off)
                .map_err(io_err("read", src))?;
            if n == 0 {
                break;
            }
            output
                .write_all_at(&buf[..n], off)
                .map_err(io_err("write", dst))?;
            off += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use std::io::{Seek, Write};

    fn stores() -> (tempfile::TempDir, AssetStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("db")).unwrap());
        let assets = AssetStore::open(dir.path().join("assets"), store).unwrap();
        (dir, assets)
    }

    #[test]
    fn hosts_sharing_a_catalog_each_take_a_copy_of_the_same_content_only() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(Store::open(&dir.path().join("db")).unwrap());
        let a = AssetStore::open(dir.path().join("a"), catalog.clone()).unwrap();
        let b = AssetStore::open(dir.path().join("b"), catalog).unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let req = |source: PathBuf| ImportRequest {
            id: "rootfs".into(),
            kind: AssetKind::Rootfs,
            source,
            initrd_id: None,
            ready_marker: None,
            owner: None,
        };
        let recorded = a.import(&req(file("one", "disk"))).unwrap();
        assert!(matches!(
            b.import(&req(file("other", "not the disk"))),
            Err(AssetError::Differs { .. })
        ));
        assert!(
            !b.path_of(&recorded).exists(),
            "nothing left of a refused copy"
        );
        assert_eq!(b.import(&req(file("same", "disk"))).unwrap(), recorded);
        assert_eq!(std::fs::read(b.path_of(&recorded)).unwrap(), b"disk");
        assert!(matches!(
            b.import(&req(file("again", "disk"))),
            Err(AssetError::Exists(_))
        ));
        assert_eq!(a.list().unwrap().len(), 1);
    }

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(io::SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let dst = dir.path().join("dst.img");
        clone_file(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            blocks < 4 << 20,
            "copy used {blocks} bytes for 8 bytes of data"
        );
        assert!(clone_file(&src, &dst).is_err(), "never overwrites");
    }

    /// A customer's asset is theirs alone: to anyone else it is an unknown id, whatever kind
    /// they ask for; public assets are everyone's; a kernel cannot borrow another's initrd.
    #[test]
    fn a_customers_asset_is_unknown_to_everyone_else() {
        let (dir, assets) = stores();
        let file = dir.path().join("f");
        fs::write(&file, b"abc").unwrap();
        let req = |id: &str, kind, initrd: Option<&str>, owner: Option<&str>| ImportRequest {
            id: id.into(),
            kind,
            source: file.clone(),
            initrd_id: initrd.map(String::from),
            ready_marker: None,
            owner: owner.map(String::from),
        };
        assets
            .import(&req("mine", AssetKind::Rootfs, None, Some("acme")))
            .unwrap();
        assets
            .import(&req("shared", AssetKind::Rootfs, None, None))
            .unwrap();
        assert!(assets.get_for("acme", "mine", AssetKind::Rootfs).is_ok());
        for kind in [AssetKind::Rootfs, AssetKind::Kernel] {
            let theirs = assets.get_for("bolt", "mine", kind).unwrap_err();
            let missing = assets.get_for("bolt", "never", kind).unwrap_err();
            assert_eq!(
                theirs.to_string().replace("mine", "X"),
                missing.to_string().replace("never", "X")
            );
        }
        assert!(assets.get_for("bolt", "shared", AssetKind::Rootfs).is_ok());
        assets
            .import(&req("ird", AssetKind::Initrd, None, Some("acme")))
            .unwrap();
        assert!(matches!(
            assets.import(&req("k", AssetKind::Kernel, Some("ird"), Some("bolt"))),
            Err(AssetError::Unknown(_))
        ));
        assert!(matches!(
            assets.import(&req("k", AssetKind::Kernel, Some("ird"), None)),
            Err(AssetError::Unknown(_))
        ));
        assets
            .import(&req("k", AssetKind::Kernel, Some("ird"), Some("acme")))
            .unwrap();
    }

    #[test]
    fn import_list_resolve_remove() {
        let (dir, assets) = stores();
        let file = dir.path().join("f");
        fs::write(&file, b"abc").unwrap();
        let req = |id: &str, kind, initrd: Option<&str>| ImportRequest {
            id: id.into(),
            kind,
            source: file.clone(),
            initrd_id: initrd.map(String::from),
            ready_marker: Some("READY".into()),
            owner: None,
        };
        assets.import(&req("ird", AssetKind::Initrd, None)).unwrap();
        let k = assets
            .import(&req("k", AssetKind::Kernel, Some("ird")))
            .unwrap();
        assert_eq!(k.size_bytes, 3);
        assert_eq!(
            k.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assets.import(&req("r", AssetKind::Rootfs, None)).unwrap();
        assert!(matches!(
            assets.import(&req("r", AssetKind::Rootfs, None)),
            Err(AssetError::Exists(_))
        ));
        assert!(matches!(
            assets.import(&req("../x", AssetKind::Rootfs, None)),
            Err(AssetError::BadId(_))
        ));
        let files = assets.boot_files("k", "r").unwrap();
        assert!(files.initrd.unwrap().ends_with("ird"));
        assert_eq!(files.ready_marker.as_deref(), Some("READY"));
        let err = assets.boot_files("r", "r").unwrap_err();
        assert_eq!(
            err.to_string(),
            "image 'r' is a rootfs image, not a kernel image"
        );
        let err = assets.boot_files("nope", "r").unwrap_err();
        assert_eq!(err.to_string(), "unknown image id 'nope'");
        assert!(matches!(
            assets.remove("ird", &[]),
            Err(AssetError::InUse { .. })
        ));
        assert!(matches!(
            assets.remove("r", &["vm-1".into()]),
            Err(AssetError::InUse { .. })
        ));
        assets.remove("k", &[]).unwrap();
        assets.remove("ird", &[]).unwrap();
        assert_eq!(assets.list().unwrap().len(), 1);
    }
}
