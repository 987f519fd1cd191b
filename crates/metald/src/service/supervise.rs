//! Watching VMMs metald did not just start or stop itself: exits nobody asked for, guests that
//! never print their readiness line, and VMMs that outlived a metald restart.

use super::launch::drive_file;
use super::*;
use crate::backend::console::wait_for_line;

impl VmService {
    /// Re-attaches to VMMs that outlived a previous metald; VMs whose VMM is gone become FAILED.
    pub async fn reconcile(&self) -> Result<(), ServiceError> {
        // No boot outlives metald: what a killed one reserved is free again.
        self.store.release_all_runs()?;
        // Spares a stop left are not known to be whole; they are made again as creates need.
        self.spares.sweep().map_err(|source| ServiceError::Io {
            op: "sweep spare disk copies",
            path: self.cfg.vms_dir.join(spare_disks::SPARE_DIR),
            source,
        })?;
        let vms = self.finish_interrupted_deletes_and_creates().await?;
        self.sweep_snapshots(&vms)?;
        self.make_disks_durable(&vms).await?;
        let mut keep = std::collections::HashSet::new();
        for mut vm in vms {
            if !vm.state().has_vmm() {
                continue;
            }
            // Held until the VM is fully re-attached or failed: an exit of the VMM reported
            // as soon as it is adopted waits for that, and then finds a consistent VM.
            let _guard = self.lock(&vm.id).await;
            let adopted = match (
                vm.life.vmm_pid(),
                vm.life.vmm_start_ticks(),
                self.launch(&vm),
            ) {
                (Some(pid), Some(start_ticks), Ok(launch)) if vm.backend == self.backend_name() => {
                    self.backend
                        .adopt(&launch, crate::backend::VmmProcess { pid, start_ticks })
                        .await
                        .unwrap_or(false)
                }
                _ => false,
            };
            if adopted {
                tracing::info!(vm_id = %vm.id, pid = ?vm.life.vmm_pid(), "re-attached to running VMM");
                // metald killed in the middle of a pause, resume or suspend leaves the vCPUs
                // as the VMM had them: made to match the stored state (both are idempotent).
                let vcpus = if vm.state() == VmState::Paused {
                    self.backend.pause(&vm.id).await
                } else {
                    self.backend.resume(&vm.id).await
                };
                if let Err(e) = vcpus {
                    tracing::warn!(vm_id = %vm.id, error = %Chain(&e), "setting a re-attached VM's vCPUs to its stored state failed");
                }
                if let Err(e) = self.isolation.adopt(&vm).await {
                    tracing::error!(vm_id = %vm.id, error = %Chain(&e), "re-attaching the VM's network failed");
                }
                keep.insert(vm.id.clone());
                if let Some(pid) = vm.life.vmm_pid() {
                    self.track(&vm, pid, true);
                }
                continue;
            }
            // Its run is counted to its end as far as the kernel still knows it (the cgroup's
            // CPU time outlives the VMM), and the time metald was down is billed like a
            // re-adopted VM's; then the run ends like any other.
            if let Some(pid) = vm.life.vmm_pid() {
                self.track(&vm, pid, true);
            }
            let _logged = self.release_sandbox(&vm).await;
            tracing::warn!(vm_id = %vm.id, "VMM is gone after a metald restart; marking FAILED");
            vm.life.apply(Change::Failed(
                "VMM process was gone when metald restarted".into(),
            ))?;
            self.save(&mut vm)?;
        }
        // Whatever isolation is left of VMs that are not running (metald crashed mid-create
        // or mid-delete, or the records are gone) is removed.
        self.isolation
            .sweep(&keep)
            .await
            .map_err(ServiceError::Sweep)?;
        // Deleted VMs whose leftovers were still being removed when metald stopped: swept
        // just now with the rest, so their slots and addresses are free again.
        let freed = self.store.free_held_allocations()?;
        if freed > 0 {
            tracing::info!(
                freed,
                "freed the slots and addresses of VMs deleted before the restart"
            );
        }
        Ok(())
    }

    /// A delete removes the VM's directory, then its row; a create makes the directory, then
    /// the row. metald killed between the two leaves a row without a directory (finished off
    /// here: the delete was under way) or a directory without a row (removed: the create was
    /// never acknowledged). Runs at start, before any call is served; returns the VMs left.
    async fn finish_interrupted_deletes_and_creates(&self) -> Result<Vec<VmRecord>, ServiceError> {
        let mut vms = Vec::new();
        for mut vm in self.store.all_vms()? {
            if self.vm_dir(&vm.id).exists() {
                self.fail_if_disks_are_gone(&mut vm)?;
                vms.push(vm);
                continue;
            }
            tracing::warn!(vm_id = %vm.id, "VM directory gone: finishing an interrupted delete");
            let _logged = self.release_sandbox(&vm).await;
            self.store.delete_vm(&vm.id)?;
        }
        let known: std::collections::HashSet<&VmId> = vms.iter().map(|vm| &vm.id).collect();
        for entry in std::fs::read_dir(&self.cfg.vms_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.parse::<VmId>().ok()) else {
                continue;
            };
            if known.contains(&id) {
                continue;
            }
            tracing::warn!(vm_id = %id, "VM directory without a VM: removing what an interrupted create or delete left");
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::error!(vm_id = %id, error = %Chain(&e), "removing the directory failed");
            }
        }
        Ok(vms)
    }

    /// A VM whose directory is there but a disk of its own is not (removed by hand, or a
    /// damaged file system) can never boot again: it is marked FAILED with the file named, so
    /// its owner learns why and can delete it. A VM whose VMM runs keeps running on the open
    /// file; the loss is found at a later start.
    fn fail_if_disks_are_gone(&self, vm: &mut VmRecord) -> Result<(), ServiceError> {
        let Some(missing) = self.missing_disk(vm) else {
            return Ok(());
        };
        let reason = format!("its disk {missing} is gone; it cannot boot again, only be deleted");
        if vm.state().has_vmm() || vm.life.failure() == Some(reason.as_str()) {
            return Ok(());
        }
        tracing::error!(vm_id = %vm.id, file = %missing, "a VM's disk is gone; marking FAILED");
        vm.life.apply(Change::Lost(reason))?;
        self.save(vm)
    }

    /// The first of the VM's own disks (and, while it is suspended, of its saved state) that
    /// is not a regular file in its directory.
    pub(super) fn missing_disk(&self, vm: &VmRecord) -> Option<String> {
        let dir = self.vm_dir(&vm.id);
        use crate::backend::files::{SUSPEND_MEMORY, SUSPEND_STATE};
        // Firecracker saves memory apart from device state; QEMU's stream holds both.
        let saved: &[&str] = if vm.state() != VmState::Suspended {
            &[]
        } else if vm.backend == crate::backend::BackendKind::Firecracker.as_str() {
            &[SUSPEND_STATE, SUSPEND_MEMORY]
        } else {
            &[SUSPEND_STATE]
        };
        std::iter::once(ROOTFS_FILE.to_string())
            .chain(
                vm.config
                    .drives
                    .iter()
                    .filter(|d| !d.read_only)
                    .map(drive_file),
            )
            .chain(saved.iter().map(|f| f.to_string()))
            .find(|f| !std::fs::symlink_metadata(dir.join(f)).is_ok_and(|m| m.is_file()))
    }

    /// The VM's VMM is gone: its last sample is taken, then its sandbox removed. An error
    /// (logged by the isolation) means something of it is left; only a delete must stop then,
    /// so the VM's jail slot is not freed while its processes live.
    pub(super) async fn release_sandbox(
        &self,
        vm: &VmRecord,
    ) -> Result<(), crate::sandbox::SandboxError> {
        self.untrack_exited(vm).await;
        self.isolation.release(vm).await
    }

    /// A VMM exited: if nobody asked for it, the VM is FAILED with the exit status.
    pub(super) async fn handle_exit(&self, ev: ExitEvent) {
        if ev.requested {
            return;
        }
        let _guard = self.lock(&ev.vm_id).await;
        let Ok(Some(mut vm)) = self.store.get_vm_unscoped(&ev.vm_id) else {
            return;
        };
        if vm.life.vmm_pid() != Some(ev.pid) || transition(vm.state(), Operation::Fail).is_err() {
            return;
        }
        let dir = self.vm_dir(&vm.id);
        let console = file_tail(&dir.join(crate::backend::files::CONSOLE_LOG), 512);
        // What the VMM said as it died (an assertion, a panic, a fatal error) tells why.
        let vmm_log = file_tail(&dir.join(crate::backend::files::VMM_LOG), 1024);
        tracing::warn!(
            vm_id = %vm.id,
            pid = ev.pid,
            status = %ev.status,
            vmm_log = %vmm_log,
            "VMM exited on its own"
        );
        let _logged = self.release_sandbox(&vm).await;
        let failed = vm.life.apply(Change::Failed(format!(
            "VMM exited on its own ({}); its log ends: {vmm_log}; console ends: {console}",
            ev.status
        )));
        if let Err(e) = failed
            .map_err(ServiceError::from)
            .and_then(|()| self.save(&mut vm))
        {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "recording a VMM exit failed");
        }
    }

    /// Watches the console for the rootfs's readiness line; a guest silent past the boot
    /// timeout is killed and reported FAILED with its console tail.
    pub(super) fn watch_readiness(self: &Arc<Self>, vm: &VmRecord, launch: &VmLaunch, offset: u64) {
        let Ok(files) = self.boot_files(vm) else {
            return;
        };
        let Some(marker) = files.ready_marker.filter(|m| !m.is_empty()) else {
            return;
        };
        let svc = Arc::downgrade(self);
        let id = vm.id.clone();
        let pid = vm.life.vmm_pid();
        let console = launch.console_log();
        let timeout = self.cfg.boot_timeout;
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let wait = wait_for_line(&console, offset, marker.as_bytes());
            tokio::pin!(wait);
            loop {
                let found = tokio::time::timeout(timeout, &mut wait).await.is_ok();
                let Some(svc) = svc.upgrade() else { return };
                let _guard = svc.lock(&id).await;
                let Ok(Some(mut vm)) = svc.store.get_vm_unscoped(&id) else {
                    return;
                };
                if vm.life.vmm_pid() != pid || !vm.state().has_vmm() {
                    return;
                }
                if !found && vm.state() == VmState::Paused {
                    // A paused guest cannot make progress: give it another period.
                    continue;
                }
                if found {
                    vm.life.mark_guest_ready();
                    let secs = started.elapsed().as_secs_f64();
                    svc.timings.observe(Step::GuestReady, secs);
                    tracing::info!(vm_id = %id, ready_ms = secs * 1000.0, "guest is ready");
                } else {
                    let tail = file_tail(&console, 1024);
                    tracing::warn!(vm_id = %id, "guest printed no readiness line in time");
                    if let Err(e) = svc.backend.shutdown(&id, StopMode::Force).await {
                        tracing::error!(vm_id = %id, error = %Chain(&e), "killing a guest that never became ready failed");
                    }
                    let _logged = svc.release_sandbox(&vm).await;
                    let failed = vm.life.apply(Change::Failed(format!(
                        "guest printed no '{marker}' line within {timeout:?}; console ends: {tail}"
                    )));
                    if let Err(e) = failed {
                        tracing::error!(vm_id = %id, error = %Chain(&e), "recording a readiness timeout failed");
                        return;
                    }
                }
                if let Err(e) = svc.save(&mut vm) {
                    tracing::error!(vm_id = %id, error = %Chain(&e), "recording readiness failed");
                }
                return;
            }
        });
    }
}
