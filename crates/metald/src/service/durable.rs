//! A new VM's disk copies reach stable storage off the boot path. They are made at create
//! without waiting for the disk (an `fdatasync` cost each create 2-3 ms on ext4, and tens of
//! ms with a thousand VMs running, as it waits for the disk's cache flush), synced on a
//! blocking thread afterwards and then recorded durable in the store. A boot does not wait for
//! that: its VMM reads and writes the same page cache either way. What a stop of metald left
//! unrecorded is made good at its next start.

use std::fs::File;

use super::snapshots::own_disk_names;
use super::*;
use crate::backend::vm_dir::VmDir;

impl VmService {
    /// Syncs a stored VM's new disk copies (none if they were synced already) on a blocking
    /// thread, then records them durable. A failure is logged and left for the next start.
    pub(super) fn sync_disks_later(&self, id: &VmId, copies: Vec<File>) {
        let store = Arc::clone(&self.store);
        let job = self.background_job();
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            let _job = job;
            let t0 = std::time::Instant::now();
            match copies.iter().try_for_each(File::sync_data) {
                Ok(()) => match store.set_disks_durable(&id) {
                    Ok(()) => {
                        let sync_ms = t0.elapsed().as_secs_f64() * 1000.0;
                        tracing::debug!(vm_id = %id, sync_ms, "disk copies on stable storage");
                    }
                    Err(e) => {
                        tracing::error!(vm_id = %id, error = %Chain(&e), "recording a VM's disk copies durable failed; they are synced again at the next start");
                    }
                },
                Err(e) => {
                    tracing::error!(vm_id = %id, error = %Chain(&e), "syncing a new VM's disk copies failed; tried again at the next start");
                }
            }
        });
    }

    /// At start, the VMs of `vms` whose disk copies were never recorded durable (metald
    /// stopped before their sync ended). One that never ran and was made from images gets its
    /// copies made again, as a host crash may have lost part of them and nothing of its own is
    /// in them (a boot that failed and was rolled back leaves a VM CREATED too: what its guest
    /// may have written goes with the copy); any other is synced in place, keeping what its
    /// guest wrote. Then it is recorded durable. A VM that fails stays as it is, for the next
    /// start.
    pub(super) async fn make_disks_durable(&self, vms: &[VmRecord]) -> Result<(), ServiceError> {
        let undurable: std::collections::HashSet<VmId> =
            self.store.vms_with_undurable_disks()?.into_iter().collect();
        for vm in vms.iter().filter(|vm| undurable.contains(&vm.id)) {
            let dir = self.vm_dir(&vm.id);
            let sources = if vm.state() == VmState::Created && !self.restores_on_boot(vm) {
                self.image_sources(vm)
            } else {
                None
            };
            let recopied = sources.is_some();
            let names = own_disk_names(&vm.config);
            let id = vm.id.clone();
            let done =
                on_blocking_pool("make disks durable (task failed)", move || match sources {
                    Some(sources) => copy_again(&id, &dir, &sources),
                    None => sync_in_place(&id, &dir, &names),
                })
                .await
                .and_then(|done| done);
            match done.and_then(|()| Ok(self.store.set_disks_durable(&vm.id)?)) {
                Ok(()) => {
                    tracing::info!(vm_id = %vm.id, recopied, "disk copies a stop of metald left unsynced are on stable storage");
                }
                Err(e) => {
                    tracing::error!(vm_id = %vm.id, error = %Chain(&e), "making a VM's disk copies durable failed; tried again at the next start");
                }
            }
        }
        Ok(())
    }

    /// Each disk of its own a never-run VM was made from: its file name and the image's path.
    /// `None` if an image is gone (its copies can then only be synced where they are).
    fn image_sources(&self, vm: &VmRecord) -> Option<Vec<(String, PathBuf)>> {
        let image = |id: &str| match self.assets.get_kind(id, AssetKind::Rootfs) {
            Ok(asset) => Some(self.assets.path_of(&asset)),
            Err(e) => {
                tracing::warn!(vm_id = %vm.id, image = id, error = %Chain(&e), "the image of an unsynced disk copy is gone; syncing the copy in place");
                None
            }
        };
        let mut sources = vec![(ROOTFS_FILE.to_string(), image(&vm.config.rootfs_image_id)?)];
        for d in vm.config.drives.iter().filter(|d| !d.read_only) {
            sources.push((launch::drive_file(d), image(&d.image_id)?));
        }
        Some(sources)
    }
}

/// Syncs new disk copies now, before their VM is stored.
pub(super) async fn sync_now(copies: Vec<File>) -> Result<(), ServiceError> {
    on_blocking_pool("sync disk copy (task failed)", move || {
        copies.iter().try_for_each(File::sync_data)
    })
    .await?
    .map_err(|source| ServiceError::Io {
        op: "sync disk copy",
        path: PathBuf::new(),
        source,
    })
}

/// Copies each image again beside its disk's name, synced, and renames it over the name
/// (whatever was there, a symlink included, is replaced, never followed); then the directory
/// is synced, so the new names are on stable storage too.
fn copy_again(vm: &VmId, dir: &Path, sources: &[(String, PathBuf)]) -> Result<(), ServiceError> {
    let vm_dir = VmDir::open(dir).map_err(|e| dir_error(vm, e))?;
    for (name, src) in sources {
        let tmp = format!(".{name}.again");
        vm_dir.remove(&tmp).map_err(|e| dir_error(vm, e))?;
        crate::assets::clone_file(src, &dir.join(&tmp)).map_err(ServiceError::Asset)?;
        vm_dir.rename(&tmp, name).map_err(|e| dir_error(vm, e))?;
    }
    sync_dir(dir)
}

/// Syncs the VM's own disks where they are, each opened without following a link and only if
/// it is a regular file.
fn sync_in_place(vm: &VmId, dir: &Path, names: &[String]) -> Result<(), ServiceError> {
    let vm_dir = VmDir::open(dir).map_err(|e| dir_error(vm, e))?;
    for name in names {
        let file = vm_dir.open_read(name).map_err(|e| dir_error(vm, e))?;
        file.sync_data().map_err(|source| ServiceError::Io {
            op: "sync disk",
            path: dir.join(name),
            source,
        })?;
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), ServiceError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ServiceError::Io {
            op: "sync VM directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// A VM directory step that failed (the error names the step and the file).
fn dir_error(vm: &VmId, source: BackendError) -> ServiceError {
    ServiceError::Backend {
        op: "make disks durable",
        vm: vm.clone(),
        source,
    }
}
