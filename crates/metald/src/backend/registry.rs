//! The running VMMs of one backend, and the stop procedure every backend shares.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::process::{ExitEvent, Supervised, VmmProcess};
use super::{BackendError, StopMode, StopOutcome, VmmInfo};
use crate::domain::VmId;

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
                    tracing::warn!(vm_id = %vm, error = %e, "asking the guest to stop failed; killing its VMM");
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
}
