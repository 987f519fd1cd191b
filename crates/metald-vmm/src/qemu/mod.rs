//! The QEMU backend: one `qemu-system-x86_64` process per VM, driven through QMP.
//!
//! With hardware KVM it runs the `microvm` machine (virtio-mmio devices found through ACPI),
//! the closest QEMU gets to Firecracker. Without it, it runs `q35` under TCG with PCI virtio
//! devices: measured on kvm-pvm hosts, microvm under TCG hung during early boot in 25-60 % of
//! runs while q35 hung in none of 22.

pub mod qmp;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::mpsc;

use self::qmp::Qmp;
use super::process::{ExitEvent, VmmProcess};
use super::registry::Registry;
use super::{
    open_logs, remove_vmm_files, Backend, BackendError, BackendKind, StartKind, StopMode,
    StopOutcome, VmLaunch, VmmInfo, VmmMetrics,
};
use crate::domain::VmId;

/// QEMU's vCPU limit for the machines metald uses (no x2APIC/IOMMU set-up).
pub const MAX_VCPUS: u32 = 255;

/// How long QEMU may take to open its QMP socket.
const QMP_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Drives QEMU.
pub struct QemuBackend {
    binary: PathBuf,
    accel: Accel,
    registry: Registry,
}

impl QemuBackend {
    /// A backend running `binary` with `accel`, reporting VMM exits on `events`.
    pub fn new(binary: PathBuf, accel: Accel, events: mpsc::UnboundedSender<ExitEvent>) -> Self {
        Self {
            binary,
            accel,
            registry: Registry::new(events),
        }
    }

    fn qmp_for(&self, vm: &VmId) -> Result<Qmp, BackendError> {
        Ok(Qmp::new(&self.registry.control_socket(vm)?))
    }
}

/// Read and write requests the guest made, summed over its drives, from a `query-blockstats`
/// reply. Each entry's `stats` are the device's as the guest sees it; its `parent` (the image
/// file's protocol layer) is not added again. Counters run from QEMU's start.
pub fn block_ops(stats: &serde_json::Value) -> (u64, u64) {
    let n = |d: &serde_json::Value, k: &str| d["stats"][k].as_u64().unwrap_or(0);
    stats.as_array().map_or((0, 0), |drives| {
        drives.iter().fold((0, 0), |(r, w), d| {
            // Saturating: a QEMU taken over by its guest must not make the sum panic or wrap.
            (
                r.saturating_add(n(d, "rd_operations")),
                w.saturating_add(n(d, "wr_operations")),
            )
        })
    })
}

/// QEMU's command line for a VM (without the binary). The guest's kernel arguments are part of
/// the guest contract, `guest/README.md`.
pub fn command_args(launch: &VmLaunch, accel: Accel) -> Vec<String> {
    let (machine, cpu, blk, root, extra_args) = match accel {
        // acpi=on so the guest finds the virtio-mmio devices through ACPI, as on Firecracker.
        Accel::Kvm => (
            "microvm,acpi=on",
            "host",
            "virtio-blk-device",
            "/dev/vda",
            "",
        ),
        Accel::Tcg => ("q35", "max", "virtio-blk-pci", "/dev/vda", ""),
    };
    let mut kernel_args = format!("console=ttyS0 root={root} rw panic=-1{extra_args}");
    if !launch.extra_kernel_args.is_empty() {
        kernel_args.push(' ');
        kernel_args.push_str(&launch.extra_kernel_args);
    }
    let mut args: Vec<String> = [
        "-name",
        launch.vm_id.as_str(),
        "-machine",
        machine,
        "-accel",
        accel.as_str(),
        "-cpu",
        cpu,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        // QEMU's own seccomp filter, on top of the jail: a guest that takes QEMU over cannot
        // exec, raise privileges, change scheduling or resource limits, or use obsolete calls.
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut push = |a: &str, b: String| {
        args.push(a.to_string());
        args.push(b);
    };
    push("-smp", launch.vcpu_count.to_string());
    push("-m", format!("{}M", launch.memory_mib));
    push("-kernel", launch.kernel.display().to_string());
    if let Some(initrd) = &launch.initrd {
        push("-initrd", initrd.display().to_string());
    }
    push("-append", kernel_args);
    // The serial console goes to the console log, appended across reboots.
    push(
        "-chardev",
        format!(
            "file,id=console,path={},append=on",
            launch.console_log().display()
        ),
    );
    push("-serial", "chardev:console".into());
    push(
        "-qmp",
        format!(
            "unix:{},server=on,wait=off",
            launch.control_socket().display()
        ),
    );
    for disk in &launch.disks {
        let ro = if disk.read_only { ",readonly=on" } else { "" };
        push(
            "-drive",
            format!(
                "file={},format=raw,if=none,id={},cache=none,aio=threads{ro}",
                qemu_escape(&disk.path.display().to_string()),
                disk.id
            ),
        );
        push("-device", format!("{blk},drive={}", disk.id));
    }
    if let Some(net) = &launch.net {
        // The TAP was made by the jailer, owned by the VM's uid; QEMU only attaches to it.
        push(
            "-netdev",
            format!(
                "tap,id=net0,ifname={},script=no,downscript=no,vhost=off",
                net.tap
            ),
        );
        let nic = match accel {
            Accel::Kvm => "virtio-net-device",
            // No option ROM: the guest boots from -kernel, never from the network.
            Accel::Tcg => "virtio-net-pci,romfile=",
        };
        push("-device", format!("{nic},netdev=net0,mac={}", net.mac));
    }
    args
}

/// Escapes a value for QEMU's comma-separated option syntax (a literal comma is doubled).
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

#[async_trait]
impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn max_vcpus(&self) -> u32 {
        MAX_VCPUS
    }

    fn ready(&self) -> Result<(), super::NotReady> {
        super::binary_ready("QEMU", &self.binary)
    }

    async fn create(&self, launch: &VmLaunch) -> Result<(), BackendError> {
        open_logs(launch).map(drop)
    }

    async fn boot(&self, launch: &VmLaunch) -> Result<VmmProcess, BackendError> {
        self.start(launch, StartKind::Boot).await
    }

    async fn suspend(&self, vm: &VmId, dir: &Path) -> Result<(), BackendError> {
        let qmp = self.qmp_for(vm)?;
        qmp.execute("stop", None).await?;
        // The whole machine (memory and devices) streamed into one file as a migration: made
        // by metald in the VM's directory and handed to QEMU as a descriptor (QEMU 7.2 has no
        // `file:` migration, and a path would be QEMU's to resolve).
        let file = crate::vm_dir::VmDir::open(dir)?.create_new(crate::files::SUSPEND_STATE)?;
        qmp.execute_with_fd(
            file.as_fd(),
            "suspend",
            "migrate",
            Some(json!({ "uri": "fd:suspend" })),
        )
        .await?;
        wait_migration(&qmp).await?;
        // Saved: the stopped QEMU has nothing left to do.
        self.registry.kill(vm).await
    }

    async fn wake(&self, launch: &VmLaunch) -> Result<VmmProcess, BackendError> {
        self.start(launch, StartKind::Wake).await
    }

    async fn snapshot(
        &self,
        vm: &VmId,
        _dir: &Path,
        out: &Path,
        owner_paused: bool,
    ) -> Result<(), BackendError> {
        if owner_paused {
            // Measured: after a completed migration QEMU 7.2 refuses the next one ("Can't
            // migrate the vm that was paused due to previous migration") until `cont` runs the
            // guest, which a paused VM must not do.
            return Err(BackendError::Unsupported(
                "QEMU cannot snapshot a PAUSED VM and keep it paused (it could not be suspended \
                 or snapshotted again until it ran): resume it first, or suspend it and snapshot \
                 the SUSPENDED VM"
                    .into(),
            ));
        }
        let qmp = self.qmp_for(vm)?;
        qmp.execute("stop", None).await?;
        // The suspend's migration, into metald's snapshot directory by descriptor; the
        // stopped QEMU then takes `cont` (which takes its disks back) once they are copied.
        let file = crate::vm_dir::VmDir::open(out)?.create_new(crate::files::SNAPSHOT_STATE)?;
        qmp.execute_with_fd(
            file.as_fd(),
            "snapshot",
            "migrate",
            Some(json!({ "uri": "fd:snapshot" })),
        )
        .await?;
        wait_migration(&qmp).await
    }

    async fn pause(&self, vm: &VmId) -> Result<(), BackendError> {
        self.qmp_for(vm)?.execute("stop", None).await.map(drop)
    }

    async fn resume(&self, vm: &VmId) -> Result<(), BackendError> {
        self.qmp_for(vm)?.execute("cont", None).await.map(drop)
    }

    async fn shutdown(&self, vm: &VmId, mode: StopMode) -> Result<StopOutcome, BackendError> {
        let qmp = self.qmp_for(vm);
        let ask = async move {
            let qmp = qmp?;
            // A paused guest cannot react to the key press.
            qmp.execute("cont", None).await?;
            // Ctrl-Alt-Del on the i8042 keyboard, the same signal Firecracker sends; the guest
            // reboots, and -no-reboot turns that into QEMU exiting.
            let keys = json!({"keys": [
                {"type": "qcode", "data": "ctrl"},
                {"type": "qcode", "data": "alt"},
                {"type": "qcode", "data": "delete"}
            ]});
            qmp.execute("send-key", Some(keys)).await.map(drop)
        };
        self.registry.stop(vm, mode, ask).await
    }

    async fn vmm_metrics(&self, vm: &VmId, ask: bool) -> Result<Option<VmmMetrics>, BackendError> {
        // QEMU keeps no record of its own: there is only what it is asked for.
        if !ask {
            return Ok(None);
        }
        let stats = self.qmp_for(vm)?.execute("query-blockstats", None).await?;
        let (block_read_ops, block_write_ops) = block_ops(&stats);
        Ok(Some(VmmMetrics {
            raw: stats.to_string(),
            block_read_ops,
            block_write_ops,
        }))
    }

    async fn delete(&self, vm: &VmId, dir: &Path) -> Result<(), BackendError> {
        self.registry.kill_now(vm)?;
        remove_vmm_files(dir)
    }

    async fn info(&self, vm: &VmId) -> Option<VmmInfo> {
        self.registry.info(vm)
    }

    async fn adopt(&self, launch: &VmLaunch, process: VmmProcess) -> Result<bool, BackendError> {
        Ok(self
            .registry
            .adopt(&launch.vm_id, process, &launch.control_socket()))
    }
}

impl QemuBackend {
    /// Starts a QEMU for the VM and either boots its guest or loads the state it was suspended
    /// with and runs it again.
    async fn start(&self, launch: &VmLaunch, how: StartKind) -> Result<VmmProcess, BackendError> {
        // The console goes to its file through QEMU's chardev; stdout and stderr are its log.
        let (_console, log) = open_logs(launch)?;
        let socket = launch.control_socket();
        launch.open_control_dir()?;
        let mut args = command_args(launch, self.accel);
        if how != StartKind::Boot {
            // Waits for the state to be given over QMP instead of running the guest.
            args.extend(["-incoming".to_string(), "defer".to_string()]);
        }
        let stderr = log.try_clone().map_err(|source| BackendError::Io {
            op: "duplicate",
            path: launch.vmm_log(),
            source,
        })?;
        let process = launch
            .spawn(&self.binary, args, log, stderr, self.registry.events())
            .await?;
        let qmp = Qmp::new(&socket);
        let ready = async {
            let mut status = qmp.wait_ready(QMP_READY_TIMEOUT).await?;
            // QEMU runs a booting guest from the start: the socket's directory is sealed
            // within moments of the socket being made, while the guest's firmware or kernel
            // is still starting (a waking guest waits for its state).
            launch.seal_control_dir()?;
            if how != StartKind::Boot {
                let file = crate::vm_dir::VmDir::open(&launch.dir)?
                    .open_read(crate::files::SUSPEND_STATE)?;
                qmp.execute_with_fd(
                    file.as_fd(),
                    "suspend",
                    "migrate-incoming",
                    Some(json!({ "uri": "fd:suspend" })),
                )
                .await?;
                wait_migration(&qmp).await?;
                // It was stopped when saved, so it arrives stopped.
                qmp.execute("cont", None).await?;
                status = qmp.query_status().await?;
            }
            if status == "running" {
                Ok(())
            } else {
                Err(BackendError::Api {
                    request: "QMP query-status".into(),
                    reason: format!("guest is {status}, not running"),
                })
            }
        };
        let setup = ready.await;
        self.registry.finish_start(launch, process, setup).await
    }
}

/// Longest a migration to or from a file may take (the guest's whole memory is written).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Polls `query-migrate` until the migration in either direction completed; its failure, or
/// no end within [`MIGRATION_TIMEOUT`], is an error.
async fn wait_migration(qmp: &Qmp) -> Result<(), BackendError> {
    let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(BackendError::Api {
                    request: "QMP query-migrate".into(),
                    reason: info["error-desc"]
                        .as_str()
                        .unwrap_or("migration failed")
                        .chars()
                        .take(512)
                        .collect(),
                })
            }
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(BackendError::Api {
                    request: "QMP query-migrate".into(),
                    reason: format!("not done within {MIGRATION_TIMEOUT:?}"),
                })
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Disk;

    fn launch() -> VmLaunch {
        VmLaunch {
            vm_id: VmId::generate(),
            dir: "/data/vms/x".into(),
            control_dir: "/data/vms/x".into(),
            vcpu_count: 2,
            memory_mib: 256,
            kernel: "/a/k".into(),
            initrd: Some("/a/i".into()),
            extra_kernel_args: "quiet".into(),
            disks: vec![
                Disk {
                    id: "rootfs".into(),
                    path: "/data/vms/x/rootfs,1.img".into(),
                    read_only: false,
                },
                Disk {
                    id: "data".into(),
                    path: "/a/d".into(),
                    read_only: true,
                },
            ],
            net: None,
            jail: None,
            hold: Default::default(),
        }
    }

    #[test]
    fn block_ops_sum_the_drives_not_their_image_layers() {
        // Trimmed from QEMU 7.2's reply for a VM with a root and a scratch drive.
        let reply = json!([
            {"device": "", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
             "stats": {"rd_operations": 120, "wr_operations": 0, "rd_bytes": 2_000_000},
             "parent": {"stats": {"rd_operations": 999, "wr_operations": 999}}},
            {"device": "", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
             "stats": {"rd_operations": 3, "wr_operations": 70}}
        ]);
        assert_eq!(block_ops(&reply), (123, 70));
        assert_eq!(block_ops(&json!({})), (0, 0));
        let past_u64 = json!([
            {"stats": {"rd_operations": u64::MAX, "wr_operations": 1}},
            {"stats": {"rd_operations": 1, "wr_operations": u64::MAX}}
        ]);
        assert_eq!(block_ops(&past_u64), (u64::MAX, u64::MAX));
    }

    #[test]
    fn tcg_uses_q35_and_pci_virtio() {
        let args = command_args(&launch(), Accel::Tcg).join(" ");
        assert!(args.contains("-machine q35 -accel tcg"), "{args}");
        assert!(
            args.contains("-device virtio-blk-pci,drive=rootfs"),
            "{args}"
        );
        assert!(
            args.contains("file=/data/vms/x/rootfs,,1.img,format=raw"),
            "{args}"
        );
        assert!(
            args.contains("id=data,cache=none,aio=threads,readonly=on"),
            "{args}"
        );
        assert!(
            args.contains("-append console=ttyS0 root=/dev/vda rw panic=-1 quiet"),
            "{args}"
        );
        assert!(args.contains("-no-reboot"), "{args}");
        assert!(args.contains("-smp 2 -m 256M"), "{args}");
        assert!(
            args.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{args}"
        );
    }

    #[test]
    fn kvm_uses_microvm_with_acpi() {
        let args = command_args(&launch(), Accel::Kvm).join(" ");
        assert!(
            args.contains("-machine microvm,acpi=on -accel kvm -cpu host"),
            "{args}"
        );
        assert!(
            args.contains("-device virtio-blk-device,drive=rootfs"),
            "{args}"
        );
    }
}
