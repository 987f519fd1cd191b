//! Snapshots that start new VMs.
//!
//! A snapshot is the customer's, not its VM's: `<snapshots dir>/<id>/` holds the guest's
//! device state (and Firecracker's memory file) and a copy of each disk the VM owns, all
//! written by metald (a VMM that writes by path stages its files in its own directory, and
//! metald copies them out through no-follow opens). Its row is CREATING while the files are
//! written; start-up removes such rows and any directory without a READY row, so a metald
//! killed half way leaves nothing. Deleting the source VM leaves the snapshot alone.
//!
//! A VM created `from_snapshot` gets its own copy of the disks and the snapshot's state linked
//! into its directory as a suspended state (read-only for its VMM: metald's file, mode 0644),
//! so its first boot is a wake of that state ([`StartKind::Restore`]). Its guest still believes
//! it has the source VM's addresses (its inner identity): each run that starts from saved
//! state maps them to the VM's own ([`crate::network::clone_map`]); a cold boot forgets them.

use super::launch::{clone_disk, drive_file};
use super::*;
use crate::backend::files;
use crate::backend::vm_dir::{copy_out, VmDir};
use crate::network::clone_map::{self, AddressMap};
use crate::store::{InnerIdentity, SnapshotRecord, SnapshotState};

/// Longest snapshot id accepted in a request (`snap-` and a UUID are 41 bytes).
pub const MAX_SNAPSHOT_ID: usize = 64;

/// What loads a clone's address map: `metald-jail netns-nft` (a fresh process that enters
/// the VM's namespace) and the nft binary it runs there.
#[derive(Debug, Clone)]
pub struct CloneNet {
    /// The `metald-jail` binary.
    pub jail_exe: PathBuf,
    /// The nft binary.
    pub nft_bin: PathBuf,
}

impl VmService {
    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.cfg.snapshots_dir.join(id)
    }

    /// Snapshots the caller's VM: its memory, device state and a copy of its own disks. A
    /// running VM is paused for it and runs on after; a paused one stays paused; a
    /// suspended one's saved state is copied.
    pub async fn create_snapshot(
        &self,
        customer: &CustomerId,
        id: &VmId,
    ) -> Result<SnapshotRecord, ServiceError> {
        let (_guard, vm) = self.lock_own(customer, id).await?;
        match vm.state() {
            VmState::Running | VmState::Paused | VmState::Suspended => {}
            other => {
                return Err(ServiceError::Precondition(format!(
                    "vm {id} is {}: only a RUNNING, PAUSED or SUSPENDED VM has a guest to snapshot",
                    other.as_str()
                )))
            }
        }
        if vm.backend != self.backend_name() {
            return Err(ServiceError::Precondition(format!(
                "vm {id} was saved by {}, this host runs {}",
                vm.backend,
                self.backend_name()
            )));
        }
        let writable = self.writable_disk_bytes(&vm.config)?;
        self.check_disk_room(writable.saturating_add(vm.config.memory_bytes))?;
        let limits = self.cfg.quotas.of(customer).stored;
        // What the guest believes it is: a restored clone's inner identity until its next
        // cold boot, its VM's own addresses otherwise.
        let inner = match self.store.inner_identity(id)? {
            Some(inner) => Some(inner),
            None => vm.net.as_ref().map(|n| InnerIdentity {
                ipv6: n.ipv6,
                ipv4: n.ipv4,
                mac: n.mac.clone(),
            }),
        };
        let snap = SnapshotRecord {
            id: format!("snap-{}", uuid::Uuid::new_v4()),
            customer: customer.clone(),
            source_vm: id.clone(),
            state: SnapshotState::Creating,
            backend: vm.backend.clone(),
            config: vm.config.clone(),
            inner,
            bytes: 0,
            created_at_ms: now_ms(),
        };
        self.store.insert_snapshot_within(&snap, &limits)?;
        let dir = self.snapshot_dir(&snap.id);
        let t0 = std::time::Instant::now();
        let written = match make_private_dir(&dir) {
            Ok(()) => self.write_snapshot(&vm, &dir).await,
            Err(e) => Err(e),
        };
        let finished = written.and_then(|bytes| {
            self.store.finish_snapshot(&snap.id, bytes, &limits)?;
            Ok(bytes)
        });
        match finished {
            Ok(bytes) => {
                tracing::info!(vm_id = %id, snapshot_id = %snap.id, bytes, snapshot_ms = t0.elapsed().as_secs_f64() * 1000.0, "snapshot created");
                Ok(SnapshotRecord {
                    state: SnapshotState::Ready,
                    bytes,
                    ..snap
                })
            }
            Err(e) => {
                self.remove_snapshot_files(&snap.id);
                if let Err(r) = self.store.delete_snapshot(&snap.id) {
                    tracing::error!(snapshot_id = %snap.id, error = %Chain(&r), "removing a failed snapshot's row failed; start-up removes it");
                }
                Err(e)
            }
        }
    }

    /// Writes the VM's state and disks into `out`; returns the bytes written.
    async fn write_snapshot(&self, vm: &VmRecord, out: &Path) -> Result<u64, ServiceError> {
        let vm_dir = self.vm_dir(&vm.id);
        if vm.state() == VmState::Suspended {
            // No VMM: the suspend's files are the state.
            let (src, dst) = (vm_dir.clone(), out.to_path_buf());
            blocking(move || {
                let dir = VmDir::open(&src)?;
                copy_out(&dir, files::SUSPEND_STATE, &dst.join(files::SNAPSHOT_STATE))?;
                match copy_out(
                    &dir,
                    files::SUSPEND_MEMORY,
                    &dst.join(files::SNAPSHOT_MEMORY),
                ) {
                    // QEMU keeps memory in its one stream.
                    Err(BackendError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        Ok(0)
                    }
                    other => other,
                }
            })
            .await
            .map_err(|source| self.snapshot_error(vm, source))?;
            return self.copy_own_disks(vm, out).await;
        }
        let was_running = vm.state() == VmState::Running;
        if was_running {
            self.backend
                .pause(&vm.id)
                .await
                .map_err(|source| self.snapshot_error(vm, source))?;
        }
        let owner_paused = vm.state() == VmState::Paused;
        let saved = match self
            .backend
            .snapshot(&vm.id, &vm_dir, out, owner_paused)
            .await
        {
            // The disks are copied while the guest cannot write them.
            Ok(()) => self.copy_own_disks(vm, out).await,
            Err(BackendError::Unsupported(reason)) => Err(ServiceError::Unimplemented(reason)),
            Err(source) => Err(self.snapshot_error(vm, source)),
        };
        if was_running {
            if let Err(e) = self.backend.resume(&vm.id).await {
                tracing::error!(vm_id = %vm.id, error = %Chain(&e), "resuming the guest after its snapshot failed");
                return Err(self.snapshot_error(vm, e));
            }
        }
        saved
    }

    fn snapshot_error(&self, vm: &VmRecord, source: BackendError) -> ServiceError {
        ServiceError::Backend {
            op: "snapshot",
            vm: vm.id.clone(),
            source,
        }
    }

    /// Copies the disks the VM owns (root disk, writable drives) into `out`, opened without
    /// following links (the VM's uid owns its directory); returns the bytes of everything in
    /// `out`.
    async fn copy_own_disks(&self, vm: &VmRecord, out: &Path) -> Result<u64, ServiceError> {
        let names = own_disk_names(&vm.config);
        let (src, dst) = (self.vm_dir(&vm.id), out.to_path_buf());
        blocking(move || {
            let dir = VmDir::open(&src)?;
            for name in &names {
                let input = dir.open_read(name)?;
                crate::assets::clone_open_file(&input, &src.join(name), &dst.join(name)).map_err(
                    |e| BackendError::Io {
                        op: "copy disk",
                        path: src.join(name),
                        source: std::io::Error::other(e),
                    },
                )?;
            }
            dir_bytes(&dst).map_err(|source| BackendError::Io {
                op: "measure",
                path: dst.clone(),
                source,
            })
        })
        .await
        .map_err(|source| self.snapshot_error(vm, source))
    }

    /// The caller's snapshots, oldest first.
    pub async fn list_snapshots(
        &self,
        customer: &CustomerId,
    ) -> Result<Vec<SnapshotRecord>, ServiceError> {
        Ok(self.store.list_snapshots(customer)?)
    }

    /// One of the caller's snapshots.
    pub async fn get_snapshot(
        &self,
        customer: &CustomerId,
        id: &str,
    ) -> Result<SnapshotRecord, ServiceError> {
        self.store
            .get_snapshot(customer, id)?
            .ok_or_else(|| ServiceError::SnapshotNotFound(id.to_string()))
    }

    /// Deletes one of the caller's snapshots and its files. VMs created from it keep their
    /// own copies and run on.
    pub async fn delete_snapshot(
        &self,
        customer: &CustomerId,
        id: &str,
    ) -> Result<(), ServiceError> {
        let snap = self.get_snapshot(customer, id).await?;
        if snap.state != SnapshotState::Ready {
            return Err(ServiceError::Precondition(format!(
                "snapshot {id} is still being created"
            )));
        }
        // Row first: a metald killed between the two leaves a directory without a row,
        // which start-up removes.
        self.store.delete_snapshot(id)?;
        let dir = self.snapshot_dir(id);
        blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BackendError::Io {
                op: "remove snapshot",
                path: dir,
                source: e,
            }),
            _ => Ok(()),
        })
        .await
        .map_err(|source| ServiceError::Io {
            op: "remove snapshot",
            path: self.snapshot_dir(id),
            source: std::io::Error::other(source),
        })?;
        tracing::info!(snapshot_id = %id, "snapshot deleted");
        Ok(())
    }

    fn remove_snapshot_files(&self, id: &str) {
        let dir = self.snapshot_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::error!(snapshot_id = %id, error = %Chain(&e), "removing a snapshot's files failed; start-up removes them");
            }
            _ => {}
        }
    }

    /// Creates a VM from one of the caller's snapshots: the snapshot's configuration (with
    /// `metadata` as its labels), its own addresses and its own copy of the snapshot's disks.
    /// Its first boot restores the snapshot. Nothing is left behind if a step fails.
    pub async fn create_from_snapshot(
        &self,
        customer: &CustomerId,
        snapshot_id: &str,
        metadata: std::collections::BTreeMap<String, String>,
    ) -> Result<VmRecord, ServiceError> {
        let snap = self.get_snapshot(customer, snapshot_id).await?;
        if snap.state != SnapshotState::Ready {
            return Err(ServiceError::SnapshotNotFound(snapshot_id.to_string()));
        }
        if snap.backend != self.backend_name() {
            return Err(ServiceError::Unimplemented(format!(
                "snapshot {snapshot_id} was made by {}; this host runs {}, which cannot load it",
                snap.backend,
                self.backend_name()
            )));
        }
        let mut config = snap.config.clone();
        config.metadata = metadata;
        self.validate(customer, &config)?;
        let src = self.snapshot_dir(&snap.id);
        let names = own_disk_names(&config);
        let writable = names.iter().try_fold(0u64, |sum, n| {
            let len = std::fs::metadata(src.join(n))
                .map_err(|source| ServiceError::Io {
                    op: "measure snapshot disk",
                    path: src.join(n),
                    source,
                })?
                .len();
            Ok::<_, ServiceError>(sum.saturating_add(len))
        })?;
        self.check_disk_room(writable)?;
        self.in_new_vm_dir(|id, dir| async move {
            self.prepare_clone(customer, &id, &dir, &snap, config, &names, writable)
                .await
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn prepare_clone(
        &self,
        customer: &CustomerId,
        id: &VmId,
        dir: &Path,
        snap: &SnapshotRecord,
        config: VmConfig,
        disks: &[String],
        writable: u64,
    ) -> Result<VmRecord, ServiceError> {
        let src = self.snapshot_dir(&snap.id);
        let mut copies = Vec::with_capacity(disks.len());
        for name in disks {
            copies.push(clone_disk(src.join(name), dir.join(name)).await?);
        }
        // A clone's copies are synced before it is stored: unlike an image's, they could not
        // be made again at start if a host crash lost part of them (the snapshot may be gone).
        super::durable::sync_now(copies).await?;
        // The saved state is shared, read-only: a link to metald's file (mode 0644) in a
        // directory its VMM can read. A later suspend of the clone unlinks the names before
        // it writes, so the snapshot's files are never written through them.
        for (from, to) in [
            (files::SNAPSHOT_STATE, files::SUSPEND_STATE),
            (files::SNAPSHOT_MEMORY, files::SUSPEND_MEMORY),
        ] {
            match std::fs::hard_link(src.join(from), dir.join(to)) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && from == files::SNAPSHOT_MEMORY => {}
                Err(source) => {
                    return Err(ServiceError::Io {
                        op: "link snapshot state",
                        path: src.join(from),
                        source,
                    })
                }
                Ok(()) => {}
            }
        }
        let record = self.new_record(id, customer, config).await?;
        let plan = self.isolation.allocation();
        let limits = self.cfg.quotas.of(customer).stored;
        // Without a network (isolation off) there is no address to map.
        let inner = plan.as_ref().and(snap.inner.as_ref());
        let saved = self.store.insert_clone_within(
            &record,
            plan.as_ref(),
            writable,
            &limits,
            &snap.id,
            inner,
        )?;
        // Synced above: only the record is left to the background.
        self.sync_disks_later(id, Vec::new());
        tracing::info!(vm_id = %id, customer = %customer, snapshot_id = %snap.id, "vm created from snapshot");
        Ok(saved)
    }

    /// Whether the VM's next boot restores the snapshot it was created from (it never ran,
    /// and the snapshot's state is in its directory).
    pub(super) fn restores_on_boot(&self, vm: &VmRecord) -> bool {
        vm.state() == VmState::Created
            && VmDir::open(&self.vm_dir(&vm.id))
                .and_then(|d| d.open_read(files::SUSPEND_STATE))
                .is_ok()
    }

    /// While a VMM starts, once the VM's firewall is open: a guest that starts from saved
    /// state while believing it has other addresses than its VM's gets its address map in the
    /// VM's namespace; a cold boot's guest learns its own addresses, and the inner ones are
    /// forgotten.
    pub(super) async fn map_clone_addresses(
        &self,
        vm: &VmRecord,
        launch: &VmLaunch,
        how: StartKind,
    ) -> Result<(), ServiceError> {
        let inner = self.store.inner_identity(&vm.id)?;
        let Some(inner) = inner else { return Ok(()) };
        if how == StartKind::Boot {
            self.store.forget_inner_identity(&vm.id)?;
            return Ok(());
        }
        let (Some(plan), Some(net)) = (&launch.net, &self.cfg.clone_net) else {
            return Ok(());
        };
        let Some(map) = AddressMap::new(plan, inner.ipv6, inner.ipv4) else {
            return Ok(());
        };
        let sandbox = |source| ServiceError::CloneMap {
            vm: vm.id.clone(),
            source: Box::new(source),
        };
        // The neighbours are pinned on the VM's host end, which `Isolation::open` (the step
        // before this one) finished.
        let gateway_mac = clone_map::pin_neighbours(&plan.host_if, &map, &plan.mac)
            .await
            .map_err(sandbox)?;
        let script = map.script(&gateway_mac);
        clone_map::load_in_netns(&net.jail_exe, &net.nft_bin, &plan.netns, &script)
            .await
            .map_err(sandbox)?;
        tracing::debug!(vm_id = %vm.id, inner6 = %inner.ipv6, own6 = %plan.ipv6, "clone address map loaded");
        Ok(())
    }

    /// Before a reboot (a cold boot in the VM's namespace, which stays): the address map
    /// goes, and the inner identity with it.
    pub(super) async fn unmap_clone_addresses(
        &self,
        vm: &VmRecord,
        launch: &VmLaunch,
    ) -> Result<(), ServiceError> {
        if self.store.inner_identity(&vm.id)?.is_none() {
            return Ok(());
        }
        if let (Some(plan), Some(net)) = (&launch.net, &self.cfg.clone_net) {
            clone_map::load_in_netns(
                &net.jail_exe,
                &net.nft_bin,
                &plan.netns,
                &clone_map::removal_script(),
            )
            .await
            .map_err(|source| ServiceError::CloneMap {
                vm: vm.id.clone(),
                source: Box::new(source),
            })?;
        }
        self.store.forget_inner_identity(&vm.id)?;
        Ok(())
    }

    /// At start: snapshots left CREATING by a killed metald go with their files, directories
    /// without a READY row go, and files a Firecracker staged for a snapshot go from the VM
    /// directories of `vms`.
    pub(super) fn sweep_snapshots(&self, vms: &[VmRecord]) -> Result<(), ServiceError> {
        let mut ready = std::collections::HashSet::new();
        for snap in self.store.all_snapshots()? {
            if snap.state == SnapshotState::Ready {
                ready.insert(snap.id);
            } else {
                tracing::warn!(snapshot_id = %snap.id, "removing a snapshot whose create was interrupted");
                self.store.delete_snapshot(&snap.id)?;
            }
        }
        for entry in std::fs::read_dir(&self.cfg.snapshots_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| ready.contains(n)) {
                continue;
            }
            tracing::warn!(path = %entry.path().display(), "removing snapshot files without a snapshot");
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::error!(path = %entry.path().display(), error = %Chain(&e), "removing leftover snapshot files failed");
            }
        }
        for vm in vms {
            if let Ok(dir) = VmDir::open(&self.vm_dir(&vm.id)) {
                for name in [files::SNAPSHOT_STATE, files::SNAPSHOT_MEMORY] {
                    if let Err(e) = dir.remove(name) {
                        tracing::warn!(vm_id = %vm.id, error = %Chain(&e), "removing a staged snapshot file failed");
                    }
                }
            }
        }
        Ok(())
    }
}

/// The file names of the disks a VM owns, root first.
pub(super) fn own_disk_names(config: &VmConfig) -> Vec<String> {
    std::iter::once(ROOTFS_FILE.to_string())
        .chain(
            config
                .drives
                .iter()
                .filter(|d| !d.read_only)
                .map(drive_file),
        )
        .collect()
}

/// Bytes of the regular files directly in `dir`.
fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut sum = 0u64;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            sum = sum.saturating_add(meta.len());
        }
    }
    Ok(sum)
}

/// Makes `dir`, metald's alone (0700).
fn make_private_dir(dir: &Path) -> Result<(), ServiceError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|source| ServiceError::Io {
            op: "create snapshot directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// File work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|join| {
        Err(BackendError::Io {
            op: "file task",
            path: PathBuf::new(),
            source: std::io::Error::other(join),
        })
    })
}

#[cfg(test)]
mod tests;
