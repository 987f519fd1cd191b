//! The integrated jailer: every VMM runs in its own chroot, network namespace and cgroup, as
//! its own uid/gid, with no capabilities.
//!
//! metald (host side, [`Jailer`]) prepares what outlives one process: the cgroup with its
//! limits, the chroot directory, the ownership of the VM's files. Then the backend starts
//! `metald-jail SPEC` instead of the VMM: a fresh single-threaded process ([`child`]) that
//! enters the namespace, makes the TAP, joins the cgroup, pivots into the chroot, drops to the
//! VM's uid/gid and execs the VMM. Namespace changes never happen on a tokio thread, and
//! nothing runs after a fork of the async runtime except the exec of `metald-jail` itself.
//!
//! Inside the chroot every file sits at its host path (bind-mounted, read-only unless it is
//! the VM's own directory), so the VMM's command line is the same jailed or not.

pub mod cgroup;
pub mod child;
mod mntns;
pub mod tap;
pub mod warm;

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use self::cgroup::{CgroupError, Cgroups, Limits};
use self::warm::{AssignedNet, Assignment, Warm, WarmJails, WarmSpec};
use crate::domain::BackendKind;
use crate::domain::{RateLimit, VmId};
use crate::network::VmNetworkPlan;
use crate::report::Chain;

/// A file or directory bind-mounted into the jail at its host path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailMount {
    /// Host path (and path inside the jail).
    pub path: PathBuf,
    /// Mounted read-write (only the VM's own directory).
    pub writable: bool,
}

/// A character device node made inside the jail, owned by the VM's uid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailDevice {
    /// Path inside the jail.
    pub path: PathBuf,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

/// Network set-up the jailer does inside the VM's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailNet {
    /// The namespace file to enter.
    pub netns: PathBuf,
    /// TAP to create.
    pub tap: String,
    /// Bridge joining the TAP and the veth end.
    pub bridge: String,
    /// The veth end already moved into the namespace.
    pub peer_if: String,
    /// The `tc` binary, for rate limits.
    pub tc_bin: PathBuf,
    /// `tc` invocations (rate limits for VMMs without their own limiter).
    pub tc: Vec<Vec<String>>,
}

/// Who the VMM runs as and what it runs: the VM's own part of a jail, the same in a jail built
/// at boot ([`JailSpec`]) and in a warm jail's [`warm::Assignment`] (flattened into both, so
/// each stays one flat JSON object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmRun {
    /// The VM (for messages).
    pub vm_id: String,
    /// The VM's uid.
    pub uid: u32,
    /// The VM's gid.
    pub gid: u32,
    /// The VMM binary (a host path, mounted at the same path).
    pub exec: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment (nothing else is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory inside the jail.
    pub workdir: PathBuf,
    /// The VM's directory, handed to the VM's uid (its group stays metald's).
    pub owned_dir: PathBuf,
    /// The VM's own files in it (disk copies, logs), handed to the VM's uid.
    pub owned_files: Vec<PathBuf>,
}

/// Everything `metald-jail` needs, passed as one JSON argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    /// The VM, its uid and gid, and its VMM.
    #[serde(flatten)]
    pub vmm: VmmRun,
    /// Host directory the jail's root is mounted on.
    pub root: PathBuf,
    /// Network set-up, if the VM has a network.
    pub net: Option<JailNet>,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// Bind mounts.
    pub mounts: Vec<JailMount>,
    /// Device nodes.
    pub devices: Vec<JailDevice>,
    /// A mount namespace to enter before making the jail's own (`mntns::base`): its mount
    /// table is the host's without the network namespace pins, so what the jail copies does
    /// not grow with the VMs running. `None`: metald's own.
    #[serde(default)]
    pub mount_ns: Option<PathBuf>,
}

/// Errors preparing or removing a jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// cgroup set-up failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The blocking task that released the jail did not finish.
    #[error("jail release task: {0}")]
    Task(String),
    /// A file operation failed.
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
    /// The VMM binary's libraries could not be resolved.
    #[error("resolve the shared libraries of {binary}: {reason}")]
    Libraries {
        /// The binary.
        binary: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Io { op, path, source }
}

/// Opens directory `dir` for fd-relative work, without following a symlink.
fn open_dir(dir: &Path) -> Result<std::os::fd::OwnedFd, JailError> {
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("open", dir)(e.into()))
}

/// Host-wide jailer settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// First uid of the per-VM range.
    pub uid_base: u32,
    /// First gid of the per-VM range.
    pub gid_base: u32,
    /// Size of the range (VM slots).
    pub id_count: u32,
    /// Where jail roots live: `<dir>/<vmm>/<vm id>/root`.
    pub chroot_dir: PathBuf,
    /// Where the host's /proc, /sys and /dev are (cgroupfs is under sys).
    pub roots: crate::probe::HostRoots,
    /// Parent cgroup of all VM cgroups.
    pub cgroup_parent: String,
    /// The `metald-jail` binary, started in place of each VMM.
    pub jail_exe: PathBuf,
    /// The `tc` binary (QEMU rate limits).
    pub tc_bin: PathBuf,
    /// Jail children kept started ahead of boots ([`warm`]); 0: every jail is built at its
    /// boot.
    pub warm_jails: usize,
    /// The VM starts in flight, which the warm jails' refills wait out.
    pub starts: std::sync::Arc<crate::starts::Starts>,
}

/// One VM run's jail, prepared by [`Jailer::prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPlan {
    spec: JailSpec,
    jail_exe: PathBuf,
    control_dir: PathBuf,
    spawner: std::sync::Arc<crate::spawner::Spawner>,
    /// The VM's own mounts (what a warm jail does not have yet).
    vm_mounts: Vec<JailMount>,
    warm: std::sync::Arc<WarmJails>,
}

/// Name of the directory, in a VM's jail directory, that holds its VMM's control socket.
pub const CONTROL_DIR: &str = "ctl";

impl JailPlan {
    /// The directory the VMM makes its control socket in (mounted writable in the jail until
    /// [`JailPlan::seal_control_dir`]).
    pub fn control_dir(&self) -> &Path {
        &self.control_dir
    }

    /// Hands the control directory to the VM's uid alone for the VMM about to start: what an
    /// earlier VMM left in it (its socket) is removed, so the new one can bind its own. Done
    /// through the directory's fd, opened without following a symlink.
    pub fn open_control_dir(&self) -> Result<(), JailError> {
        let dir = &self.control_dir;
        let fd = open_dir(dir)?;
        for entry in rustix::fs::Dir::read_from(&fd).map_err(|e| io("read", dir)(e.into()))? {
            let entry = entry.map_err(|e| io("read", dir)(e.into()))?;
            let name = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let flags = if entry.file_type() == rustix::fs::FileType::Directory {
                rustix::fs::AtFlags::REMOVEDIR
            } else {
                rustix::fs::AtFlags::empty()
            };
            match rustix::fs::unlinkat(&fd, name, flags) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(io("empty", dir)(e.into())),
            }
        }
        // Owned by metald while its mode is set (metald has CAP_CHOWN, not CAP_FOWNER), then
        // given away.
        self.seal(&fd)?;
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(self.spec.vmm.uid)),
            Some(rustix::fs::Gid::from_raw(self.spec.vmm.gid)),
        )
        .map_err(|e| io("chown", dir)(e.into()))
    }

    /// Makes the open control directory metald's own, closed to everyone else.
    fn seal(&self, fd: &std::os::fd::OwnedFd) -> Result<(), JailError> {
        let dir = &self.control_dir;
        rustix::fs::fchown(
            fd,
            Some(rustix::process::geteuid()),
            Some(rustix::process::getegid()),
        )
        .map_err(|e| io("chown", dir)(e.into()))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(0o700)).map_err(|e| io("chmod", dir)(e.into()))
    }

    /// Takes the control directory from the VM's uid once the VMM has made its socket there:
    /// owned by metald and closed to everyone else, so the VMM (or a guest that took it over)
    /// can no longer remove, replace or add anything in it, while the socket it listens on
    /// goes on working. Done through the directory's fd, opened without following a symlink.
    pub fn seal_control_dir(&self) -> Result<(), JailError> {
        self.seal(&open_dir(&self.control_dir)?)
    }

    /// The command that starts `binary args…` inside this jail.
    pub fn command(&self, binary: &Path, args: Vec<String>) -> Command {
        let mut cmd = Command::new(&self.jail_exe);
        cmd.arg(self.spec_arg(binary, args)).env_clear();
        cmd
    }

    /// `metald-jail`'s argument: this jail's spec for `binary args…`, as JSON.
    fn spec_arg(&self, binary: &Path, args: Vec<String>) -> String {
        let mut spec = self.spec.clone();
        spec.vmm.exec = binary.to_path_buf();
        spec.vmm.args = args;
        // The spec is plain data built by metald; serializing it cannot fail.
        serde_json::to_string(&spec).unwrap_or_default()
    }

    /// Starts `binary args…` in this jail as a child of metald, stdout and stderr to the given
    /// files: in a warm jail ([`warm`]) when one is ready and fits, else by starting
    /// [`JailPlan::command`] through the [`crate::spawner`], which holds none of metald's
    /// descriptors (in `cwd`, stdin from /dev/null, in its own process group so a terminal's
    /// Ctrl-C never reaches it). Its pid, once it exec'd. When the spawner itself fails
    /// ([`crate::spawner::SpawnError::Spawner`]), the caller may start the command itself:
    /// the spawner saves time, never correctness.
    pub async fn spawn(
        &self,
        binary: &Path,
        args: Vec<String>,
        cwd: &Path,
        stdout: &std::fs::File,
        stderr: &std::fs::File,
    ) -> Result<u32, crate::spawner::SpawnError> {
        // A jail with `tc` work runs host binaries before its pivot: never warm.
        let warm_fits = self.spec.net.as_ref().is_none_or(|n| n.tc.is_empty());
        let warm = if warm_fits { self.warm.take() } else { None };
        if let Some(warm) = warm {
            let t0 = std::time::Instant::now();
            let warm_pid = warm.pid();
            match self.assign(warm, binary, &args, stdout, stderr).await {
                Ok(pid) => {
                    self.warm.record(true);
                    tracing::debug!(vm_id = %self.spec.vmm.vm_id, pid, assign_ms = t0.elapsed().as_secs_f64() * 1000.0, "VMM started in a warm jail");
                    return Ok(pid);
                }
                Err(e) => {
                    self.warm.record(false);
                    tracing::warn!(vm_id = %self.spec.vmm.vm_id, pid = warm_pid, error = %Chain(&e), "a warm jail failed to take the VM; building its jail at boot");
                }
            }
        }
        self.warm.record_cold_start();
        let req = crate::spawner::SpawnRequest {
            program: self.jail_exe.clone(),
            args: vec![self.spec_arg(binary, args)],
            env: Vec::new(),
            cwd: cwd.to_path_buf(),
        };
        self.spawner
            .spawn(&req, None, stdout.as_fd(), stderr.as_fd())
    }

    /// Gives the warm jail `warm` this VM: its descriptors (console and log, network
    /// namespace, cgroup files, its files as detached mount trees) and what to exec.
    async fn assign(
        &self,
        warm: Warm,
        binary: &Path,
        args: &[String],
        stdout: &std::fs::File,
        stderr: &std::fs::File,
    ) -> Result<u32, JailError> {
        let t0 = std::time::Instant::now();
        let mut owned: Vec<std::os::fd::OwnedFd> = Vec::new();
        let net = match &self.spec.net {
            Some(n) => {
                let ns = std::fs::File::open(&n.netns).map_err(io("open", &n.netns))?;
                owned.push(ns.into());
                Some(AssignedNet {
                    tap: n.tap.clone(),
                    bridge: n.bridge.clone(),
                    peer_if: n.peer_if.clone(),
                })
            }
            None => None,
        };
        for procs in &self.spec.cgroup_procs {
            // v1: the `tasks` file (the single-threaded jail moves itself); v2: `cgroup.procs`.
            let file = child::tasks_file(procs).unwrap_or_else(|| procs.clone());
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .map_err(io("open", &file))?;
            owned.push(f.into());
        }
        for m in &self.vm_mounts {
            let tree = rustix::mount::open_tree(
                rustix::fs::CWD,
                &m.path,
                rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
                    | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
            )
            .map_err(|e| io("clone the mount of", &m.path)(e.into()))?;
            owned.push(tree);
        }
        let assignment = Assignment {
            vmm: VmmRun {
                exec: binary.to_path_buf(),
                args: args.to_vec(),
                ..self.spec.vmm.clone()
            },
            net,
            cgroups: self.spec.cgroup_procs.len(),
            mounts: self.vm_mounts.clone(),
        };
        let fds: Vec<std::os::fd::BorrowedFd<'_>> = [stdout.as_fd(), stderr.as_fd()]
            .into_iter()
            .chain(owned.iter().map(|f| f.as_fd()))
            .collect();
        let prepared = t0.elapsed();
        let pid = warm
            .assign(&assignment, &fds)
            .await
            .map_err(io("start the VMM in a warm jail", &self.spec.root))?;
        tracing::debug!(vm_id = %self.spec.vmm.vm_id, prepare_ms = prepared.as_secs_f64() * 1000.0, child_ms = (t0.elapsed() - prepared).as_secs_f64() * 1000.0, "warm jail assigned");
        Ok(pid)
    }

    /// The VM's uid.
    pub fn uid(&self) -> u32 {
        self.spec.vmm.uid
    }

    /// The VM's gid.
    pub fn gid(&self) -> u32 {
        self.spec.vmm.gid
    }

    /// Where the jail's root is mounted (as seen from the host before the pivot).
    pub fn root(&self) -> &Path {
        &self.spec.root
    }
}

/// What the jailer needs to know about one VM run.
#[derive(Debug, Clone)]
pub struct JailRequest<'a> {
    /// The VM.
    pub vm_id: &'a VmId,
    /// Its slot in the uid/gid range.
    pub slot: u32,
    /// vCPUs (CPU quota).
    pub vcpu_count: u32,
    /// Guest memory (memory limit).
    pub memory_mib: u64,
    /// The VM's own directory (mounted read-write, owned by the VM).
    pub dir: &'a Path,
    /// Read-only files: kernel, initrd, shared drives.
    pub read_only: Vec<PathBuf>,
    /// The VM's own files in `dir` the VMM writes (disk copies, logs).
    pub owned: Vec<PathBuf>,
    /// The network, if any.
    pub net: Option<&'a VmNetworkPlan>,
}

/// Prepares and removes jails.
#[derive(Debug)]
pub struct Jailer {
    cfg: JailerConfig,
    kind: BackendKind,
    cgroups: Cgroups,
    /// The VMM's binary, loader and libraries (and QEMU's firmware), read-only in every jail.
    vmm_mounts: Vec<JailMount>,
    /// The jails' base mount namespace, once made.
    mount_ns: Option<mntns::HeldMountNs>,
    /// Starts the jail children (see [`crate::spawner`]).
    spawner: std::sync::Arc<crate::spawner::Spawner>,
    /// Jail children started ahead of boots.
    warm: std::sync::Arc<WarmJails>,
}

/// Tasks per VM: vCPU threads plus the VMM's I/O and worker threads (QEMU's pool alone may
/// use 64).
const PIDS_MAX: u64 = 512;
/// Open files per VMM.
const NOFILE: u64 = 4096;
/// CFS period for the CPU quota.
const CPU_PERIOD_US: u64 = 100_000;

impl Jailer {
    /// A jailer for VMMs of `kind` run from `vmm_binary`; resolves the binary's libraries once.
    pub fn new(cfg: JailerConfig, kind: BackendKind, vmm_binary: &Path) -> Result<Self, JailError> {
        let cgroups = Cgroups::detect(&cfg.roots.cgroup(), &cfg.cgroup_parent)?;
        let vmm_mounts: Vec<JailMount> = vmm_files(kind, vmm_binary)?
            .into_iter()
            .map(|path| JailMount {
                path,
                writable: false,
            })
            .collect();
        std::fs::create_dir_all(cfg.chroot_dir.join(kind.as_str()))
            .map_err(io("create", &cfg.chroot_dir))?;
        // Versions before 2026-12-04 pinned the base namespace here; a killed one's pin goes.
        let old_pin = cfg.chroot_dir.join(format!("{}.mntns", kind.as_str()));
        if let Err(e) = crate::network::netns::remove(&old_pin) {
            tracing::warn!(path = %old_pin.display(), error = %Chain(&e), "removing an old pin of the jails' base mount namespace failed");
        }
        let mount_ns = match mntns::base() {
            Ok(ns) => {
                tracing::debug!(path = %ns.path.display(), "jails' base mount namespace made");
                Some(ns)
            }
            Err(e) => {
                // Jails still work from metald's own namespace, only slower with many VMs.
                tracing::warn!(error = %Chain(&e), "making the jails' base mount namespace failed; each jail copies metald's mount table");
                None
            }
        };
        let spawner = std::sync::Arc::new(crate::spawner::Spawner::new(cfg.jail_exe.clone()));
        // The warm jails' tmpfs roots go on this directory, each in its own mount namespace.
        let warm_root = cfg.chroot_dir.join(format!("{}.warm", kind.as_str()));
        std::fs::create_dir_all(&warm_root).map_err(io("create", &warm_root))?;
        let warm = WarmJails::new(
            cfg.warm_jails,
            &WarmSpec {
                root: warm_root,
                nofile: NOFILE,
                mounts: vmm_mounts.clone(),
                devices: devices(&cfg.roots),
                mount_ns: mount_ns.as_ref().map(|ns| ns.path.clone()),
                prepared: None,
            },
            true,
            cfg.jail_exe.clone(),
            std::sync::Arc::clone(&spawner),
            std::sync::Arc::clone(&cfg.starts),
        );
        Ok(Self {
            cfg,
            kind,
            cgroups,
            vmm_mounts,
            mount_ns,
            spawner,
            warm: std::sync::Arc::new(warm),
        })
    }

    /// Starts keeping warm jails ready (after the start's sweep).
    pub fn start_warm(&self) {
        self.warm.start();
    }

    /// The warm jail pool.
    pub fn warm(&self) -> &WarmJails {
        &self.warm
    }

    /// The spawner that starts this jailer's children, for metald's other processes (`nft`).
    pub fn spawner(&self) -> std::sync::Arc<crate::spawner::Spawner> {
        std::sync::Arc::clone(&self.spawner)
    }

    /// Ends the warm jails and releases the jails' base mount namespace (at a clean stop).
    pub fn close(&self) {
        self.warm.close();
        if let Some(ns) = &self.mount_ns {
            ns.release();
        }
    }

    /// The cgroups in use.
    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    /// The VM's uid and gid for its slot.
    pub fn ids(&self, slot: u32) -> (u32, u32) {
        (
            self.cfg.uid_base.saturating_add(slot),
            self.cfg.gid_base.saturating_add(slot),
        )
    }

    /// The host directory holding the VM's jail.
    pub fn jail_dir(&self, vm: &VmId) -> PathBuf {
        self.cfg
            .chroot_dir
            .join(self.kind.as_str())
            .join(vm.as_str())
    }

    /// Creates the VM's cgroup and jail directory and hands its files to its uid.
    pub fn prepare(&self, req: &JailRequest<'_>) -> Result<JailPlan, JailError> {
        let (uid, gid) = self.ids(req.slot);
        let vm = req.vm_id.as_str();
        self.cgroups.create(
            vm,
            &Limits {
                cpu_quota_us: u64::from(req.vcpu_count) * CPU_PERIOD_US,
                cpu_period_us: CPU_PERIOD_US,
                memory_bytes: (req.memory_mib + self.kind.memory_headroom_mib()) << 20,
                pids_max: PIDS_MAX,
            },
        )?;
        let jail_dir = self.jail_dir(req.vm_id);
        std::fs::create_dir_all(&jail_dir).map_err(io("create", &jail_dir))?;
        // The root's mount point is made by a jail built at boot (`child::build_root`): a
        // warm jail has its root already, and each directory made and removed per boot is an
        // inode allocation on the host's file system.
        let root = jail_dir.join("root");
        // Made here, handed to the VM's uid by the backend just before it starts the VMM
        // (a reboot's old VMM still uses its socket until then).
        let control_dir = self.control_dir(req.vm_id);
        match std::fs::create_dir(&control_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(io("create", &control_dir)(e))
            }
            _ => {}
        }
        // The VMM's files first (what a warm jail has already), then the VM's own.
        let mut vm_mounts: Vec<JailMount> = req
            .read_only
            .iter()
            .filter(|p| !self.vmm_mounts.iter().any(|m| &m.path == *p))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|p| JailMount {
                path: p.clone(),
                writable: false,
            })
            .collect();
        vm_mounts.push(JailMount {
            path: req.dir.to_path_buf(),
            writable: true,
        });
        vm_mounts.push(JailMount {
            path: control_dir.clone(),
            writable: true,
        });
        let mounts: Vec<JailMount> = self
            .vmm_mounts
            .iter()
            .chain(vm_mounts.iter())
            .cloned()
            .collect();
        let devices = devices(&self.cfg.roots);
        let net = req.net.map(|n| JailNet {
            netns: n.netns.clone(),
            tap: n.tap.clone(),
            bridge: n.bridge.clone(),
            peer_if: n.peer_if.clone(),
            tc_bin: self.cfg.tc_bin.clone(),
            tc: match self.kind {
                // Firecracker limits in its own token buckets.
                BackendKind::Firecracker => Vec::new(),
                BackendKind::Qemu => tc_commands(n),
            },
        });
        Ok(JailPlan {
            spec: JailSpec {
                vmm: VmmRun {
                    vm_id: vm.to_string(),
                    uid,
                    gid,
                    exec: PathBuf::new(),
                    args: Vec::new(),
                    env: Vec::new(),
                    workdir: req.dir.to_path_buf(),
                    owned_dir: req.dir.to_path_buf(),
                    owned_files: req.owned.clone(),
                },
                root,
                net,
                cgroup_procs: self.cgroups.procs_files(vm),
                nofile: NOFILE,
                mounts,
                devices,
                mount_ns: self.mount_ns.as_ref().map(|ns| ns.path.clone()),
            },
            jail_exe: self.cfg.jail_exe.clone(),
            control_dir,
            spawner: self.spawner.clone(),
            vm_mounts,
            warm: std::sync::Arc::clone(&self.warm),
        })
    }

    /// Where the VM's VMM makes its control socket: in the VM's jail directory, whose parents
    /// belong to metald, so the VM's uid can never move it or put something in its place.
    pub fn control_dir(&self, vm: &VmId) -> PathBuf {
        self.jail_dir(vm).join(CONTROL_DIR)
    }

    /// Removes the VM's cgroup (killing anything left in it) and jail directory.
    pub fn release(&self, vm: &VmId) -> Result<(), JailError> {
        self.cgroups.remove(vm.as_str())?;
        let dir = self.jail_dir(vm);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &dir)(e)),
            _ => Ok(()),
        }
    }

    /// At start: removes cgroups and jail directories of VMs not in `keep`, logging each.
    pub fn sweep(&self, keep: &std::collections::HashSet<VmId>) {
        let known = |name: &str| name.parse::<VmId>().is_ok_and(|id| keep.contains(&id));
        for name in self.cgroups.list() {
            if !known(&name) {
                tracing::warn!(cgroup = %name, "removing leftover VM cgroup");
                if let Err(e) = self.cgroups.remove(&name) {
                    tracing::warn!(cgroup = %name, error = %Chain(&e), "removing leftover VM cgroup failed");
                }
            }
        }
        let base = self.cfg.chroot_dir.join(self.kind.as_str());
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !known(&name) {
                tracing::warn!(path = %entry.path().display(), "removing leftover jail directory");
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %Chain(&e), "removing leftover jail directory failed");
                }
            }
        }
    }
}

/// The device nodes every jail has: /dev/null, /dev/urandom, /dev/net/tun, and /dev/kvm where
/// the host has it.
fn devices(roots: &crate::probe::HostRoots) -> Vec<JailDevice> {
    let mut devices = vec![
        JailDevice {
            path: "/dev/null".into(),
            major: 1,
            minor: 3,
        },
        JailDevice {
            path: "/dev/urandom".into(),
            major: 1,
            minor: 9,
        },
        JailDevice {
            path: "/dev/net/tun".into(),
            major: 10,
            minor: 200,
        },
    ];
    if roots.kvm().exists() {
        devices.push(JailDevice {
            path: "/dev/kvm".into(),
            major: 10,
            minor: 232,
        });
    }
    devices
}

/// `tc` rate limits for a VMM without its own limiter: traffic to the guest is shaped as it
/// leaves the TAP, traffic from the guest as it leaves the namespace's veth end.
pub fn tc_commands(n: &VmNetworkPlan) -> Vec<Vec<String>> {
    let tbf = |dev: &str, l: &RateLimit| -> Vec<String> {
        // tc's "bps" unit is bytes per second. The burst must hold at least one full frame.
        let burst = l.burst_bytes.max(16 * 1024);
        format!(
            "qdisc replace dev {dev} root tbf rate {}bps burst {burst} latency 100ms",
            l.bandwidth_bytes_per_sec
        )
        .split(' ')
        .map(str::to_string)
        .collect()
    };
    let mut out = Vec::new();
    if let Some(l) = &n.rx_rate_limit {
        out.push(tbf(&n.tap, l));
    }
    if let Some(l) = &n.tx_rate_limit {
        out.push(tbf(&n.peer_if, l));
    }
    out
}

/// Files the VMM binary needs inside the jail: itself, its dynamic loader and libraries (none
/// for a static build), and for QEMU its firmware and module directories.
fn vmm_files(kind: BackendKind, binary: &Path) -> Result<Vec<PathBuf>, JailError> {
    let binary = binary.canonicalize().map_err(io("resolve", binary))?;
    let deps = lddtree::DependencyAnalyzer::new(PathBuf::from("/"))
        .analyze(&binary)
        .map_err(|e| JailError::Libraries {
            binary: binary.clone(),
            reason: e.to_string(),
        })?;
    let mut files = vec![binary.clone()];
    if let Some(interp) = &deps.interpreter {
        files.push(PathBuf::from(interp));
    }
    for lib in deps.libraries.values() {
        if lib.found() {
            // The loader looks libraries up by the path it searched, which may be a symlink.
            files.push(lib.path.clone());
            files.push(lib.realpath.clone().unwrap_or_else(|| lib.path.clone()));
        }
    }
    if deps.interpreter.is_some() {
        files.push("/etc/ld.so.cache".into());
    }
    if kind == BackendKind::Qemu {
        for dir in [
            "/usr/share/qemu",
            "/usr/share/seabios",
            "/usr/lib/ipxe/qemu",
            "/usr/share/ipxe",
            "/usr/lib/x86_64-linux-gnu/qemu",
        ] {
            files.push(dir.into());
        }
    }
    files.retain(|p| p.exists());
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn qemu_rate_limits_shape_both_directions_in_bytes() {
        let plan = VmNetworkPlan {
            netns: "/run/metald/netns/x".into(),
            tap: "tap0".into(),
            bridge: "br0".into(),
            peer_if: "mp1".into(),
            host_if: "mv1".into(),
            mac: "02:00:00:00:00:01".into(),
            ipv6: Ipv6Addr::LOCALHOST,
            ipv4: None,
            gateway6: Ipv6Addr::LOCALHOST,
            gateway4: None,
            rx_rate_limit: Some(RateLimit {
                bandwidth_bytes_per_sec: 1_000_000,
                burst_bytes: 100_000,
            }),
            tx_rate_limit: Some(RateLimit {
                bandwidth_bytes_per_sec: 500_000,
                burst_bytes: 0,
            }),
        };
        let cmds = tc_commands(&plan);
        assert_eq!(
            cmds[0].join(" "),
            "qdisc replace dev tap0 root tbf rate 1000000bps burst 100000 latency 100ms"
        );
        assert_eq!(
            cmds[1].join(" "),
            "qdisc replace dev mp1 root tbf rate 500000bps burst 16384 latency 100ms"
        );
        let none = VmNetworkPlan {
            rx_rate_limit: None,
            tx_rate_limit: None,
            ..plan
        };
        assert!(tc_commands(&none).is_empty());
    }

    #[test]
    fn a_dynamic_binary_brings_its_loader_and_libraries() {
        let files = vmm_files(BackendKind::Firecracker, Path::new("/bin/sh")).unwrap();
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("libc.so")),
            "{files:?}"
        );
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("ld-linux")),
            "{files:?}"
        );
    }
}
