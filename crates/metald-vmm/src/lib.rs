//! VMM backends: one VMM process per VM, behind one [`Backend`] trait.
//!
//! Backends own the VMM process (spawn, control API, signals) and the files the VMM makes in the
//! VM's directory (sockets, logs). The service owns the directory itself, the disks in it, and
//! every state decision. A VMM that exits without being asked is reported on the exit channel.

pub mod console;
pub use console::file_tail;
pub mod firecracker;
#[doc(hidden)]
pub mod fuzzing;
pub mod process;
pub mod qemu;
pub mod registry;
pub mod vm_dir;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::VmId;
use crate::jailer::JailPlan;
use crate::network::VmNetworkPlan;
pub use metald_domain::domain::BackendKind;
use metald_domain::{domain, report};
use metald_host::{jailer, network, spawner};
pub use process::{ExitEvent, VmmProcess};

/// File names inside a VM's directory, shared by every backend.
pub mod files {
    /// The guest's serial console output.
    pub const CONSOLE_LOG: &str = "console.log";
    /// The VMM's own log (stderr and its logger).
    pub const VMM_LOG: &str = "vmm.log";
    /// The VMM's control socket (Firecracker API or QMP).
    pub const CONTROL_SOCKET: &str = "control.sock";
    /// A suspended guest's device state (Firecracker's snapshot state, QEMU's migration
    /// stream).
    pub const SUSPEND_STATE: &str = "suspend.state";
    /// A suspended guest's memory (Firecracker); QEMU keeps it in its migration stream.
    pub const SUSPEND_MEMORY: &str = "suspend.mem";
    /// A snapshot's device state (in the snapshot's directory; a VMM that writes by path
    /// stages it in the VM's directory under the same name).
    pub const SNAPSHOT_STATE: &str = "snapshot.state";
    /// A snapshot's memory (Firecracker), likewise.
    pub const SNAPSHOT_MEMORY: &str = "snapshot.mem";
}

/// Longest path a Unix socket can have (sun_path, with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// One disk given to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Name of the drive (the root disk is "rootfs").
    pub id: String,
    /// Image file on the host.
    pub path: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
}

/// Everything a backend needs to start a VM's VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLaunch {
    /// The VM.
    pub vm_id: VmId,
    /// The VM's own directory; the VMM runs with it as working directory.
    pub dir: PathBuf,
    /// Where the VMM makes its control socket: `dir` for an unjailed VMM, a directory the
    /// VM's uid cannot write once the socket is made for a jailed one.
    pub control_dir: PathBuf,
    /// vCPUs.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd, if any.
    pub initrd: Option<PathBuf>,
    /// Caller's extra kernel arguments, appended to the backend's own.
    pub extra_kernel_args: String,
    /// Disks, root first.
    pub disks: Vec<Disk>,
    /// The guest's network interface, if it has one.
    pub net: Option<VmNetworkPlan>,
    /// The jail the VMM runs in; `None` runs it directly (isolation off).
    pub jail: Option<JailPlan>,
    /// The start's hold on the warm pools' refills: a backend releases it once its VMM's TAP
    /// is open, what is left of the start taking none of the locks a refill does.
    pub hold: metald_host::starts::StartHold,
}

impl VmLaunch {
    /// Path of the VMM's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.control_dir.join(files::CONTROL_SOCKET)
    }

    /// Readies the control directory for a new VMM, just before it starts: the old socket
    /// goes, and a jailed VMM's directory is handed to the VM's uid.
    pub fn open_control_dir(&self) -> Result<(), BackendError> {
        match &self.jail {
            Some(jail) => jail.open_control_dir().map_err(BackendError::Jail),
            None => vm_dir::VmDir::open(&self.control_dir)?.remove(files::CONTROL_SOCKET),
        }
    }

    /// Once the VMM made its socket: a jailed VMM's control directory is taken back from the
    /// VM's uid (see [`JailPlan::seal_control_dir`]).
    pub fn seal_control_dir(&self) -> Result<(), BackendError> {
        match &self.jail {
            Some(jail) => jail.seal_control_dir().map_err(BackendError::Jail),
            None => Ok(()),
        }
    }

    /// Path of the console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join(files::CONSOLE_LOG)
    }

    /// Path of the VMM log.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join(files::VMM_LOG)
    }

    /// Starts `binary args…` for this VM (see [`VmLaunch::command`]), with stdout and stderr
    /// to the given files, and supervises it. A jailed start goes through the jail's spawner
    /// ([`JailPlan::spawn`]), whose cost does not grow with the descriptors metald holds; if
    /// the spawner itself fails, metald starts the command itself.
    pub async fn spawn(
        &self,
        binary: &Path,
        args: Vec<String>,
        stdout: std::fs::File,
        stderr: std::fs::File,
        events: tokio::sync::mpsc::UnboundedSender<process::ExitEvent>,
    ) -> Result<std::sync::Arc<process::Supervised>, BackendError> {
        if let Some(jail) = &self.jail {
            match jail
                .spawn(binary, args.clone(), &self.dir, &stdout, &stderr)
                .await
            {
                Ok(pid) => return process::Supervised::child(pid, self.vm_id.clone(), events),
                Err(e @ spawner::SpawnError::Spawner { .. }) => {
                    tracing::warn!(vm_id = %self.vm_id, error = %report::Chain(&e), "starting the jail through the spawner failed; starting it directly");
                }
                Err(e) => {
                    return Err(BackendError::Spawn {
                        binary: binary.to_path_buf(),
                        source: std::io::Error::other(e),
                    })
                }
            }
        }
        process::Supervised::spawn(
            self.command(binary, args),
            stdout,
            stderr,
            self.vm_id.clone(),
            events,
        )
    }

    /// The command that starts `binary args…` for this VM: through the jailer when the VM has
    /// a jail, directly otherwise. Runs in the VM's directory either way.
    pub fn command(&self, binary: &Path, args: Vec<String>) -> Command {
        let mut cmd = match &self.jail {
            Some(jail) => jail.command(binary, args),
            None => {
                let mut c = Command::new(binary);
                c.args(args);
                c
            }
        };
        cmd.current_dir(&self.dir);
        cmd
    }
}

/// What a new VMM process is started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// Configure the VM and boot its guest.
    Boot,
    /// Load the VM's suspended state and run its guest again.
    Wake,
    /// Load the snapshot a new VM was created from (placed in its directory as a suspended
    /// state) and run that guest: the VM's first start.
    Restore,
}

impl StartKind {
    /// Stable name, for logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Boot => "boot",
            StartKind::Wake => "wake",
            StartKind::Restore => "restore",
        }
    }
}

/// How to stop a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Ask the guest (Ctrl-Alt-Del) and kill the VMM if it is not gone within the timeout.
    Graceful(Duration),
    /// Kill the VMM at once.
    Force,
}

/// How a stop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest shut down by itself within the timeout.
    Clean,
    /// The VMM had to be killed.
    Killed,
    /// No VMM was running.
    NotRunning,
}

/// What a backend knows about a running VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmInfo {
    /// The process.
    pub process: VmmProcess,
    /// Whether the VMM process is still alive.
    pub alive: bool,
}

/// Errors from backends.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The VMM binary could not be started.
    #[error("start {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file of the VM could not be prepared.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM's control API refused a request or did not answer.
    #[error("VMM API {request}: {reason}")]
    Api {
        /// The request.
        request: String,
        /// What went wrong.
        reason: String,
    },
    /// The VMM exited while it was being set up.
    #[error("VMM exited during start ({status}); its log ends: {log_tail}")]
    DiedDuringStart {
        /// Exit status.
        status: String,
        /// Last lines of the VMM log.
        log_tail: String,
    },
    /// The operation needs a running VMM and there is none.
    #[error("no VMM is running for {0}")]
    NotRunning(VmId),
    /// A process-level operation failed.
    #[error("{op} VMM process {pid}")]
    Process {
        /// What was being done.
        op: &'static str,
        /// The process.
        pid: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not possible for this VMM.
    #[error("{0}")]
    Unsupported(String),
    /// The VMM's control directory in its jail could not be readied or sealed.
    #[error("control directory")]
    Jail(#[source] jailer::JailError),
}

/// What a VMM reported about its own VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmMetrics {
    /// The record as the VMM gave it (JSON), kept for operators.
    pub raw: String,
    /// Disk read requests the guest made: since the VMM started (QEMU), or since metald began
    /// reading its metrics (Firecracker, whose flushes carry deltas).
    pub block_read_ops: u64,
    /// Disk write requests, likewise.
    pub block_write_ops: u64,
}

/// A VMM driver. One VMM process per VM.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Which VMM this is.
    fn kind(&self) -> BackendKind;

    /// Most vCPUs one VM may have on this VMM.
    fn max_vcpus(&self) -> u32;

    /// Whether VMMs can be started now (the binary is still there and executable).
    fn ready(&self) -> Result<(), NotReady> {
        Ok(())
    }

    /// Prepares the VMM's files in the VM's directory; starts nothing.
    async fn create(&self, launch: &VmLaunch) -> Result<(), BackendError>;

    /// Starts the VMM and boots the guest; returns once the guest's vCPUs run.
    async fn boot(&self, launch: &VmLaunch) -> Result<VmmProcess, BackendError>;

    /// Freezes the guest's vCPUs.
    async fn pause(&self, vm: &VmId) -> Result<(), BackendError>;

    /// Unfreezes the guest's vCPUs.
    async fn resume(&self, vm: &VmId) -> Result<(), BackendError>;

    /// Stops the guest and its VMM.
    async fn shutdown(&self, vm: &VmId, mode: StopMode) -> Result<StopOutcome, BackendError>;

    /// Saves the running (or paused) guest's memory and device state into the VM's directory
    /// `dir` ([`files::SUSPEND_STATE`], [`files::SUSPEND_MEMORY`]) and ends its VMM. On error
    /// the VMM may still run, paused or not; the caller checks with [`Backend::info`].
    async fn suspend(&self, vm: &VmId, dir: &Path) -> Result<(), BackendError>;

    /// Writes the paused guest's memory and device state into the snapshot directory `out`
    /// ([`files::SNAPSHOT_STATE`], [`files::SNAPSHOT_MEMORY`] where the VMM keeps memory apart),
    /// metald's own; `dir` is the VM's directory, where a VMM that writes by path stages them.
    /// The guest stays paused; its disks are the caller's to copy before it runs again.
    /// `owner_paused`: its owner paused it (it is to stay paused after), rather than the caller
    /// for the snapshot.
    async fn snapshot(
        &self,
        vm: &VmId,
        dir: &Path,
        out: &Path,
        owner_paused: bool,
    ) -> Result<(), BackendError> {
        let _ = (vm, dir, out, owner_paused);
        Err(BackendError::Unsupported(format!(
            "{} cannot snapshot a running VM",
            self.kind().as_str()
        )))
    }

    /// Starts a new VMM that runs the guest saved by [`Backend::suspend`] again, with the
    /// same disks and (through `launch.net`) its network; returns once its vCPUs run.
    async fn wake(&self, launch: &VmLaunch) -> Result<VmmProcess, BackendError>;

    /// Stops the guest and boots it again in a fresh VMM process.
    async fn reboot(&self, launch: &VmLaunch, mode: StopMode) -> Result<VmmProcess, BackendError> {
        self.shutdown(&launch.vm_id, mode).await?;
        self.boot(launch).await
    }

    /// The VMM's own view of its VM: the records it wrote by itself since the last call
    /// (Firecracker: every 60 s and as it exits), or with `ask`, when it wrote none, one asked
    /// for now (Firecracker: a metrics flush; QEMU: its block statistics). `None` when there
    /// is nothing new or the VMM has no such view.
    async fn vmm_metrics(&self, vm: &VmId, ask: bool) -> Result<Option<VmmMetrics>, BackendError> {
        let _ = (vm, ask);
        Ok(None)
    }

    /// Sends any VMM of the VM SIGKILL, without waiting for it to be gone (the VM's sandbox
    /// release waits for its cgroup to empty), and removes the VMM's files from its directory.
    async fn delete(&self, vm: &VmId, dir: &Path) -> Result<(), BackendError>;

    /// What is known about the VM's VMM, if one was started or adopted.
    async fn info(&self, vm: &VmId) -> Option<VmmInfo>;

    /// Re-attaches to a VMM that outlived a previous metald; false if it is gone.
    async fn adopt(&self, launch: &VmLaunch, process: VmmProcess) -> Result<bool, BackendError>;
}

/// Why a backend cannot start VMMs now.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The VMM binary is missing or not executable.
    #[error("{name} binary {} is not executable", path.display())]
    NotExecutable {
        /// The VMM ("QEMU", "Firecracker").
        name: &'static str,
        /// Where its binary should be.
        path: PathBuf,
    },
}

/// Readiness of a backend whose VMM is the executable at `binary` (`name` for the message).
pub fn binary_ready(name: &'static str, binary: &Path) -> Result<(), NotReady> {
    if metald_host::probe::is_executable(binary) {
        Ok(())
    } else {
        Err(NotReady::NotExecutable {
            name,
            path: binary.to_path_buf(),
        })
    }
}

/// Removes the VMM's files from a VM directory (missing ones are fine; a symlink the VMM put
/// in place of one is removed itself).
pub fn remove_vmm_files(dir: &Path) -> Result<(), BackendError> {
    let dir = match vm_dir::VmDir::open(dir) {
        Ok(d) => d,
        Err(BackendError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    for name in [files::CONTROL_SOCKET, files::CONSOLE_LOG, files::VMM_LOG] {
        dir.remove(name)?;
    }
    Ok(())
}

/// Creates (or keeps) the console and VMM log files so readers never race their creation, and
/// opens them for the VMM's stdout and stderr: (console, VMM log). Anything but a regular file
/// at either name is replaced, never followed.
pub fn open_logs(launch: &VmLaunch) -> Result<(std::fs::File, std::fs::File), BackendError> {
    let dir = vm_dir::VmDir::open(&launch.dir)?;
    Ok((
        dir.append_replacing(files::CONSOLE_LOG)?,
        dir.append_replacing(files::VMM_LOG)?,
    ))
}
