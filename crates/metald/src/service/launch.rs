//! What a VM is made of on the host: its private disk copies (made at create) and the launch
//! description its VMM is started with.

use super::spare_disks::SpareImage;
use super::validate::asset_field_error;
use super::*;

impl VmService {
    pub(super) async fn prepare(
        &self,
        customer: &CustomerId,
        id: &VmId,
        dir: &Path,
        config: VmConfig,
        writable_bytes: u64,
        t0: std::time::Instant,
    ) -> Result<VmRecord, ServiceError> {
        let checks_ms = t0.elapsed().as_secs_f64() * 1000.0;
        self.fetch_assets(&config).await?;
        let rootfs = self
            .assets
            .get_kind(&config.rootfs_image_id, AssetKind::Rootfs)
            .map_err(|e| asset_field_error("config.rootfs.image_id", e))?;
        let mut copies = vec![
            self.copy_image(&rootfs, dir.join(ROOTFS_FILE))
                .instrument(tracing::info_span!("disk.clone", vm_id = %id))
                .await?,
        ];
        for d in config.drives.iter().filter(|d| !d.read_only) {
            let asset = self
                .assets
                .get_kind(&d.image_id, AssetKind::Rootfs)
                .map_err(ServiceError::Asset)?;
            copies.push(self.copy_image(&asset, dir.join(drive_file(d))).await?);
        }
        let disks_ms = t0.elapsed().as_secs_f64() * 1000.0 - checks_ms;
        let record = self.new_record(id, customer, config).await?;
        let plan = self.isolation.allocation();
        let limits = self.cfg.quotas.of(customer).stored;
        let saved = self
            .store
            .insert_vm_within(&record, plan.as_ref(), writable_bytes, &limits)?;
        // Stored first: a stop of metald before the sync is recorded is made good at start.
        self.sync_disks_later(id, copies);
        // The create's steps (the per-step profile of issue 14).
        let record_ms = t0.elapsed().as_secs_f64() * 1000.0 - checks_ms - disks_ms;
        tracing::info!(vm_id = %id, customer = %customer, checks_ms, disks_ms, record_ms, "vm created");
        Ok(saved)
    }

    /// A new VM's private copy of `image` at `dst`, not yet on stable storage (see
    /// [`clone_disk`]), or a spare copy made ahead, synced already; the image's spares are
    /// refilled in the background either way.
    async fn copy_image(
        &self,
        image: &crate::store::AssetRecord,
        dst: PathBuf,
    ) -> Result<std::fs::File, ServiceError> {
        let image = SpareImage {
            sha256: image.sha256.clone(),
            path: self.assets.path_of(image),
            size: image.size_bytes,
        };
        let (spares, wanted) = (Arc::clone(&self.spares), image.clone());
        // One trip to the blocking pool, for a spare or the copy.
        let file = on_blocking_pool("copy disk (task failed)", move || {
            match spares.take(&wanted, &dst) {
                Some(file) => {
                    tracing::debug!(sha256 = %wanted.sha256, "disk: a spare copy taken");
                    Ok(file)
                }
                None => copy_unsynced(&wanted.path, &dst),
            }
        })
        .await?
        .map_err(ServiceError::Asset)?;
        self.refill_spares(image);
        Ok(file)
    }

    /// Makes `image` its spare copies on a blocking thread, unless that runs already or it
    /// has them.
    fn refill_spares(&self, image: SpareImage) {
        if !self.spares.begin_refill(&image) {
            return;
        }
        let (spares, isolation) = (Arc::clone(&self.spares), Arc::clone(&self.isolation));
        let (probe, vms_dir) = (Arc::clone(&self.cfg.probe), self.cfg.vms_dir.clone());
        let reserve = self.cfg.host.disk_reserve_bytes;
        let job = self.background_job();
        tokio::task::spawn_blocking(move || {
            let _job = job;
            // A create's boot usually follows within milliseconds: it goes first (the quiet
            // moment below is one after a start, and this create's boot has not begun yet).
            std::thread::sleep(BOOT_FOLLOWS);
            // A spare must leave the disk reserve free, as a create's copy must.
            let room = |size| capacity::check_disk_room(&*probe, &vms_dir, reserve, size).is_ok();
            spares.refill(&image, |stock| isolation.before_refill(stock), room);
        });
    }

    /// What the backend needs to start this VM.
    pub(super) fn launch(&self, vm: &VmRecord) -> Result<VmLaunch, ServiceError> {
        let files = self.boot_files(vm)?;
        let dir = self.vm_dir(&vm.id);
        let mut disks = vec![Disk {
            id: "rootfs".into(),
            path: dir.join(ROOTFS_FILE),
            read_only: false,
        }];
        for d in &vm.config.drives {
            let path = if d.read_only {
                let asset = self
                    .assets
                    .get_kind(&d.image_id, AssetKind::Rootfs)
                    .map_err(ServiceError::Asset)?;
                self.assets.path_of(&asset)
            } else {
                dir.join(drive_file(d))
            };
            disks.push(Disk {
                id: d.drive_id.clone(),
                path,
                read_only: d.read_only,
            });
        }
        Ok(VmLaunch {
            vm_id: vm.id.clone(),
            control_dir: self
                .isolation
                .control_dir(&vm.id)
                .unwrap_or_else(|| dir.clone()),
            dir,
            vcpu_count: vm.config.vcpu_count,
            memory_mib: vm.config.memory_mib(),
            kernel: files.kernel,
            initrd: files.initrd,
            extra_kernel_args: vm.config.kernel_args.clone(),
            disks,
            net: None,
            jail: None,
            hold: Default::default(),
        })
    }

    pub(super) fn boot_files(&self, vm: &VmRecord) -> Result<BootFiles, ServiceError> {
        self.assets
            .boot_files(&vm.config.kernel_image_id, &vm.config.rootfs_image_id)
            .map_err(ServiceError::Asset)
    }
}

/// How long a spare disk refill lets the create's boot begin before it looks for a quiet moment.
const BOOT_FOLLOWS: Duration = Duration::from_millis(10);

/// Makes a VM's private copy of a disk image, not yet on stable storage: the copy is returned
/// to be synced ([`VmService::sync_disks_later`]). A copy without reflink support can take
/// seconds for a large image, so it runs on the blocking pool, never on an async worker.
pub(super) async fn clone_disk(src: PathBuf, dst: PathBuf) -> Result<std::fs::File, ServiceError> {
    on_blocking_pool("copy disk (task failed)", move || copy_unsynced(&src, &dst))
        .await?
        .map_err(ServiceError::Asset)
}

/// [`clone_disk`]'s copy, on the calling thread.
fn copy_unsynced(src: &Path, dst: &Path) -> Result<std::fs::File, crate::assets::AssetError> {
    let copied = crate::assets::clone_file_unsynced(src, dst);
    let method = copied.as_ref().map(|(method, _)| *method);
    tracing::debug!(src = %src.display(), dst = %dst.display(), ?method, "disk cloned");
    copied.map(|(_, file)| file)
}

pub(super) fn drive_file(d: &DriveConfig) -> String {
    format!("drive-{}.img", d.drive_id)
}
