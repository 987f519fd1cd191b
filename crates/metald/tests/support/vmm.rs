//! Looking at a VMM from outside, as the tests' own witnesses: QMP, `/proc`, signals.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

/// Runs one QMP command on QEMU's socket at `socket` and returns its `return` value. Written
/// here rather than borrowed from metald, so the test asks QEMU with a client of its own.
pub fn qmp(socket: &Path, command: &str) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("QMP connect {}: {e}", socket.display()));
    // A deadline, not a speed: QEMU serves one QMP client at a time and metald may be one.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut lines = BufReader::new(stream).lines();
    let mut next = |what: &str| -> Value {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("QMP closed before {what}"))
            .unwrap_or_else(|e| panic!("QMP read ({what}): {e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent non-JSON ({e}): {line}"))
    };
    let greeting = next("the greeting");
    assert!(
        greeting.get("QMP").is_some(),
        "not a QMP greeting: {greeting}"
    );
    let mut answer = |cmd: &str| -> Value {
        writeln!(writer, "{}", json!({ "execute": cmd })).unwrap();
        loop {
            let msg = next(cmd);
            // Events (STOP, RESUME, ...) may come before the answer.
            if msg.get("event").is_some() {
                continue;
            }
            return msg
                .get("return")
                .cloned()
                .unwrap_or_else(|| panic!("QMP {cmd} failed: {msg}"));
        }
    };
    answer("qmp_capabilities");
    answer(command)
}

/// Kills a VM's VMM from outside (SIGKILL) and checks metald reports the VM FAILED with the signal.
pub fn kill_vmm_and_expect_failed(api: &Rest, id: &str, pid: u64) {
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let vm = api.wait_state(id, "VM_STATE_FAILED", Duration::from_secs(10));
    let failure = vm["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("killed by signal 9"), "{vm}");
}

/// utime + stime of process `pid` (all its threads) in seconds, as the kernel counts it.
pub fn process_cpu_secs(pid: u64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on every Linux ABI metald runs on.
    ticks as f64 / 100.0
}

/// Waits until process `pid` used `secs` more CPU than `from` (a VMM of a spinning guest
/// keeps running whatever metald does), however long the machine takes to give it that.
pub fn wait_process_cpu(pid: u64, from: f64, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = process_cpu_secs(pid);
        if now >= from + secs {
            return now;
        }
        assert!(Instant::now() < deadline, "process {pid} got no CPU");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True while a process exists (and is not a zombie).
pub fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// A bare Firecracker (no metald, no jail) with its API on `sock` and its serial console (its
/// stdout) in `console`: what the benches hold metald against.
pub fn spawn_bare_firecracker(fc: &Path, sock: &Path, console: &Path) -> std::process::Child {
    let _ = std::fs::remove_file(sock);
    std::process::Command::new(fc)
        .arg("--api-sock")
        .arg(sock)
        .arg("--log-path")
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(console).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Boots a tiny guest in the bare Firecracker behind `api` (1 vCPU, 128 MiB): `kernel` with
/// `disk` as its root drive, the four calls metald makes too. Returns how long the last one,
/// `InstanceStart`, took.
pub async fn boot_bare_tiny(
    api: &::metald::backend::firecracker::api::FirecrackerApi,
    kernel: &Path,
    disk: &Path,
) -> Duration {
    use ::metald::backend::firecracker::api::{
        ActionType, BootSource, Drive, MachineConfiguration,
    };
    api.wait_ready(Duration::from_secs(10)).await.unwrap();
    api.put_machine_config(&MachineConfiguration {
        vcpu_count: 1,
        mem_size_mib: 128,
        smt: false,
    })
    .await
    .unwrap();
    api.put_boot_source(&BootSource {
        kernel_image_path: kernel.display().to_string(),
        boot_args: None,
        initrd_path: None,
    })
    .await
    .unwrap();
    api.put_drive(&Drive {
        drive_id: "rootfs".into(),
        path_on_host: disk.display().to_string(),
        is_root_device: true,
        is_read_only: false,
    })
    .await
    .unwrap();
    let t = std::time::Instant::now();
    api.action(ActionType::InstanceStart).await.unwrap();
    t.elapsed()
}
