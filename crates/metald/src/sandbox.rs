//! A VM run's sandbox: its network ([`crate::network`]) and its jail ([`crate::jailer`]),
//! set up before the VMM starts and removed once it is gone, whatever the reason (shutdown,
//! crash, failed boot, delete).

use std::collections::HashSet;
use std::path::PathBuf;

use crate::backend::VmLaunch;
use crate::domain::{VmId, VmRecord};
use crate::jailer::{JailError, JailRequest, Jailer};
use crate::network::ipam::AllocationPlan;
use crate::network::{Network, NetworkError};
use crate::report::Chain;

/// Errors setting up a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Networking failed.
    #[error("network")]
    Network(#[from] NetworkError),
    /// The jail failed.
    #[error("jail")]
    Jail(#[from] JailError),
    /// The VM has no jail slot (made before isolation was on).
    #[error("VM {0} has no jail slot; delete and re-create it")]
    NotAllocated(VmId),
}

/// Sets up and removes sandboxes.
pub struct Sandboxes {
    jailer: Jailer,
    network: Network,
    plan: AllocationPlan,
}

impl Sandboxes {
    /// Sandboxes from a jailer and a network, allocating by `plan`.
    pub fn new(jailer: Jailer, network: Network, plan: AllocationPlan) -> Self {
        Self {
            jailer,
            network,
            plan,
        }
    }

    /// What each new VM is allocated.
    pub fn allocation(&self) -> &AllocationPlan {
        &self.plan
    }

    /// The jailer.
    pub fn jailer(&self) -> &Jailer {
        &self.jailer
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Makes the VM's network and jail and puts them into `launch`. Nothing is left behind on
    /// failure.
    pub async fn setup(&self, vm: &VmRecord, launch: &mut VmLaunch) -> Result<(), SandboxError> {
        let t0 = std::time::Instant::now();
        let net = self.network.setup(vm).await?;
        let network_ms = t0.elapsed().as_secs_f64() * 1000.0;
        launch.net = Some(net);
        if let Err(e) = self.attach_jail(vm, launch) {
            self.release(vm).await;
            return Err(e);
        }
        tracing::debug!(vm_id = %vm.id, network_ms, jail_ms = t0.elapsed().as_secs_f64() * 1000.0 - network_ms, "sandbox ready");
        Ok(())
    }

    /// For a VM whose network is already up (a reboot): fills `launch` with it and a new jail.
    pub fn attach(&self, vm: &VmRecord, launch: &mut VmLaunch) -> Result<(), SandboxError> {
        launch.net = Some(self.network.plan(vm)?);
        self.attach_jail(vm, launch)
    }

    fn attach_jail(&self, vm: &VmRecord, launch: &mut VmLaunch) -> Result<(), SandboxError> {
        let slot = vm
            .net
            .as_ref()
            .map(|n| n.slot)
            .ok_or_else(|| SandboxError::NotAllocated(vm.id.clone()))?;
        if let Some(net) = &launch.net {
            let args = net.kernel_args();
            launch.extra_kernel_args = if launch.extra_kernel_args.is_empty() {
                args
            } else {
                format!("{args} {}", launch.extra_kernel_args)
            };
        }
        let mut read_only: Vec<PathBuf> = vec![launch.kernel.clone()];
        read_only.extend(launch.initrd.iter().cloned());
        read_only.extend(
            launch
                .disks
                .iter()
                .filter(|d| !d.path.starts_with(&launch.dir))
                .map(|d| d.path.clone()),
        );
        let owned = launch
            .disks
            .iter()
            .filter(|d| d.path.starts_with(&launch.dir))
            .map(|d| d.path.clone())
            .chain([launch.console_log(), launch.vmm_log()])
            .collect();
        let jail = self.jailer.prepare(&JailRequest {
            vm_id: &vm.id,
            slot,
            vcpu_count: launch.vcpu_count,
            memory_mib: launch.memory_mib,
            dir: &launch.dir,
            read_only,
            owned,
            net: launch.net.as_ref(),
        })?;
        launch.jail = Some(jail);
        Ok(())
    }

    /// Removes everything the VM's run had. Best effort: each failure is logged, the rest is
    /// still removed.
    pub async fn release(&self, vm: &VmRecord) {
        if let Err(e) = self.network.teardown(vm).await {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "removing the VM's network failed");
        }
        if let Err(e) = self.jailer.release(&vm.id) {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "removing the VM's jail failed");
        }
    }

    /// Takes over the sandbox of a VMM that outlived a metald restart.
    pub async fn adopt(&self, vm: &VmRecord) -> Result<(), SandboxError> {
        Ok(self.network.adopt(vm).await?)
    }

    /// At start: removes every namespace, interface, cgroup and jail of VMs not in `keep`.
    pub async fn sweep(&self, keep: &HashSet<VmId>) -> Result<(), SandboxError> {
        self.jailer.sweep(keep);
        Ok(self.network.sweep(keep).await?)
    }
}
