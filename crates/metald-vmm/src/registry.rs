//! The running VMMs of one backend, and the stop procedure every backend shares.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::process::{ExitEvent, Supervised, VmmProcess};
use super::{file_tail, BackendError, StopMode, StopOutcome, VmLaunch, VmmInfo};
use crate::domain::VmId;
use crate::report::Chain;

/// A VMM process and the socket it is controlled through.
#[derive(Clone)]
struct Entry {
    process: Arc<Supervised>,
    control: PathBuf,
}

/// VMM processes by VM, plus the channel their exits are reported on.
pub struct Registry {
    running: Mutex<HashMap<VmId, Entry>>,
    events: mpsc::UnboundedSender<ExitEvent>,
}

impl Registry {
    /// An empty registry reporting exits on `events`.
    pub fn new(events: mpsc::UnboundedSender<ExitEvent>) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            events,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Entry>> {
        // Map operations cannot leave it inconsistent, so a poisoned lock is still usable.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sender for exit events, for spawning.
    pub fn events(&self) -> mpsc::UnboundedSender<ExitEvent> {
        self.events.clone()
    }

    /// Records a started VMM controlled through the socket at `control`.
    pub fn insert(&self, vm: VmId, process: Arc<Supervised>, control: &Path) {
        let control = control.to_path_buf();
        self.map().insert(vm, Entry { process, control });
    }

    /// The VM's VMM, if metald started or adopted one.
    pub fn get(&self, vm: &VmId) -> Option<Arc<Supervised>> {
        self.map().get(vm).map(|e| Arc::clone(&e.process))
    }

    fn take(&self, vm: &VmId) -> Option<Entry> {
        self.map().remove(vm)
    }

    /// The control socket of the VM's VMM, only while it runs.
    pub fn control_socket(&self, vm: &VmId) -> Result<PathBuf, BackendError> {
        self.map()
            .get(vm)
            .filter(|e| e.process.alive())
            .map(|e| e.control.clone())
            .ok_or_else(|| BackendError::NotRunning(vm.clone()))
    }

    /// Info on the VM's VMM.
    pub fn info(&self, vm: &VmId) -> Option<VmmInfo> {
        self.get(vm).map(|p| VmmInfo {
            process: p.process,
            alive: p.alive(),
        })
    }

    /// Ends a VMM start: on success the VMM is recorded; if `setup` failed, the VMM is killed,
    /// its socket removed, and the error says whether the VMM had died by itself (with the
    /// end of its log) or setup failed.
    pub async fn finish_start(
        &self,
        launch: &VmLaunch,
        process: Arc<Supervised>,
        setup: Result<(), BackendError>,
    ) -> Result<VmmProcess, BackendError> {
        let socket = launch.control_socket();
        match setup {
            Ok(()) => {
                let started = process.process;
                self.insert(launch.vm_id.clone(), process, &socket);
                Ok(started)
            }
            Err(e) => {
                let status = process.kill_and_wait().await.unwrap_or_default();
                let _ignored = std::fs::remove_file(&socket);
                if status.starts_with("exit") {
                    return Err(BackendError::DiedDuringStart {
                        status,
                        log_tail: file_tail(&launch.vmm_log(), 2048),
                    });
                }
                Err(e)
            }
        }
    }

    /// Re-attaches to a recorded process if it still runs.
    pub fn adopt(&self, vm: &VmId, process: VmmProcess, control: &Path) -> bool {
        match Supervised::adopt(process, vm.clone(), self.events()) {
            Some(p) => {
                self.insert(vm.clone(), p, control);
                true
            }
            None => false,
        }
    }

    /// Stops the VM's VMM: for a graceful stop, `ask_guest` asks the guest to shut down and the
    /// VMM is killed if it is still there after the timeout.
    pub async fn stop<F>(
        &self,
        vm: &VmId,
        mode: StopMode,
        ask_guest: F,
    ) -> Result<StopOutcome, BackendError>
    where
        F: Future<Output = Result<(), BackendError>>,
    {
        let Some(entry) = self.take(vm) else {
            return Ok(StopOutcome::NotRunning);
        };
        let process = Arc::clone(&entry.process);
        if !process.alive() {
            return Ok(StopOutcome::NotRunning);
        }
        process.mark_requested();
        let outcome = match mode {
            StopMode::Force => None,
            StopMode::Graceful(timeout) => match ask_guest.await {
                Ok(()) => process.wait(timeout).await,
                Err(e) => {
                    tracing::warn!(vm_id = %vm, error = %Chain(&e), "asking the guest to stop failed; killing its VMM");
                    None
                }
            },
        };
        let outcome = match outcome {
            Some(_) => StopOutcome::Clean,
            None => {
                if let Err(e) = process.kill_and_wait().await {
                    // Keep tracking a VMM that would not die, so a later delete can retry.
                    self.map().insert(vm.clone(), entry);
                    return Err(e);
                }
                StopOutcome::Killed
            }
        };
        tracing::info!(vm_id = %vm, pid = process.process.pid, ?mode, ?outcome, "VMM stopped");
        Ok(outcome)
    }

    /// Sends the VM's VMM SIGKILL and forgets it, without waiting for it to be gone (its
    /// exit is still reaped and reported, as asked for). For a delete: the VM's sandbox
    /// release waits for its cgroup to be empty, off the caller's path.
    pub fn kill_now(&self, vm: &VmId) -> Result<(), BackendError> {
        let Some(entry) = self.take(vm) else {
            return Ok(());
        };
        if let Err(e) = entry.process.kill() {
            // Kept, so a retried delete can try again.
            self.map().insert(vm.clone(), entry);
            return Err(e);
        }
        tracing::info!(vm_id = %vm, pid = entry.process.process.pid, "VMM killed");
        Ok(())
    }

    /// Kills the VM's VMM at once, asking nothing of its guest (a VMM that is gone is fine).
    pub async fn kill(&self, vm: &VmId) -> Result<(), BackendError> {
        self.stop(vm, StopMode::Force, async { Ok(()) })
            .await
            .map(drop)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::process::tests::log;
    use std::process::Command;
    use std::time::Duration;

    /// A launch of a VM in `dir`, with no disks, network or jail.
    pub(crate) fn launch(dir: &Path) -> VmLaunch {
        VmLaunch {
            vm_id: VmId::generate(),
            dir: dir.to_path_buf(),
            control_dir: dir.to_path_buf(),
            vcpu_count: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            initrd: None,
            extra_kernel_args: String::new(),
            disks: vec![],
            net: None,
            jail: None,
            hold: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_vmm_that_dies_during_start_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let l = launch(dir.path());
        let (tx, _rx) = mpsc::unbounded_channel();
        let reg = Registry::new(tx);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'qemu: could not load kernel' >&2; exit 1"]);
        let p = Supervised::spawn(
            cmd,
            log(&l.vmm_log()),
            log(&l.vmm_log()),
            l.vm_id.clone(),
            reg.events(),
        )
        .unwrap();
        p.wait(Duration::from_secs(5)).await;
        std::fs::write(l.control_socket(), "").unwrap();
        let setup = Err(BackendError::NotRunning(l.vm_id.clone()));
        let err = reg.finish_start(&l, p, setup).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "VMM exited during start (exit status 1); its log ends: qemu: could not load kernel"
        );
        assert!(!l.control_socket().exists());
        assert!(reg.get(&l.vm_id).is_none());
    }

    #[tokio::test]
    async fn a_failed_setup_kills_the_vmm_and_a_good_one_records_it() {
        let dir = tempfile::tempdir().unwrap();
        let l = launch(dir.path());
        let (tx, _rx) = mpsc::unbounded_channel();
        let reg = Registry::new(tx);
        let sleeper = || {
            let mut cmd = Command::new("sleep");
            cmd.arg("60");
            cmd
        };
        let p = Supervised::spawn(
            sleeper(),
            log(&l.vmm_log()),
            log(&l.vmm_log()),
            l.vm_id.clone(),
            reg.events(),
        )
        .unwrap();
        let setup = Err(BackendError::Unsupported("bad config".into()));
        let err = reg
            .finish_start(&l, Arc::clone(&p), setup)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "bad config");
        assert!(!p.alive());

        let p = Supervised::spawn(
            sleeper(),
            log(&l.vmm_log()),
            log(&l.vmm_log()),
            l.vm_id.clone(),
            reg.events(),
        )
        .unwrap();
        let started = reg.finish_start(&l, Arc::clone(&p), Ok(())).await.unwrap();
        assert_eq!(started, p.process);
        assert_eq!(reg.control_socket(&l.vm_id).unwrap(), l.control_socket());
        // A graceful stop whose request fails falls back to killing.
        let outcome = reg
            .stop(
                &l.vm_id,
                StopMode::Graceful(Duration::from_secs(5)),
                async { Err(BackendError::NotRunning(l.vm_id.clone())) },
            )
            .await
            .unwrap();
        assert_eq!(outcome, StopOutcome::Killed);
        assert!(!p.alive());
        assert_eq!(
            reg.stop(&l.vm_id, StopMode::Force, async { Ok(()) })
                .await
                .unwrap(),
            StopOutcome::NotRunning
        );
    }
}
