//! The Firecracker backend: one `firecracker` process per VM, configured and driven over its
//! REST API on the VM's control socket. Pinned to Firecracker v1.16.1's API.

pub mod api;
pub mod metrics;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;

use self::api::{
    ActionType, BootSource, Drive, FirecrackerApi, MachineConfiguration, NetworkInterface,
    RateLimiter, VmRunState,
};
use super::process::{ExitEvent, VmmProcess};
use super::registry::Registry;
use super::{
    open_logs, remove_vmm_files, Backend, BackendError, BackendKind, StartKind, StopMode,
    StopOutcome, VmLaunch, VmmInfo, VmmMetrics,
};
use crate::domain::VmId;

/// Firecracker's vCPU limit.
pub const MAX_VCPUS: u32 = 32;

/// The previous boot's Firecracker log.
const PREVIOUS_LOG: &str = "vmm.log.prev";

/// How long Firecracker may take to open its API socket.
const API_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Kernel arguments metald always gives Firecracker guests: serial console, reboot through the
/// i8042 reset (which makes Firecracker exit), and the first drive as root. The guest contract,
/// these included: `guest/README.md`.
const BASE_KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw";

/// Drives Firecracker.
pub struct FirecrackerBackend {
    binary: PathBuf,
    registry: Registry,
    /// Read ends of each running VM's metrics FIFO.
    fifos: std::sync::Mutex<std::collections::HashMap<VmId, Arc<tokio::sync::Mutex<FifoReader>>>>,
}

/// The read end of a metrics FIFO, what is buffered of a partial line, and the disk operations
/// its records added up to (each record carries deltas since the previous one).
struct FifoReader {
    /// Non-blocking; read when metald wants a record, never waited on (nothing in the
    /// reactor wakes for the records nobody asked for yet).
    rx: std::os::fd::OwnedFd,
    buf: Vec<u8>,
    read_ops: u64,
    write_ops: u64,
    /// Complete records summed since the last [`FifoReader::take`], and the newest of them.
    records: u32,
    newest: String,
    /// The sums as the last [`FifoReader::take`] reported them.
    reported: (u64, u64),
}

/// At most this much is read from a FIFO in one call: a VMM taken over by its guest may write
/// without end, and metald's reader must still return.
const MAX_READ_PER_CALL: usize = 4 * metrics::MAX_LINE_BYTES;

impl FifoReader {
    fn new(rx: std::os::fd::OwnedFd) -> Self {
        Self {
            rx,
            buf: Vec::new(),
            read_ops: 0,
            write_ops: 0,
            records: 0,
            newest: String::new(),
            reported: (0, 0),
        }
    }

    /// Takes over what an earlier run's reader read but never reported (a reboot's old
    /// Firecracker's record written as it exited): the next run's first report counts it.
    fn carry(&mut self, earlier: &FifoReader) {
        if earlier.records == 0 {
            return;
        }
        self.read_ops = earlier.read_ops.saturating_sub(earlier.reported.0);
        self.write_ops = earlier.write_ops.saturating_sub(earlier.reported.1);
        self.records = earlier.records;
        self.newest.clone_from(&earlier.newest);
    }

    /// Reads what the FIFO holds now, without waiting, and sums each complete record in it.
    fn read_ready(&mut self, vm: &VmId) -> Result<(), BackendError> {
        let mut chunk = [0u8; 16384];
        let mut read = 0;
        while read < MAX_READ_PER_CALL {
            let n = match rustix::io::read(&self.rx, &mut chunk) {
                // End of file: Firecracker has exited.
                Ok(0) => break,
                Ok(n) => n,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(fifo_error(e.into())),
            };
            read += n;
            self.buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let raw = String::from_utf8_lossy(&line).trim().to_string();
                // A line that doesn't parse adds nothing but is still kept for operators.
                let d = metrics::parse_flush(&raw).unwrap_or_default();
                // Saturating, like the line's own sums: the VMM writes it, not metald.
                self.read_ops = self.read_ops.saturating_add(d.block_read_ops);
                self.write_ops = self.write_ops.saturating_add(d.block_write_ops);
                self.records = self.records.saturating_add(1);
                self.newest = raw;
            }
            // A record is ~5.4 KB.
            if self.buf.len() > metrics::MAX_LINE_BYTES {
                self.buf.clear();
                tracing::warn!(vm_id = %vm, "metrics FIFO line over {} bytes dropped", metrics::MAX_LINE_BYTES);
            }
        }
        Ok(())
    }

    /// The sums with the newest record, if a record came since the last call.
    fn take(&mut self) -> Option<VmmMetrics> {
        if self.records == 0 {
            return None;
        }
        self.records = 0;
        self.reported = (self.read_ops, self.write_ops);
        Some(VmmMetrics {
            raw: std::mem::take(&mut self.newest),
            block_read_ops: self.read_ops,
            block_write_ops: self.write_ops,
        })
    }
}

fn fifo_error(source: std::io::Error) -> BackendError {
    BackendError::Io {
        op: "read metrics FIFO",
        path: metrics::FIFO.into(),
        source,
    }
}

impl FirecrackerBackend {
    /// A backend running `binary`, reporting VMM exits on `events`.
    pub fn new(binary: PathBuf, events: mpsc::UnboundedSender<ExitEvent>) -> Self {
        Self {
            binary,
            registry: Registry::new(events),
            fifos: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Starts a Firecracker for the VM (its socket, logs and metrics FIFO made afresh) and
    /// either boots its guest or restores the one it saved.
    async fn start(&self, launch: &VmLaunch, how: StartKind) -> Result<VmmProcess, BackendError> {
        let t0 = Instant::now();
        let socket = launch.control_socket();
        let log = launch.vmm_log();
        let dir = crate::vm_dir::VmDir::open(&launch.dir)?;
        // Firecracker leaves its socket behind on every exit, and refuses to start on one.
        launch.open_control_dir()?;
        // Firecracker's logger writes from offset 0 of an existing file; keep the previous
        // boot's log beside the new one instead of interleaving them. An empty one (a first
        // boot's, made at create) is kept: nothing is set aside and no file is made anew.
        if !dir.is_empty_file(crate::files::VMM_LOG) {
            dir.rename(crate::files::VMM_LOG, PREVIOUS_LOG)?;
        }
        let (console, vmm_log) = open_logs(launch)?;
        // The metrics FIFO: its read end is opened first, so Firecracker's open for writing
        // never blocks and nothing it writes is lost. The jailed Firecracker writes it as the
        // VM's uid.
        let earlier = self.fifos_map().remove(&launch.vm_id);
        let rx = dir.fifo_receiver(metrics::FIFO, launch.jail.as_ref().map(|j| j.uid()))?;
        let mut reader = FifoReader::new(rx);
        // A reboot: the old Firecracker wrote its last record as it exited, after the last
        // report (a poll holding the old reader has it, and reports it itself).
        if let Some(Ok(mut old)) = earlier.as_ref().map(|r| r.try_lock()) {
            match old.read_ready(&launch.vm_id) {
                Ok(()) => reader.carry(&old),
                Err(e) => {
                    tracing::debug!(vm_id = %launch.vm_id, error = %crate::report::Chain(&e), "reading the previous run's metrics failed")
                }
            }
        }
        self.fifos_map().insert(
            launch.vm_id.clone(),
            Arc::new(tokio::sync::Mutex::new(reader)),
        );
        // The logger is set on the command line, not with PUT /logger: until a logger exists,
        // Firecracker logs to stdout, which is the guest's serial console file. The metrics
        // FIFO too: one API round trip less on every start.
        let args = vec![
            "--api-sock".to_string(),
            path_str(&socket)?,
            "--id".into(),
            launch.vm_id.to_string(),
            "--log-path".into(),
            path_str(&log)?,
            "--level".into(),
            "Info".into(),
            "--show-level".into(),
            "--metrics-path".into(),
            path_str(&launch.dir.join(metrics::FIFO))?,
        ];
        // The guest's serial console is Firecracker's stdout.
        let process = launch
            .spawn(&self.binary, args, console, vmm_log, self.registry.events())
            .await?;
        let spawned = t0.elapsed();
        let api = FirecrackerApi::new(&socket);
        let mut ready = spawned;
        let mut calls = ConfigureTimes::default();
        let setup = async {
            api.wait_ready(API_READY_TIMEOUT).await?;
            // The socket is there and the guest has not run yet: nothing in the VM can touch
            // the socket's directory from now on.
            launch.seal_control_dir()?;
            ready = t0.elapsed();
            match how {
                StartKind::Boot => configure_and_start(launch, &api, &mut calls).await,
                StartKind::Wake | StartKind::Restore => self.restore(launch, &api).await,
            }
        }
        .await;
        // Where a start's time goes (the per-step profile of issue 14): its files and the
        // process; the jail and Firecracker until its API answers; configuring the guest.
        tracing::debug!(
            vm_id = %launch.vm_id,
            how = how.as_str(),
            spawn_ms = ms(spawned),
            ready_ms = ms(ready.saturating_sub(spawned)),
            configure_ms = ms(t0.elapsed().saturating_sub(ready)),
            net_ms = ms(calls.network),
            instance_start_ms = ms(calls.instance_start),
            "firecracker started"
        );
        self.registry.finish_start(launch, process, setup).await
    }

    /// Loads the VM's suspended state into a fresh Firecracker and resumes its guest: the
    /// snapshot names its disks by path and its network device by TAP name, both the same in
    /// the VM's new jail and namespace.
    async fn restore(&self, launch: &VmLaunch, api: &FirecrackerApi) -> Result<(), BackendError> {
        api.load_snapshot(
            &launch.dir.join(crate::files::SUSPEND_STATE),
            &launch.dir.join(crate::files::SUSPEND_MEMORY),
        )
        .await
    }
}

/// Configures a fresh Firecracker for the VM and starts its guest.
async fn configure_and_start(
    launch: &VmLaunch,
    api: &FirecrackerApi,
    times: &mut ConfigureTimes,
) -> Result<(), BackendError> {
    api.put_machine_config(&MachineConfiguration {
        vcpu_count: launch.vcpu_count,
        mem_size_mib: launch.memory_mib,
        smt: false,
    })
    .await?;
    let mut boot_args = BASE_KERNEL_ARGS.to_string();
    if !launch.extra_kernel_args.is_empty() {
        boot_args.push(' ');
        boot_args.push_str(&launch.extra_kernel_args);
    }
    api.put_boot_source(&BootSource {
        kernel_image_path: path_str(&launch.kernel)?,
        boot_args: Some(boot_args),
        initrd_path: launch.initrd.as_deref().map(path_str).transpose()?,
    })
    .await?;
    for (i, disk) in launch.disks.iter().enumerate() {
        // The VM's own disks by name, relative to the VMM's working directory (the VM's
        // directory, jailed or not): a snapshot saves these paths, and a clone restored
        // in its own directory then opens its own copies, never its source's.
        let path = match disk.path.strip_prefix(&launch.dir) {
            Ok(own) => own,
            Err(_) => disk.path.as_path(),
        };
        api.put_drive(&Drive {
            drive_id: disk.id.clone(),
            path_on_host: path_str(path)?,
            is_root_device: i == 0,
            is_read_only: disk.read_only,
        })
        .await?;
    }
    if let Some(net) = &launch.net {
        let t = Instant::now();
        api.put_network_interface(&NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: net.tap.clone(),
            guest_mac: Some(net.mac.clone()),
            rx_rate_limiter: net.rx_rate_limit.map(RateLimiter::from),
            tx_rate_limiter: net.tx_rate_limit.map(RateLimiter::from),
        })
        .await?;
        times.network = t.elapsed();
    }
    // The TAP is open: what is left of the start takes none of the locks a refill does.
    launch.hold.release();
    let t = Instant::now();
    api.action(ActionType::InstanceStart).await?;
    times.instance_start = t.elapsed();
    Ok(())
}

/// How long the configuring calls that wait on the kernel took: the network device (Firecracker
/// opens the TAP, under the kernel's network lock) and the start (the KVM VM and its vCPUs).
#[derive(Default)]
struct ConfigureTimes {
    network: Duration,
    instance_start: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn path_str(p: &Path) -> Result<String, BackendError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| BackendError::Unsupported(format!("path {} is not UTF-8", p.display())))
}

#[async_trait]
impl Backend for FirecrackerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn max_vcpus(&self) -> u32 {
        MAX_VCPUS
    }

    fn ready(&self) -> Result<(), super::NotReady> {
        super::binary_ready("Firecracker", &self.binary)
    }

    async fn create(&self, launch: &VmLaunch) -> Result<(), BackendError> {
        open_logs(launch).map(drop)
    }

    async fn boot(&self, launch: &VmLaunch) -> Result<VmmProcess, BackendError> {
        self.start(launch, StartKind::Boot).await
    }

    async fn suspend(&self, vm: &VmId, dir: &Path) -> Result<(), BackendError> {
        let api = self.api_for(vm)?;
        api.patch_vm(VmRunState::Paused).await?;
        // Paths as the VMM sees them: the VM's directory is at its host path in the jail too.
        api.create_snapshot(
            &dir.join(crate::files::SUSPEND_STATE),
            &dir.join(crate::files::SUSPEND_MEMORY),
        )
        .await?;
        // Saved: the paused VMM has nothing left to do.
        self.registry.kill(vm).await
    }

    async fn wake(&self, launch: &VmLaunch) -> Result<VmmProcess, BackendError> {
        self.start(launch, StartKind::Wake).await
    }

    async fn snapshot(
        &self,
        vm: &VmId,
        dir: &Path,
        out: &Path,
        _owner_paused: bool,
    ) -> Result<(), BackendError> {
        let api = self.api_for(vm)?;
        let vm_dir = crate::vm_dir::VmDir::open(dir)?;
        for name in [crate::files::SNAPSHOT_STATE, crate::files::SNAPSHOT_MEMORY] {
            vm_dir.remove(name)?;
        }
        // Firecracker writes by path, as the VM's uid: into the VM's directory, then copied
        // out through no-follow opens, so the snapshot is metald's and nothing the VMM can
        // still reach.
        api.create_snapshot(
            &dir.join(crate::files::SNAPSHOT_STATE),
            &dir.join(crate::files::SNAPSHOT_MEMORY),
        )
        .await?;
        let copied = (|| {
            for name in [crate::files::SNAPSHOT_STATE, crate::files::SNAPSHOT_MEMORY] {
                crate::vm_dir::copy_out(&vm_dir, name, &out.join(name))?;
            }
            Ok(())
        })();
        for name in [crate::files::SNAPSHOT_STATE, crate::files::SNAPSHOT_MEMORY] {
            vm_dir.remove(name)?;
        }
        copied
    }

    async fn pause(&self, vm: &VmId) -> Result<(), BackendError> {
        self.api_for(vm)?.patch_vm(VmRunState::Paused).await
    }

    async fn resume(&self, vm: &VmId) -> Result<(), BackendError> {
        self.api_for(vm)?.patch_vm(VmRunState::Resumed).await
    }

    async fn shutdown(&self, vm: &VmId, mode: StopMode) -> Result<StopOutcome, BackendError> {
        let api = self.api_for(vm);
        let ask = async move {
            let api = api?;
            // A paused guest cannot react to the key press.
            api.patch_vm(VmRunState::Resumed).await?;
            api.action(ActionType::SendCtrlAltDel).await
        };
        self.registry.stop(vm, mode, ask).await
    }

    async fn vmm_metrics(&self, vm: &VmId, ask: bool) -> Result<Option<VmmMetrics>, BackendError> {
        let Some(reader) = self.fifos_map().get(vm).cloned() else {
            return Ok(None);
        };
        let mut r = reader.lock().await;
        // What Firecracker wrote by itself (every 60 s, and as it exits) costs no API call.
        r.read_ready(vm)?;
        if r.records > 0 || !ask {
            return Ok(r.take());
        }
        self.api_for(vm)?.action(ActionType::FlushMetrics).await?;
        // Firecracker has written the line by the time the action returns; a line longer than
        // the pipe's buffer comes in parts.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        loop {
            r.read_ready(vm)?;
            if r.records > 0 || tokio::time::Instant::now() >= deadline {
                return Ok(r.take());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn delete(&self, vm: &VmId, dir: &Path) -> Result<(), BackendError> {
        self.fifos_map().remove(vm);
        self.registry.kill_now(vm)?;
        let _ignored = std::fs::remove_file(dir.join(metrics::FIFO));
        let _ignored = std::fs::remove_file(dir.join(PREVIOUS_LOG));
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

impl FirecrackerBackend {
    fn fifos_map(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<VmId, Arc<tokio::sync::Mutex<FifoReader>>>,
    > {
        // Map operations cannot leave it inconsistent.
        self.fifos.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn api_for(&self, vm: &VmId) -> Result<FirecrackerApi, BackendError> {
        Ok(FirecrackerApi::new(&self.registry.control_socket(vm)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn record(reads: u64) -> String {
        format!("{{\"block_rootfs\":{{\"read_count\":{reads},\"write_count\":1}}}}\n")
    }

    /// Records that came by themselves are summed (each carries deltas), a partial one waits
    /// for its end, and a line past the cap is dropped without ending the reads after it.
    #[tokio::test]
    async fn every_record_is_summed_once_and_an_endless_line_is_dropped() {
        let (rx, mut tx) = nonblocking_pipe();
        // The writer waits for room: the endless line is larger than the pipe.
        rustix::fs::fcntl_setfl(&tx, rustix::fs::OFlags::empty()).unwrap();
        let mut r = FifoReader::new(rx);
        let vm = VmId::generate();
        r.read_ready(&vm).unwrap();
        assert!(r.take().is_none(), "nothing written yet");

        let two = format!("{}{}", record(2), record(3));
        let (first, rest) = two.split_at(two.len() - 5);
        tx.write_all(first.as_bytes()).unwrap();
        r.read_ready(&vm).unwrap();
        let m = r.take().unwrap();
        assert_eq!((m.block_read_ops, m.block_write_ops), (2, 1));
        assert_eq!(m.raw, record(2).trim());
        tx.write_all(rest.as_bytes()).unwrap();
        r.read_ready(&vm).unwrap();
        let m = r.take().unwrap();
        assert_eq!((m.block_read_ops, m.block_write_ops), (5, 2));
        assert!(r.take().is_none(), "each record is taken once");

        // A VMM writing without end: the line is dropped past the cap, a call returns after a
        // bounded read, and the records after it still count.
        let endless = vec![b'x'; metrics::MAX_LINE_BYTES + 1];
        let writer = std::thread::spawn(move || {
            tx.write_all(&endless).unwrap();
            tx.write_all(b"\n").unwrap();
            tx.write_all(record(7).as_bytes()).unwrap();
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let m = loop {
            r.read_ready(&vm).unwrap();
            if let Some(m) = r.take() {
                break m;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the record after it never came"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        writer.join().unwrap();
        assert_eq!(m.block_read_ops, 12, "{}", m.raw);
    }

    /// A start holds the pools' refills while Firecracker opens its TAP, and lets them go
    /// before the guest's start, with or without a network device.
    #[tokio::test]
    async fn the_refills_hold_ends_after_the_tap_and_before_instance_start() {
        for net in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let starts = Arc::new(metald_host::starts::Starts::default());
            let seen: Arc<std::sync::Mutex<Vec<(String, usize)>>> = Arc::default();
            let (api, _) = api::tests::answering(dir.path(), None, false, {
                let (starts, seen) = (Arc::clone(&starts), Arc::clone(&seen));
                Arc::new(move |line: &str| {
                    seen.lock()
                        .unwrap()
                        .push((line.to_string(), starts.in_flight()));
                })
            });
            let mut launch = crate::registry::tests::launch(dir.path());
            launch.disks = vec![crate::Disk {
                id: "rootfs".into(),
                path: dir.path().join("rootfs.img"),
                read_only: false,
            }];
            launch.net = net.then(|| metald_host::network::VmNetworkPlan {
                netns: dir.path().join("ns"),
                tap: "tap0".into(),
                bridge: "br0".into(),
                peer_if: "mp1".into(),
                host_if: "mv1".into(),
                mac: "02:00:00:00:00:01".into(),
                ipv6: std::net::Ipv6Addr::LOCALHOST,
                ipv4: None,
                gateway6: std::net::Ipv6Addr::LOCALHOST,
                gateway4: None,
                rx_rate_limit: None,
                tx_rate_limit: None,
            });
            launch.hold = metald_host::starts::StartHold::new(Some(starts.begin()));
            configure_and_start(&launch, &api, &mut ConfigureTimes::default())
                .await
                .unwrap();
            let seen = seen.lock().unwrap().clone();
            let held = |prefix: &str| {
                seen.iter()
                    .find(|(l, _)| l.starts_with(prefix))
                    .map(|(_, n)| *n)
                    .unwrap_or_else(|| panic!("no {prefix}: {seen:?}"))
            };
            assert_eq!(held("PUT /drives/rootfs"), 1, "{seen:?}");
            if net {
                assert_eq!(held("PUT /network-interfaces/eth0"), 1, "{seen:?}");
            }
            assert_eq!(held("PUT /actions"), 0, "{seen:?}");
            assert!(!launch.hold.is_held());
        }
    }

    fn nonblocking_pipe() -> (std::os::fd::OwnedFd, std::fs::File) {
        let (rx, tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::NONBLOCK).unwrap();
        (rx, std::fs::File::from(tx))
    }

    /// A reboot: what the old run's reader read after its last report (the record Firecracker
    /// wrote as it exited) is the new run's first report, and nothing is carried twice.
    #[test]
    fn a_reboots_last_record_is_carried_into_the_next_run() {
        let vm = VmId::generate();
        let (rx, mut tx) = nonblocking_pipe();
        let mut old = FifoReader::new(rx);
        tx.write_all(record(2).as_bytes()).unwrap();
        old.read_ready(&vm).unwrap();
        assert_eq!(old.take().unwrap().block_read_ops, 2);
        tx.write_all(record(4).as_bytes()).unwrap();
        drop(tx);
        old.read_ready(&vm).unwrap();

        let mut new = FifoReader::new(nonblocking_pipe().0);
        new.carry(&old);
        let m = new.take().expect("the old run's last record");
        assert_eq!((m.block_read_ops, m.block_write_ops), (4, 1), "{}", m.raw);
        let mut next = FifoReader::new(nonblocking_pipe().0);
        next.carry(&new);
        assert!(next.take().is_none(), "all of it was reported");
    }
}
