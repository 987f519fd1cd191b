//! A real metald: started on a free loopback port with its own data, jail, run and cgroup
//! directories and network namespace, and checked on drop for anything it left behind.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// A running metald.
pub struct Metald {
    /// Base URL, e.g. http://127.0.0.1:40123
    pub url: String,
    /// Port.
    pub port: u16,
    /// The data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// Where metald's stderr goes.
    pub log: PathBuf,
    /// The isolation set-up, when metald jails its VMMs (the default).
    pub iso: Option<Isolated>,
    /// The port to serve on inside its namespace, when the test must know it before the start
    /// (a fleet host's advertised URL); a free one otherwise.
    pub fixed_port: Option<u16>,
    // Last: the data dir goes after everything in it is unmounted and killed.
    _tmp: Option<tempfile::TempDir>,
}

/// Where an isolating metald keeps its per-VM state, and the namespace its host side runs in.
pub struct Isolated {
    /// metald's own network namespace (made by the test).
    pub netns: TestNetns,
    relay: Relay,
    /// UNKEY_METALD_JAILER_CHROOT_DIR.
    pub jail_dir: PathBuf,
    /// UNKEY_METALD_RUN_DIR.
    pub run_dir: PathBuf,
    /// UNKEY_METALD_CGROUP_PARENT.
    pub cgroup_parent: String,
    /// UNKEY_METALD_JAILER_UID (and _GID).
    pub uid_base: u32,
}

/// The IPv4 subnet test metalds use (inside their own namespace only).
pub const TEST_IPV4_SUBNET: &str = "10.213.0.0/24";
/// The IPv6 prefix test metalds use (inside their own namespace only).
pub const TEST_IPV6_PREFIX: &str = "fd6d:7465:7374::/64";

/// Builds a metald.
pub struct Builder {
    env: Vec<(String, String)>,
    isolated: bool,
}

impl Builder {
    /// Sets an environment variable for metald.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Runs VMMs unjailed and without network (UNKEY_METALD_ISOLATION=none).
    pub fn unisolated(mut self) -> Self {
        self.isolated = false;
        self.env
            .push(("UNKEY_METALD_ISOLATION".into(), "none".into()));
        self
    }

    /// Starts metald with the default guest imported (`guest` = the image directory).
    pub fn start(self, guest: &Path) -> Metald {
        self.start_with(|m| m.import_default_guest(guest))
    }

    /// Starts metald after `import` put assets into its (empty) data dir.
    pub fn start_with(self, import: impl FnOnce(&Metald)) -> Metald {
        let mut m = self.prepare(import);
        m.spawn();
        m
    }

    /// Prepares the data dir like [`Builder::start_with`] but starts nothing.
    pub fn prepare(self, import: impl FnOnce(&Metald)) -> Metald {
        // Short path: VM sockets live under the data dir and Unix socket paths are short.
        let tmp = tempfile::Builder::new()
            .prefix("md")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let data_dir = tmp.path().to_path_buf();
        let mut env = self.env;
        env.push((
            "UNKEY_METALD_DATA_DIR".into(),
            data_dir.display().to_string(),
        ));
        env.push(("UNKEY_METALD_LOG_FORMAT".into(), "text".into()));
        let iso = self.isolated.then(|| {
            let netns = TestNetns::new();
            let relay = Relay::start(&netns.path());
            let iso = Isolated {
                relay,
                jail_dir: data_dir.join("jail"),
                run_dir: data_dir.join("run"),
                cgroup_parent: format!("metald-test-{}", netns.name),
                // Per test, so VMs of tests running side by side never share a uid.
                uid_base: 1_000_000
                    + 1000 * (u32::from_str_radix(&netns::uuid_hex()[..4], 16).unwrap() % 1000),
                netns,
            };
            for (k, v) in [
                (
                    "UNKEY_METALD_JAILER_CHROOT_DIR",
                    iso.jail_dir.display().to_string(),
                ),
                ("UNKEY_METALD_RUN_DIR", iso.run_dir.display().to_string()),
                ("UNKEY_METALD_CGROUP_PARENT", iso.cgroup_parent.clone()),
                ("UNKEY_METALD_JAILER_UID", iso.uid_base.to_string()),
                ("UNKEY_METALD_JAILER_GID", iso.uid_base.to_string()),
                ("UNKEY_METALD_JAILER_ID_COUNT", "1000".into()),
                ("UNKEY_METALD_IPV6_PREFIX", TEST_IPV6_PREFIX.into()),
                ("UNKEY_METALD_IPV4_SUBNET", TEST_IPV4_SUBNET.into()),
            ] {
                // A fleet host's blocks come from the fleet's prefixes.
                let fleet = env
                    .iter()
                    .any(|(e, _)| e == "UNKEY_METALD_FLEET_IPV6_PREFIX");
                if fleet && (k.ends_with("_PREFIX") || k.ends_with("_SUBNET")) {
                    continue;
                }
                // What the builder set wins (a bench needing more addresses, say).
                if !env.iter().any(|(e, _)| e == k) {
                    env.push((k.into(), v));
                }
            }
            iso
        });
        let m = Metald {
            url: iso
                .as_ref()
                .map(|i| format!("http://127.0.0.1:{}", i.relay.port))
                .unwrap_or_default(),
            port: 0,
            log: data_dir.join("metald.log"),
            data_dir,
            child: None,
            env,
            iso,
            fixed_port: None,
            _tmp: Some(tmp),
        };
        import(&m);
        m
    }
}

/// A builder with QEMU as the backend.
pub fn metald() -> Builder {
    metald_with_backend("qemu")
}

/// A builder with the given backend.
pub fn metald_with_backend(backend: &str) -> Builder {
    Builder {
        env: vec![
            ("UNKEY_METALD_BACKEND".into(), backend.into()),
            // The metering bench stores 1000 VMs of one customer (the default quota is 100).
            ("UNKEY_METALD_QUOTA_VMS".into(), "4000".into()),
            // Host capacity must not refuse what the tests and benches boot: the metering bench
            // runs 1000 one-vCPU VMs (each with its VMM's memory headroom) on a 2-CPU, 24 GiB
            // host. Both ratios at their maximum; the capacity tests set their own.
            ("UNKEY_METALD_HOST_MEMORY_OVERCOMMIT".into(), "100".into()),
            ("UNKEY_METALD_HOST_CPU_OVERCOMMIT".into(), "1000".into()),
            // No spare disk copies unless a test asks: each metald of the suite would copy and
            // sync its images twice more in the background, on the disk every test shares.
            ("UNKEY_METALD_WARM_DISKS".into(), "0".into()),
        ],
        isolated: true,
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Metald {
    fn command(&self) -> Command {
        self.command_for(Command::new(env!("CARGO_BIN_EXE_metald")))
    }

    /// `cmd` with metald's environment (and nothing else of UNKEY_METALD_*).
    pub fn command_for(&self, mut cmd: Command) -> Command {
        cmd.env_clear();
        for (k, v) in std::env::vars() {
            if !k.starts_with("UNKEY_METALD_") {
                cmd.env(k, v);
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `metald assets ...` against this data dir.
    pub fn assets(&self, args: &[&str]) -> std::process::Output {
        self.command()
            .arg("assets")
            .args(args)
            .output()
            .expect("run metald assets")
    }

    pub fn import_default_guest(&self, guest: &Path) {
        let g = |f: &str| guest.join(f).display().to_string();
        for args in [
            vec![
                "import",
                "--id",
                "initrd-6.1",
                "--kind",
                "initrd",
                "--file",
                &g("initrd.img"),
            ],
            vec![
                "import",
                "--id",
                KERNEL_ID,
                "--kind",
                "kernel",
                "--file",
                &g("vmlinux"),
                "--initrd",
                "initrd-6.1",
            ],
            vec![
                "import",
                "--id",
                ROOTFS_ID,
                "--kind",
                "rootfs",
                "--file",
                &g("rootfs.ext4"),
                "--ready-marker",
                READY_MARKER,
            ],
        ] {
            let out = self.assets(&args);
            assert!(
                out.status.success(),
                "metald assets {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Imports the tiny Firecracker test guests as kernels `tiny-elf` (polling, see
    /// [`TinyGuest::Polling`]) and `tiny-idle-elf` ([`TinyGuest::Halted`]), and `tiny-disk` (a
    /// 1 MiB blank root disk whose readiness line is the guests' banner).
    pub fn import_tiny_guest(&self) {
        let kernel = self.data_dir.join("tiny.elf");
        std::fs::write(&kernel, tiny_guest_elf(TinyGuest::Polling)).unwrap();
        let idle = self.data_dir.join("tiny-idle.elf");
        std::fs::write(&idle, tiny_guest_elf(TinyGuest::Halted)).unwrap();
        let counting = self.data_dir.join("tiny-counting.elf");
        std::fs::write(&counting, tiny_guest_elf(TinyGuest::Counting)).unwrap();
        let c = counting.display().to_string();
        let disk = self.data_dir.join("tiny.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let (k, i, d) = (
            kernel.display().to_string(),
            idle.display().to_string(),
            disk.display().to_string(),
        );
        for args in [
            vec![
                "import", "--id", "tiny-elf", "--kind", "kernel", "--file", &k,
            ],
            vec![
                "import",
                "--id",
                "tiny-idle-elf",
                "--kind",
                "kernel",
                "--file",
                &i,
            ],
            vec![
                "import",
                "--id",
                "tiny-counting-elf",
                "--kind",
                "kernel",
                "--file",
                &c,
            ],
            vec![
                "import",
                "--id",
                "tiny-disk",
                "--kind",
                "rootfs",
                "--file",
                &d,
                "--ready-marker",
                TINY_MARKER,
            ],
        ] {
            let out = self.assets(&args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Starts (or restarts) the daemon and waits for /healthz.
    pub fn spawn(&mut self) {
        self.spawn_wrapped(&[]);
    }

    /// Starts the daemon with extra environment variables.
    pub fn spawn_with_env(&mut self, vars: &[(&str, &str)]) {
        for (k, v) in vars {
            self.env.push((k.to_string(), v.to_string()));
        }
        self.spawn();
    }

    /// Starts the daemon as `wrapper… metald serve` (e.g. under setpriv).
    pub fn spawn_wrapped(&mut self, wrapper: &[String]) {
        assert!(self.child.is_none(), "already running");
        self.port = self.fixed_port.unwrap_or_else(free_port);
        let metald = env!("CARGO_BIN_EXE_metald").to_string();
        let mut argv: Vec<String> = wrapper.to_vec();
        argv.push(metald);
        let mut serve = match &self.iso {
            Some(iso) => {
                // Its host side lives in the test's namespace; the relay reaches its port.
                iso.relay
                    .target
                    .store(self.port, std::sync::atomic::Ordering::SeqCst);
                let mut c = self.command_for(iso.netns.command(&argv[0]));
                c.args(&argv[1..]).arg("serve");
                c
            }
            None => {
                self.url = format!("http://127.0.0.1:{}", self.port);
                self.command()
            }
        };
        self.spawn_command(&mut serve);
    }

    /// Starts `cmd` as the daemon (it must serve on `self.port`) and waits for /healthz.
    pub fn spawn_command(&mut self, cmd: &mut Command) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = cmd
            .env("UNKEY_METALD_PORT", self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn metald");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let tls = self
            .env
            .iter()
            .any(|(k, _)| k == "UNKEY_METALD_TLS_CERT_FILE");
        // The port the test reaches it at: its relay's for an isolated metald.
        let reach = self
            .url
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or(self.port);
        loop {
            if tls {
                // Under TLS the test's own client checks the port; what counts here is that
                // metald accepts. Through a relay (which accepts whatever is behind it) that
                // is metald's TLS stack answering a bad record with an alert.
                if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", reach)) {
                    use std::io::{Read, Write};
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    let _ = s.write_all(b"\x16\x03\x01\x00\x00");
                    let mut b = [0u8; 1];
                    if s.read(&mut b).is_ok_and(|n| n > 0) || self.iso.is_none() {
                        return;
                    }
                }
            }
            if let Ok(r) = reqwest::blocking_get(&format!("{}/healthz", self.url)) {
                if r == 200 {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("metald exited at start ({status}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "metald did not answer /healthz: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the daemon with SIGKILL, as a crash would (VMs keep running), and reaps it.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        self.stop();
    }

    /// Stops the daemon with SIGTERM (VMs keep running) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// metald's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of the unlabelled series `name` on metald's `/metrics`, if it is there.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = block_on(async {
            ::reqwest::get(format!("{}/metrics", self.url))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        });
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Pids of processes whose command line mentions this data dir (the VMMs).
    pub fn vmm_pids(&self) -> Vec<u32> {
        let needle = self.data_dir.display().to_string();
        let mut pids = vec![];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(&needle) && !text.contains("metald") && !text.contains("billaged") {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Metald {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        // Judged before anything is removed by force, so whatever metald left counts; after a
        // failure the first panic is the report.
        let mut left = if panicking {
            vec![]
        } else {
            self.left_at_end()
        };
        let was_running = self.child.is_some();
        self.stop();
        // A clean stop removes the warm pool's spares too.
        if was_running && !panicking {
            if let Some(iso) = &self.iso {
                left.extend(iso.leftovers(&self.data_dir, false));
            }
        }
        // VMMs outlive metald by design; a test's VMs must not outlive the test.
        for pid in self.vmm_pids() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        if let Some(iso) = &self.iso {
            iso.force_cleanup();
        }
        if panicking {
            eprintln!("---- metald log ----\n{}", self.log_text());
        } else {
            assert!(
                left.is_empty(),
                "test left behind:\n{}\n---- metald log ----\n{}",
                left.join("\n"),
                self.log_text()
            );
        }
    }
}

impl Metald {
    /// (id, customer, VMM pid) of every VM in metald's own database.
    pub fn stored_vms(&self) -> Vec<(String, String, Option<i64>)> {
        let db = self.data_dir.join("metald.db");
        if !db.exists() {
            return vec![];
        }
        let db = rusqlite::Connection::open(&db).expect("open metald.db");
        let mut stmt = db
            .prepare("SELECT id, customer_id, vmm_pid FROM vms ORDER BY seq")
            .expect("query metald.db");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("read metald.db")
            .map(Result::unwrap)
            .collect()
    }

    /// What a test leaves once metald deleted every VM it still has (as their customers would):
    /// namespaces, interfaces, nft rules, cgroups, mounts, jails, VMM processes. Empty when
    /// metald cleans up after itself.
    fn left_at_end(&self) -> Vec<String> {
        let mut left = vec![];
        let vms = self.stored_vms();
        if self.child.is_some() {
            for (id, customer, _) in &vms {
                let r = Rest::new(self, Some(customer)).call(
                    "DELETE",
                    &format!("/v1/vms/{id}?force=true"),
                    None,
                );
                if r.status != 200 {
                    left.push(format!("VM {id}: delete answered {} {}", r.status, r.body));
                }
            }
        } else {
            // Stopped, metald cannot delete; a VM that still has a VMM keeps what it was given.
            left.extend(
                vms.iter()
                    .filter(|(_, _, pid)| pid.is_some())
                    .map(|(id, _, pid)| {
                        format!("VM {id} with VMM {pid:?} while metald is stopped")
                    }),
            );
            if !left.is_empty() {
                return left;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut now = self.leftovers();
            if now.is_empty() || Instant::now() > deadline {
                left.append(&mut now);
                return left;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything of a VM still on the machine: [`Isolated::leftovers`] and VMM processes.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = self
            .iso
            .as_ref()
            .map(|iso| iso.leftovers(&self.data_dir, self.child.is_some()))
            .unwrap_or_default();
        left.extend(self.vmm_pids().iter().map(|p| format!("VMM process {p}")));
        left
    }
}

/// True for a path (or a mountinfo line naming one) that belongs to a running metald rather than
/// to any VM: a warm-pool spare's namespace pin, or the jails' base mount namespace pin.
pub fn is_metalds_own(at: &str) -> bool {
    at.contains("/netns/pool-") || at.contains(".mntns")
}

impl Isolated {
    /// The parent cgroup directories of this metald's VMs, in every hierarchy metald makes
    /// them in (on v1 the accounting ones, `cpuacct` and `blkio`, too: leaving those out
    /// left a parent in each of them after every test).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        ::metald::jailer::cgroup::Cgroups::detect(Path::new("/sys/fs/cgroup"), &self.cgroup_parent)
            .map(|c| c.parents())
            .unwrap_or_default()
    }

    /// Removes whatever a (failed) test left: namespace pins, cgroups, jail directories. The
    /// test namespace itself (with every veth in it) goes when `netns` drops.
    fn force_cleanup(&self) {
        for f in std::fs::read_dir(&self.jail_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().ends_with(".mntns"))
        {
            let _ = Command::new("umount").arg("-l").arg(f.path()).status();
        }
        let _ = std::fs::remove_dir_all(&self.jail_dir);
        for f in std::fs::read_dir(self.run_dir.join("netns"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = Command::new("umount").arg("-l").arg(f.path()).status();
            let _ = std::fs::remove_file(f.path());
        }
        for parent in self.cgroup_dirs() {
            for vm in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if vm.path().is_dir() {
                    if let Ok(procs) = std::fs::read_to_string(vm.path().join("cgroup.procs")) {
                        for pid in procs.lines() {
                            let _ = Command::new("kill").args(["-KILL", pid]).status();
                        }
                    }
                    for _ in 0..50 {
                        if std::fs::remove_dir(vm.path()).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }

    /// The pids of this metald's warm jails (`metald-jail warm` children whose root is in its
    /// jail directory), alive and not yet reaped.
    pub fn warm_jails(&self) -> Vec<u32> {
        let mine = self.jail_dir.display().to_string();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|p| {
                let pid: u32 = p.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                (args.first()?.ends_with("metald-jail")
                    && args.get(1)? == "warm"
                    && args.get(2)?.contains(&mine))
                .then_some(pid)
            })
            .collect()
    }

    /// Everything metald made for VMs that is still there (empty when clean); with
    /// `running`, the warm pool's spares (`pool-*` namespaces, `mw*` veth ends) are metald's
    /// own and not counted.
    pub fn leftovers(&self, data_dir: &Path, running: bool) -> Vec<String> {
        let mut out = vec![];
        for f in std::fs::read_dir(self.run_dir.join("netns"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if running && f.file_name().to_string_lossy().starts_with("pool-") {
                continue;
            }
            out.push(format!("netns file {}", f.path().display()));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mounts.lines() {
            // While metald runs: its warm spares and the jails' base mount namespace.
            let own = is_metalds_own(line);
            // The run directory itself may be a tmpfs the scale bench mounted (as `/run` is).
            let run_dir = line.split(' ').nth(4) == Some(&*self.run_dir.to_string_lossy());
            if line.contains(&data_dir.display().to_string()) && !(running && own) && !run_dir {
                out.push(format!("mount {line}"));
            }
        }
        for kind in std::fs::read_dir(&self.jail_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            for vm in std::fs::read_dir(kind.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push(format!("jail dir {}", vm.path().display()));
            }
        }
        if !running {
            out.extend(
                self.warm_jails()
                    .iter()
                    .map(|p| format!("warm jail process {p}")),
            );
        }
        for parent in self.cgroup_dirs() {
            for vm in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if vm.path().is_dir() {
                    out.push(format!("cgroup {}", vm.path().display()));
                }
            }
        }
        for line in self.netns.output("ip", &["-br", "link"]).lines() {
            // metald names VM interfaces mv<hex> (host side), mp<hex> (VM side, before the
            // warm pool) and its spares mw<hex>.
            if line.starts_with("mv")
                || line.starts_with("mp")
                || (!running && line.starts_with("mw"))
            {
                out.push(format!("interface {line}"));
            }
        }
        let rules = self
            .netns
            .output("nft", &["list", "table", "inet", "metald"]);
        // Set or map elements naming a VM's interface (`"mv<hex>"`), not the `"mv*"`
        // wildcards: every per-VM element does.
        let names_a_vm = rules
            .match_indices("\"mv")
            .any(|(i, _)| rules[i + 3..].starts_with(|c: char| c.is_ascii_hexdigit()));
        if names_a_vm {
            out.push(format!("nft rules for VMs:\n{rules}"));
        }
        out
    }
}

impl Metald {
    /// Fails the test if any namespace, interface, nft rule, cgroup, mount, jail directory or
    /// VMM process of a VM is left.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind:\n{}",
                left.join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (up to 30 s) until the VM's directory is gone: DeleteVm answers once the VM is
    /// gone for its owner, and its files are removed right after, off the call's path.
    pub fn wait_vm_dir_gone(&self, id: &str) {
        let dir = self.data_dir.join("vms").join(id);
        let deadline = Instant::now() + Duration::from_secs(30);
        while dir.exists() {
            assert!(Instant::now() < deadline, "{} still there", dir.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `/metrics` shows `warm_jails` warm jails and `spares` spare networks ready
    /// (panics with metald's log after 20 s).
    pub fn wait_pools(&self, warm_jails: usize, spares: usize) {
        self.wait_pools_within(warm_jails, spares, Duration::from_secs(20));
    }

    /// [`Metald::wait_pools`], panicking after `limit`.
    pub fn wait_pools_within(&self, warm_jails: usize, spares: usize, limit: Duration) {
        let want = (Some(warm_jails as f64), Some(spares as f64));
        let deadline = Instant::now() + limit;
        while (
            self.metric("metald_warm_jails"),
            self.metric("metald_spare_networks"),
        ) != want
        {
            assert!(Instant::now() < deadline, "{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every VM directory is gone: the last step of removing a deleted VM's
    /// leftovers, which goes on after its DeleteVm answered.
    pub fn wait_vms_removed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let vms = self.data_dir.join("vms");
        // VM directories only: the spare disk copies' `.spare` stays until metald stops.
        let any_vm = |mut d: std::fs::ReadDir| {
            d.any(|e| e.is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.')))
        };
        while std::fs::read_dir(&vms).is_ok_and(any_vm) {
            assert!(Instant::now() < deadline, "{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates a tiny-guest VM from `body` through `api`, boots it and waits (at most
    /// `limit`) for its banner: its id and how long that took. The console file is read as
    /// the benches read bare Firecrackers' own: polling it through the API every millisecond
    /// would cost metald CPU a bare VMM never pays.
    pub fn boot_to_banner(&self, api: &Rest, body: &Value, limit: Duration) -> (String, Duration) {
        let t0 = Instant::now();
        let id = api.create(body.clone());
        api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
        wait_for_banner(&self.console_path(&id), t0, limit);
        (id, t0.elapsed())
    }

    /// Where the VM's console log is.
    pub fn console_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("vms").join(id).join("console.log")
    }

    /// The VM's console log as written so far.
    pub fn console(&self, id: &str) -> String {
        std::fs::read_to_string(self.console_path(id)).unwrap_or_default()
    }

    /// How many bytes the VM's console log holds (an offset for [`Metald::console_from`]).
    pub fn console_len(&self, id: &str) -> u64 {
        let path = self.console_path(id);
        std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len()
    }

    /// The VM's console output from byte `offset` on: what the guest printed since then.
    pub fn console_from(&self, id: &str, offset: u64) -> String {
        let path = self.console_path(id);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let from = usize::try_from(offset).unwrap();
        assert!(from <= bytes.len(), "console shrank below {offset}");
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }

    /// How many bytes metald's log holds (an offset for [`Metald::log_from`]).
    pub fn log_len(&self) -> usize {
        self.log_text().len()
    }

    /// metald's log from byte `offset` on.
    pub fn log_from(&self, offset: usize) -> String {
        self.log_text()[offset..].to_string()
    }

    /// The `VMM stopped` lines metald logged for `id` from log byte `offset` on.
    pub fn vmm_stops_since(&self, id: &str, offset: usize) -> Vec<String> {
        self.log_from(offset)
            .lines()
            .filter(|l| l.contains("VMM stopped") && l.contains(id))
            .map(str::to_string)
            .collect()
    }

    /// The VM's control socket: QEMU's QMP, Firecracker's API. A jailed VMM's is in its
    /// jail directory (`<jail dir>/<backend>/<id>/ctl`), an unjailed one's in the VM's.
    pub fn control_socket(&self, id: &str) -> PathBuf {
        match &self.iso {
            Some(iso) => ["firecracker", "qemu"]
                .iter()
                .map(|kind| iso.jail_dir.join(kind).join(id).join("ctl"))
                .find(|dir| dir.exists())
                .unwrap_or_else(|| panic!("no control directory for {id}"))
                .join("control.sock"),
            None => self.data_dir.join("vms").join(id).join("control.sock"),
        }
    }

    /// QEMU's own run state (`query-status` over QMP on the VM's control socket): "running",
    /// "paused", ...
    pub fn qemu_status(&self, id: &str) -> String {
        let ret = qmp(&self.control_socket(id), "query-status");
        ret["status"]
            .as_str()
            .unwrap_or_else(|| panic!("query-status without a status: {ret}"))
            .to_string()
    }

    /// Firecracker's answer to `GET path` on its API socket (the VM's control socket).
    pub fn firecracker_get(&self, id: &str, path: &str) -> Value {
        let sock = self.control_socket(id);
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--unix-socket"])
            .arg(&sock)
            .arg(format!("http://localhost{path}"))
            .output()
            .expect("curl (installed by scripts/install-deps.sh)");
        assert!(
            out.status.success(),
            "GET {path} on {}: {}{}",
            sock.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "GET {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Firecracker's own state (`GET /`): "Running", "Paused", ...
    pub fn firecracker_state(&self, id: &str) -> String {
        let info = self.firecracker_get(id, "/");
        info["state"]
            .as_str()
            .unwrap_or_else(|| panic!("GET / without a state: {info}"))
            .to_string()
    }

    /// Imports a raw disk holding a shell script the guest runs after boot
    /// (`metald.script=/dev/vdb`, see [`script_request`]) as rootfs asset `id`.
    pub fn import_script(&self, id: &str, script: &str) {
        let mut bytes = script.as_bytes().to_vec();
        bytes.resize(bytes.len().div_ceil(4096) * 4096, b'\n');
        let path = self.data_dir.join(format!("{id}.sh.img"));
        std::fs::write(&path, bytes).unwrap();
        let out = self.assets(&[
            "import",
            "--id",
            id,
            "--kind",
            "rootfs",
            "--file",
            path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// metald's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}
