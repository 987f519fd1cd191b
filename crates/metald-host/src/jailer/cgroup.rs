//! Per-VM cgroups on cgroup v1 and v2 hosts.
//!
//! Which one is used is decided by what the host mounted: a pure v2 host has
//! `cgroup.controllers` at the cgroupfs root and gets v2; otherwise the v1 controllers
//! (`cpu`, `memory`, `pids`) are used, one directory per controller. Hybrid hosts (v1
//! controllers plus an empty v2 tree, like these build machines) therefore use v1.
//! Layout: `<root>/<parent>/<vm id>` (v2) or `<root>/<controller>/<parent>/<vm id>` (v1).

use std::path::{Path, PathBuf};

/// Limits for one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per period, in microseconds (vCPUs × period).
    pub cpu_quota_us: u64,
    /// The CPU period, in microseconds.
    pub cpu_period_us: u64,
    /// Memory limit in bytes (guest memory plus the VMM's own).
    pub memory_bytes: u64,
    /// Most processes/threads.
    pub pids_max: u64,
}

/// Which cgroup version the host uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Unified hierarchy mounted at the root.
    V2(PathBuf),
    /// Per-controller hierarchies: cpu, memory, pids directories under the root.
    V1(PathBuf),
}

/// Errors from cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The host has neither a usable v2 nor v1 layout.
    #[error("no usable cgroup hierarchy under {0}: need cgroup v2 or the v1 cpu, memory and pids controllers")]
    NoHierarchy(PathBuf),
    /// A cgroup file operation failed.
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
    /// Processes were still in the cgroup after it was killed (the VM's uid stays taken).
    #[error("{dir}: {pids} process(es) still in the cgroup after killing it")]
    Busy {
        /// The cgroup.
        dir: PathBuf,
        /// How many were left.
        pids: usize,
    },
}

/// How long the processes of a killed cgroup get to be reaped and leave it.
const EMPTY_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

/// v1 controllers metald limits.
const V1_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// v1 controllers metald only reads (CPU time, block I/O operations), used where mounted.
const V1_ACCOUNTING: [&str; 2] = ["cpuacct", "blkio"];

/// The files metering reads in a VM's cgroup(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupFiles {
    /// Unified hierarchy (v2 file formats).
    pub v2: bool,
    /// CPU time: `cpuacct.usage` (v1) or `cpu.stat` (v2).
    pub cpu: PathBuf,
    /// Memory in use: `memory.usage_in_bytes` (v1) or `memory.current` (v2).
    pub memory: PathBuf,
    /// Block I/O operations: `blkio.throttle.io_serviced` (v1) or `io.stat` (v2), if available.
    pub block_ops: Option<PathBuf>,
}

/// The per-VM cgroups under one parent.
#[derive(Debug, Clone)]
pub struct Cgroups {
    hierarchy: Hierarchy,
    parent: String,
}

impl Cgroups {
    /// Detects the hierarchy under `root` (normally /sys/fs/cgroup).
    pub fn detect(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        let hierarchy = if root.join("cgroup.controllers").exists() {
            Hierarchy::V2(root.to_path_buf())
        } else if V1_CONTROLLERS.iter().all(|c| root.join(c).is_dir()) {
            Hierarchy::V1(root.to_path_buf())
        } else {
            return Err(CgroupError::NoHierarchy(root.to_path_buf()));
        };
        Ok(Self {
            hierarchy,
            parent: parent.trim_matches('/').to_string(),
        })
    }

    /// The hierarchy in use.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// The parent directories, one per hierarchy in use (on v1 the accounting ones too, where
    /// mounted).
    pub fn parents(&self) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V2(root) => vec![root.join(&self.parent)],
            Hierarchy::V1(root) => V1_CONTROLLERS
                .iter()
                .chain(V1_ACCOUNTING.iter())
                .filter(|c| root.join(c).is_dir())
                .map(|c| root.join(c).join(&self.parent))
                .collect(),
        }
    }

    /// The files metering reads for the VM.
    pub fn files(&self, vm: &str) -> CgroupFiles {
        match &self.hierarchy {
            Hierarchy::V2(root) => {
                let dir = root.join(&self.parent).join(vm);
                CgroupFiles {
                    v2: true,
                    cpu: dir.join("cpu.stat"),
                    memory: dir.join("memory.current"),
                    block_ops: Some(dir.join("io.stat")),
                }
            }
            Hierarchy::V1(root) => {
                let dir = |c: &str| root.join(c).join(&self.parent).join(vm);
                // Where cpu and cpuacct are co-mounted, both names lead to the same directory.
                let cpu = if root.join("cpuacct").is_dir() {
                    dir("cpuacct").join("cpuacct.usage")
                } else {
                    dir("cpu").join("cpuacct.usage")
                };
                CgroupFiles {
                    v2: false,
                    cpu,
                    memory: dir("memory").join("memory.usage_in_bytes"),
                    block_ops: root
                        .join("blkio")
                        .is_dir()
                        .then(|| dir("blkio").join("blkio.throttle.io_serviced")),
                }
            }
        }
    }

    /// The VM's cgroup directories.
    pub fn dirs(&self, vm: &str) -> Vec<PathBuf> {
        self.parents().into_iter().map(|p| p.join(vm)).collect()
    }

    /// The files a process writes its pid to, to join the VM's cgroup(s).
    pub fn procs_files(&self, vm: &str) -> Vec<PathBuf> {
        self.dirs(vm)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Creates the VM's cgroup(s) with `limits`. An existing one (left by a crash) is reused.
    pub fn create(&self, vm: &str, limits: &Limits) -> Result<(), CgroupError> {
        match &self.hierarchy {
            Hierarchy::V2(root) => {
                let parent = root.join(&self.parent);
                std::fs::create_dir_all(&parent).map_err(io("create", &parent))?;
                // Controllers must be enabled on every level above the VM's cgroup.
                for dir in [root.as_path(), parent.as_path()] {
                    let f = dir.join("cgroup.subtree_control");
                    std::fs::write(&f, "+cpu +memory +pids")
                        .map_err(io("enable controllers in", &f))?;
                    // I/O accounting is for metering only: a host without the io controller
                    // still runs VMs, just without disk operation counts.
                    let available = std::fs::read_to_string(root.join("cgroup.controllers"));
                    if available.is_ok_and(|c| c.split_whitespace().any(|x| x == "io")) {
                        let _ignored = std::fs::write(&f, "+io");
                    }
                }
                let dir = parent.join(vm);
                mkdir(&dir)?;
                write(
                    &dir,
                    "cpu.max",
                    &format!("{} {}", limits.cpu_quota_us, limits.cpu_period_us),
                )?;
                write(&dir, "memory.max", &limits.memory_bytes.to_string())?;
                write(&dir, "memory.swap.max", "0").or_else(ignore_missing)?;
                write(&dir, "pids.max", &limits.pids_max.to_string())?;
            }
            Hierarchy::V1(root) => {
                for parent in self.parents() {
                    std::fs::create_dir_all(&parent).map_err(io("create", &parent))?;
                    mkdir(&parent.join(vm))?;
                }
                let dir = |c: &str| root.join(c).join(&self.parent).join(vm);
                write(
                    &dir("cpu"),
                    "cpu.cfs_period_us",
                    &limits.cpu_period_us.to_string(),
                )?;
                write(
                    &dir("cpu"),
                    "cpu.cfs_quota_us",
                    &limits.cpu_quota_us.to_string(),
                )?;
                write(
                    &dir("memory"),
                    "memory.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                )?;
                write(&dir("pids"), "pids.max", &limits.pids_max.to_string())?;
            }
        }
        Ok(())
    }

    /// Kills whatever is left in the VM's cgroup(s) and removes them. Missing is fine. Blocks
    /// (up to [`EMPTY_WITHIN`]) until the cgroup is empty: call it off the async runtime. An
    /// error means processes are left, so the VM's uid must not be given to another VM.
    pub fn remove(&self, vm: &str) -> Result<(), CgroupError> {
        for dir in self.dirs(vm) {
            if !dir.exists() {
                continue;
            }
            kill_until_empty(&dir)?;
            // The last process leaves the cgroup a moment after it is reaped.
            let deadline = std::time::Instant::now() + EMPTY_WITHIN;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e)
                        if std::time::Instant::now() < deadline
                            && e.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => return Err(io("remove", &dir)(e)),
                }
            }
        }
        Ok(())
    }

    /// VM ids that have a cgroup under the parent (for the start-up sweep).
    pub fn list(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .parents()
            .iter()
            .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io("create", dir)(e)),
        _ => Ok(()),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io("write", &path))
}

fn ignore_missing(e: CgroupError) -> Result<(), CgroupError> {
    match &e {
        // memory.swap.max is absent where swap accounting is off.
        CgroupError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => Err(e),
    }
}

/// Kills every process in the cgroup at `dir` until none is left: with `cgroup.kill` where
/// the kernel has it (v2, 5.14+: atomic, also catches forks in flight), and by signalling each
/// pid in `cgroup.procs` again and again where it does not (a fork can slip past one pass).
fn kill_until_empty(dir: &Path) -> Result<(), CgroupError> {
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() {
        std::fs::write(&kill_file, "1").map_err(io("write", &kill_file))?;
    }
    let deadline = std::time::Instant::now() + EMPTY_WITHIN;
    loop {
        let pids = procs(dir);
        if pids.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(CgroupError::Busy {
                dir: dir.to_path_buf(),
                pids: pids.len(),
            });
        }
        for pid in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _gone = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The pids in the cgroup (none if it is gone).
fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        cpu_quota_us: 200_000,
        cpu_period_us: 100_000,
        memory_bytes: 512 << 20,
        pids_max: 256,
    };

    /// A directory shaped like a cgroupfs root (plain files stand in for the kernel's).
    fn fake_root(v2: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        if v2 {
            std::fs::write(d.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        } else {
            for c in V1_CONTROLLERS {
                std::fs::create_dir(d.path().join(c)).unwrap();
            }
        }
        d
    }

    #[test]
    fn v2_hosts_get_one_directory_with_v2_limit_files() {
        let root = fake_root(true);
        let cg = Cgroups::detect(root.path(), "/metald/").unwrap();
        assert_eq!(cg.hierarchy(), &Hierarchy::V2(root.path().to_path_buf()));
        cg.create("vm-1", &LIMITS).unwrap();
        let dir = root.path().join("metald/vm-1");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("cpu.max"), "200000 100000");
        assert_eq!(read("memory.max"), (512u64 << 20).to_string());
        assert_eq!(read("pids.max"), "256");
        assert_eq!(
            std::fs::read_to_string(root.path().join("metald/cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        assert_eq!(cg.procs_files("vm-1"), vec![dir.join("cgroup.procs")]);
        assert_eq!(cg.list(), vec!["vm-1".to_string()]);
    }

    #[test]
    fn v1_hosts_get_one_directory_per_controller() {
        let root = fake_root(false);
        let cg = Cgroups::detect(root.path(), "metald").unwrap();
        assert_eq!(cg.hierarchy(), &Hierarchy::V1(root.path().to_path_buf()));
        cg.create("vm-1", &LIMITS).unwrap();
        let read = |c: &str, f: &str| {
            std::fs::read_to_string(root.path().join(c).join("metald/vm-1").join(f)).unwrap()
        };
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "200000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (512u64 << 20).to_string()
        );
        assert_eq!(read("pids", "pids.max"), "256");
        assert_eq!(
            cg.procs_files("vm-1").len(),
            3,
            "accounting controllers only where mounted"
        );
        std::fs::create_dir(root.path().join("cpuacct")).unwrap();
        assert_eq!(cg.procs_files("vm-1").len(), 4);
        assert!(cg
            .files("vm-1")
            .cpu
            .ends_with("cpuacct/metald/vm-1/cpuacct.usage"));
    }

    #[test]
    fn a_host_without_controllers_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Cgroups::detect(d.path(), "metald"),
            Err(CgroupError::NoHierarchy(_))
        ));
    }

    #[test]
    fn a_cgroup_is_killed_until_empty_and_an_unkillable_one_is_reported() {
        // Stands in for the kernel: a real child in a cgroup.procs file that "the kernel"
        // empties once the child is reaped.
        let dir = tempfile::tempdir().unwrap();
        let cg = dir.path().join("vm");
        std::fs::create_dir(&cg).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        std::fs::write(cg.join("cgroup.procs"), format!("{}\n", child.id())).unwrap();
        let procs = cg.join("cgroup.procs");
        let reaper = std::thread::spawn(move || {
            let status = child.wait().unwrap();
            std::fs::write(&procs, "").unwrap();
            status
        });
        kill_until_empty(&cg).unwrap();
        let status = reaper.join().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // A process that never leaves (a pid nothing can kill here): reported, not ignored.
        std::fs::write(cg.join("cgroup.procs"), "4194304\n").unwrap();
        let err = kill_until_empty(&cg).unwrap_err();
        assert!(matches!(err, CgroupError::Busy { pids: 1, .. }), "{err}");
    }
}
