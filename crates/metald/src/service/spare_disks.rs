//! Spare disk copies: for the few images VMs were last created from, private copies made and
//! synced ahead of creates (`UNKEY_METALD_WARM_DISKS` per image). A create renames one into
//! its VM directory instead of copying the image while its caller waits: the copy's page-cache
//! writes and its new inode (on a file system that scans recently freed inodes to allocate
//! one, like ext4 without a journal, that alone took 5-20 ms near 1000 VMs) move to a refill
//! made once no start is in flight, as the warm networks' and jails' refills are.
//!
//! The spares live in `.spare` in the VMs' directory (same file system: a rename moves one),
//! readable by metald alone; the start-up sweep of VM directories passes over it, as its name
//! is no VM id. The directory is emptied at start and at a clean stop, like the warm pools.
//! Spares are keyed by the image's content (sha256): an image imported again with other
//! content never gets an older copy.

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::report::Chain;
use crate::starts::Stock;

/// The name of the spares' directory in the VMs' directory (no VM id starts with a dot).
pub const SPARE_DIR: &str = ".spare";
/// Most images that keep spares at once; the least recently used one's go first.
pub const MAX_IMAGES: usize = 4;
/// Most spares kept per image (`UNKEY_METALD_WARM_DISKS`).
pub const MAX_PER_IMAGE: usize = 16;

/// What an image to copy is, as the spares know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpareImage {
    /// The image's content hash: spares are its copies.
    pub sha256: String,
    /// Its file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// The spare copies kept ahead of creates.
#[derive(Debug)]
pub struct SpareDisks {
    dir: PathBuf,
    per_image: usize,
    max_bytes: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Images with spares (or being given some), least recently used first.
    images: Vec<Spares>,
    /// The next spare's number (names are never reused within a run).
    next: u64,
    /// Set at a clean stop: no refill adds spares any more.
    closed: bool,
}

#[derive(Debug)]
struct Spares {
    image: SpareImage,
    /// File names in the spares' directory, each a complete, synced copy.
    ready: Vec<String>,
    /// A refill of this image runs.
    refilling: bool,
}

impl SpareDisks {
    /// Spares in `vms_dir`'s [`SPARE_DIR`]: `per_image` per image (0: none), for images up to
    /// `max_bytes`.
    pub fn new(vms_dir: &Path, per_image: usize, max_bytes: u64) -> Self {
        Self {
            dir: vms_dir.join(SPARE_DIR),
            per_image: per_image.min(MAX_PER_IMAGE),
            max_bytes,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Lists of names cannot be left inconsistent by a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `image` gets spares.
    pub fn wanted(&self, image: &SpareImage) -> bool {
        self.per_image > 0 && image.size <= self.max_bytes
    }

    /// At start: removes every spare a stop left (they are not known to be complete) and makes
    /// the directory, metald's alone.
    pub fn sweep(&self) -> std::io::Result<()> {
        self.lock().images.clear();
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if self.per_image == 0 {
            return Ok(());
        }
        fs::DirBuilder::new().mode(0o700).create(&self.dir)
    }

    /// Moves a spare copy of `image` to `dst` (a new VM's disk) and opens it, if there is one;
    /// `None` otherwise (the caller copies the image). Blocking: call off the runtime.
    pub fn take(&self, image: &SpareImage, dst: &Path) -> Option<File> {
        if !self.wanted(image) {
            return None;
        }
        let name = {
            let mut st = self.lock();
            let i = st.images.iter().position(|s| s.image == *image)?;
            // The most recently used image goes last.
            let spares = st.images.remove(i);
            st.images.push(spares);
            st.images.last_mut()?.ready.pop()?
        };
        let spare = self.dir.join(&name);
        // `dst` is in a VM directory metald made for this create, which no VM uid owns yet.
        let moved = fs::rename(&spare, dst).and_then(|()| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dst)
        });
        match moved {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(spare = %spare.display(), error = %Chain(&e), "a spare disk copy could not be taken; copying the image");
                let _gone = fs::remove_file(&spare);
                None
            }
        }
    }

    /// Starts a refill of `image` unless one runs or it has its spares: true when the caller
    /// should run [`SpareDisks::refill`] (on a blocking thread).
    pub fn begin_refill(&self, image: &SpareImage) -> bool {
        if !self.wanted(image) {
            return false;
        }
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        let evicted = match st.images.iter().position(|s| s.image == *image) {
            Some(i) => {
                let s = &mut st.images[i];
                if s.refilling || s.ready.len() >= self.per_image {
                    return false;
                }
                s.refilling = true;
                Vec::new()
            }
            None => {
                st.images.push(Spares {
                    image: image.clone(),
                    ready: Vec::new(),
                    refilling: true,
                });
                let over = st.images.len().saturating_sub(MAX_IMAGES);
                st.images.drain(..over).flat_map(|s| s.ready).collect()
            }
        };
        drop(st);
        self.remove(&evicted);
        true
    }

    /// Makes spares of `image` until it has its number, each once `quiet(stock)` returns (it
    /// waits for a moment without starts, as the image's stock says) and while `room(size)`
    /// says the disk can hold one more. Blocking. Ends the refill [`SpareDisks::begin_refill`]
    /// started.
    pub fn refill(
        &self,
        image: &SpareImage,
        quiet: impl Fn(&dyn Fn() -> Stock),
        room: impl Fn(u64) -> bool,
    ) {
        while let Some(name) = self.next_spare(image) {
            quiet(&|| self.stock(image));
            if !room(image.size) {
                tracing::debug!(sha256 = %image.sha256, "no disk room for a spare disk copy");
                break;
            }
            let tmp = self.dir.join(format!("{name}.part"));
            let made = match crate::assets::clone_file(&image.path, &tmp) {
                Ok(_) => fs::rename(&tmp, self.dir.join(&name)).map_err(|e| Chain(&e).to_string()),
                Err(e) => Err(Chain(&e).to_string()),
            };
            if let Err(e) = made {
                let _gone = fs::remove_file(&tmp);
                tracing::warn!(sha256 = %image.sha256, error = %e, "making a spare disk copy failed; creates copy the image");
                break;
            }
            if !self.add(image, name.clone()) {
                // Evicted or closed meanwhile.
                self.remove(&[name]);
                break;
            }
        }
        let mut st = self.lock();
        if let Some(s) = st.images.iter_mut().find(|s| s.image == *image) {
            s.refilling = false;
        }
    }

    /// How many spares of `image` are ready against their number.
    fn stock(&self, image: &SpareImage) -> Stock {
        let st = self.lock();
        let left = st
            .images
            .iter()
            .find(|s| s.image == *image)
            .map_or(0, |s| s.ready.len());
        Stock::of(left, self.per_image)
    }

    /// The next spare's name; `None` when the image has its number (or is gone, or the spares
    /// are closed).
    fn next_spare(&self, image: &SpareImage) -> Option<String> {
        let mut st = self.lock();
        if st.closed {
            return None;
        }
        let n = st.next;
        let s = st.images.iter().find(|s| s.image == *image)?;
        if s.ready.len() >= self.per_image {
            return None;
        }
        st.next += 1;
        let short = image.sha256.get(..16).unwrap_or(&image.sha256);
        Some(format!("{short}-{n}.img"))
    }

    fn add(&self, image: &SpareImage, name: String) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        match st.images.iter_mut().find(|s| s.image == *image) {
            Some(s) => {
                s.ready.push(name);
                true
            }
            None => false,
        }
    }

    /// How many spares are ready, all images together.
    pub fn ready(&self) -> usize {
        self.lock().images.iter().map(|s| s.ready.len()).sum()
    }

    /// At a clean stop (after the refills ended): removes every spare.
    pub fn close(&self) {
        let names: Vec<String> = {
            let mut st = self.lock();
            st.closed = true;
            st.images.drain(..).flat_map(|s| s.ready).collect()
        };
        self.remove(&names);
    }

    fn remove(&self, names: &[String]) {
        for name in names {
            let path = self.dir.join(name);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(spare = %path.display(), error = %Chain(&e), "removing a spare disk copy failed; the next start sweeps it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, name: &str, content: &[u8]) -> SpareImage {
        let path = dir.join(name);
        fs::write(&path, content).unwrap();
        SpareImage {
            sha256: format!("{name:0>64}"),
            path,
            size: content.len() as u64,
        }
    }

    fn spares_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join(SPARE_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_create_takes_a_synced_copy_and_the_refill_makes_another() {
        let tmp = tempfile::tempdir().unwrap();
        let spares = SpareDisks::new(tmp.path(), 2, 1 << 20);
        spares.sweep().unwrap();
        let img = image(tmp.path(), "a", b"image a");
        let vm = tmp.path().join("vm-1");
        fs::create_dir(&vm).unwrap();
        // Nothing yet: the first create copies.
        assert!(spares.take(&img, &vm.join("rootfs.img")).is_none());
        assert!(spares.begin_refill(&img));
        // One refill at a time.
        assert!(!spares.begin_refill(&img));
        let stocks = Mutex::new(Vec::new());
        spares.refill(&img, |stock| stocks.lock().unwrap().push(stock()), |_| true);
        // Each copy waited as its stock said: none ready of two, then one.
        assert_eq!(stocks.into_inner().unwrap(), [Stock::Empty, Stock::Low]);
        assert_eq!(spares.ready(), 2);
        assert_eq!(spares_in(tmp.path()).len(), 2);
        let dst = vm.join("rootfs.img");
        let file = spares.take(&img, &dst).expect("a spare");
        drop(file);
        assert_eq!(fs::read(&dst).unwrap(), b"image a");
        assert_eq!(spares.ready(), 1);
        assert_eq!(spares_in(tmp.path()).len(), 1);
        // Taken spares are written by their VM without touching the image or other spares.
        fs::write(&dst, b"guest wrote").unwrap();
        let dst2 = vm.join("drive.img");
        spares.take(&img, &dst2).expect("the second spare");
        assert_eq!(fs::read(&dst2).unwrap(), b"image a");
        assert_eq!(fs::read(&img.path).unwrap(), b"image a");
        assert!(spares.take(&img, &vm.join("third.img")).is_none());
    }

    #[test]
    fn other_content_large_images_and_a_full_disk_get_no_spare() {
        let tmp = tempfile::tempdir().unwrap();
        let spares = SpareDisks::new(tmp.path(), 1, 8);
        spares.sweep().unwrap();
        let img = image(tmp.path(), "a", b"image a");
        assert!(spares.begin_refill(&img));
        spares.refill(&img, |_| {}, |_| true);
        // The same id imported again with other content is another image.
        let again = SpareImage {
            sha256: format!("{:0>64}", "b"),
            ..img.clone()
        };
        let dst = tmp.path().join("x.img");
        assert!(spares.take(&again, &dst).is_none());
        assert!(!dst.exists());
        let big = image(tmp.path(), "big", b"more than eight bytes");
        assert!(!spares.begin_refill(&big));
        let c = image(tmp.path(), "c", b"image c");
        assert!(spares.begin_refill(&c));
        spares.refill(&c, |_| {}, |_| false);
        assert!(spares.take(&c, &dst).is_none());
        assert_eq!(spares.ready(), 1);
        // Turned off: nothing at all, not even the directory.
        let off = SpareDisks::new(&tmp.path().join("off"), 0, 1 << 20);
        fs::create_dir(tmp.path().join("off")).unwrap();
        off.sweep().unwrap();
        assert!(!off.begin_refill(&img));
        assert!(!tmp.path().join("off").join(SPARE_DIR).exists());
    }

    #[test]
    fn the_least_recently_used_image_loses_its_spares_and_close_removes_all() {
        let tmp = tempfile::tempdir().unwrap();
        let spares = SpareDisks::new(tmp.path(), 1, 1 << 20);
        spares.sweep().unwrap();
        let images: Vec<SpareImage> = (0..=MAX_IMAGES)
            .map(|i| {
                image(
                    tmp.path(),
                    &format!("i{i}"),
                    format!("image {i}").as_bytes(),
                )
            })
            .collect();
        for img in &images {
            assert!(spares.begin_refill(img));
            spares.refill(img, |_| {}, |_| true);
        }
        assert_eq!(spares.ready(), MAX_IMAGES);
        assert_eq!(spares_in(tmp.path()).len(), MAX_IMAGES);
        let dst = tmp.path().join("x.img");
        assert!(spares.take(&images[0], &dst).is_none());
        let file = spares.take(&images[MAX_IMAGES], &dst);
        assert!(file.is_some());
        assert_eq!(
            fs::read(&dst).unwrap(),
            format!("image {MAX_IMAGES}").as_bytes()
        );
        spares.close();
        assert!(spares_in(tmp.path()).is_empty());
        // A refill after the stop adds nothing.
        assert!(!spares.begin_refill(&images[1]));
        // A start sweeps what a killed metald left, parts included.
        fs::write(tmp.path().join(SPARE_DIR).join("x-1.img.part"), b"torn").unwrap();
        let next = SpareDisks::new(tmp.path(), 1, 1 << 20);
        next.sweep().unwrap();
        assert!(spares_in(tmp.path()).is_empty());
    }
}
