//! End-to-end tests of the Firecracker backend through metald's API, with a tiny guest the test
//! writes itself (a 64-bit ELF that prints a banner on the serial port, then waits for a key on
//! the i8042 keyboard and resets, which makes Firecracker exit). It proves the whole control path
//! for real on any host with /dev/kvm; full Linux guests under Firecracker need hardware KVM
//! (see `full_guest_boots_where_hardware_kvm_exists`).
// Tests: a failed step should panic with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const TINY_MARKER: &str = "METALD_TINY_GUEST_READY";

/// Where the ELF's single segment is loaded and run: Firecracker's loader wants the entry at or
/// above 1 MiB and loads segments at their physical address.
const LOAD_ADDR: u64 = 0x10_0000;
const HEADERS: u64 = 64 + 56;

/// The tiny guest: an ELF64 executable with one PT_LOAD segment.
fn tiny_guest_elf() -> Vec<u8> {
    let mut code: Vec<u8> = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8 (COM1)
    for b in format!("{TINY_MARKER}\n").bytes() {
        code.extend([0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code.extend([
        0xf3, 0x90, // wait: pause
        0xe4, 0x64, //       in al, 0x64   (i8042 status)
        0xa8, 0x01, //       test al, 1    (output buffer full: a key was pressed)
        0x74, 0xf8, //       jz wait
        0xb0, 0xfe, //       mov al, 0xfe
        0xe6, 0x64, //       out 0x64, al  (i8042 reset: Firecracker exits)
        0xf4, //       halt: hlt
        0xeb, 0xfd, //       jmp halt
    ]);
    let size = HEADERS + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend((LOAD_ADDR + HEADERS).to_le_bytes()); // entry: the code right after the headers
    elf.extend(64u64.to_le_bytes()); // program headers right after this header
    elf.extend(0u64.to_le_bytes()); // no section headers
    elf.extend(0u32.to_le_bytes());
    elf.extend(64u16.to_le_bytes());
    elf.extend(56u16.to_le_bytes());
    elf.extend(1u16.to_le_bytes());
    elf.extend(64u16.to_le_bytes());
    elf.extend(0u16.to_le_bytes());
    elf.extend(0u16.to_le_bytes());
    assert_eq!(elf.len(), 64);
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R+X
    elf.extend(0u64.to_le_bytes()); // from file offset 0
    elf.extend(LOAD_ADDR.to_le_bytes());
    elf.extend(LOAD_ADDR.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(size.to_le_bytes());
    elf.extend(0x1000u64.to_le_bytes());
    assert_eq!(elf.len() as u64, HEADERS);
    elf.extend(code);
    elf
}

fn firecracker_ready() -> bool {
    if firecracker_bin().is_none() {
        // Firecracker is in no package registry; it is optional even under METALD_REQUIRE_E2E.
        eprintln!("SKIPPED: no firecracker binary (PATH or UNKEY_METALD_FIRECRACKER_BIN); Firecracker backend tests did not run");
        return false;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm missing; Firecracker needs KVM");
        return false;
    }
    true
}

fn import_tiny_guest(m: &Metald) {
    let kernel = m.data_dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_guest_elf()).unwrap();
    let disk = m.data_dir.join("tiny.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    for args in [
        vec![
            "import",
            "--id",
            "tiny-elf",
            "--kind",
            "kernel",
            "--file",
            kernel.to_str().unwrap(),
        ],
        vec![
            "import",
            "--id",
            "tiny-disk",
            "--kind",
            "rootfs",
            "--file",
            disk.to_str().unwrap(),
            "--ready-marker",
            TINY_MARKER,
        ],
    ] {
        let out = m.assets(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Asks Firecracker itself (GET / on the VM's API socket) what state it is in.
fn firecracker_state(m: &Metald, id: &str) -> String {
    let sock = m.data_dir.join("vms").join(id).join("control.sock");
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--unix-socket",
            sock.to_str().unwrap(),
            "http://localhost/",
        ])
        .output()
        .expect("curl (installed by scripts/install-deps.sh)");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["state"].as_str().unwrap_or("").to_string()
}

#[test]
fn firecracker_lifecycle_with_the_tiny_guest() {
    if !firecracker_ready() {
        return;
    }
    let m = metald_with_backend("firecracker").start_with(import_tiny_guest);
    assert!(
        m.log_text().contains("using firecracker"),
        "{}",
        m.log_text()
    );
    let api = Rest::new(&m, Some("fc"));
    let body = json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
        "kernel": {"image_id": "tiny-elf"}, "rootfs": {"image_id": "tiny-disk"}}});
    let r = api.call("POST", "/v1/vms", Some(body.clone()));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["vm"]["backend"], "firecracker");
    let id = r.body["vm"]["vmId"].as_str().unwrap().to_string();
    // Firecracker's own vCPU limit is enforced.
    let mut too_many = body.clone();
    too_many["config"]["cpu"]["vcpu_count"] = json!(33);
    let r = api.call("POST", "/v1/vms", Some(too_many));
    assert!(
        r.message()
            .contains("must be between 1 and 32 (firecracker limit)"),
        "{}",
        r.body
    );

    let booted = api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    let pid = booted["vm"]["vmmPid"].as_u64().unwrap();
    api.wait_ready(&id);
    assert_eq!(firecracker_state(&m, &id), "Running");
    let console = api.call("GET", &format!("/v1/vms/{id}/console"), None).ok();
    assert_eq!(
        console["output"],
        format!("{TINY_MARKER}\n"),
        "the console holds only the guest's output"
    );
    let vmm_log =
        std::fs::read_to_string(m.data_dir.join("vms").join(&id).join("vmm.log")).unwrap();
    assert!(vmm_log.contains("Running Firecracker v"), "{vmm_log}");

    api.call("POST", &format!("/v1/vms/{id}/pause"), None).ok();
    assert_eq!(firecracker_state(&m, &id), "Paused");
    api.call("POST", &format!("/v1/vms/{id}/resume"), None).ok();
    assert_eq!(firecracker_state(&m, &id), "Running");

    let rebooted = api.call("POST", &format!("/v1/vms/{id}/reboot"), None).ok();
    let new_pid = rebooted["vm"]["vmmPid"].as_u64().unwrap();
    assert_ne!(new_pid, pid);
    assert!(!process_alive(pid));
    api.wait_ready(&id);
    // Reboot was graceful: Ctrl-Alt-Del reached the guest, which reset, so Firecracker exited.
    assert!(m.log_text().contains("outcome=Clean"), "{}", m.log_text());

    // Shutdown of a paused VM: resumed, then Ctrl-Alt-Del; the guest resets and Firecracker exits.
    api.call("POST", &format!("/v1/vms/{id}/pause"), None).ok();
    let down = api
        .call(
            "POST",
            &format!("/v1/vms/{id}/shutdown"),
            Some(json!({"timeout_seconds": 10})),
        )
        .ok();
    assert_eq!(down["vm"]["state"], "VM_STATE_SHUTDOWN");
    assert!(!process_alive(new_pid));
    assert_eq!(m.log_text().matches("vm shut down").count(), 1);
    assert_eq!(
        m.log_text().matches("outcome=Clean").count(),
        2,
        "{}",
        m.log_text()
    );
    assert_eq!(
        m.log_text().matches("outcome=Killed").count(),
        0,
        "{}",
        m.log_text()
    );

    // Boot again after shutdown, then a VMM killed from outside is noticed.
    let again = api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    let pid3 = again["vm"]["vmmPid"].as_u64().unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &pid3.to_string()])
        .status()
        .unwrap();
    let failed = api.wait_state(&id, "VM_STATE_FAILED", Duration::from_secs(10));
    assert!(
        failed["failure"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9"),
        "{failed}"
    );

    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    assert!(!m.data_dir.join("vms").join(&id).exists());
    assert!(m.vmm_pids().is_empty());
}

/// The default Debian guest under Firecracker. Needs hardware KVM: on kvm-pvm hosts stock
/// kernels crash (KVM_EXIT_INTERNAL_ERROR), so this is skipped there with the reason.
#[test]
fn full_guest_boots_where_hardware_kvm_exists() {
    if !firecracker_ready() {
        return;
    }
    let (hw, why) = metald::config::hardware_kvm(Path::new("/sys"), Path::new("/dev"));
    if !hw {
        eprintln!("SKIPPED: full Debian guest under Firecracker needs hardware KVM: {why}");
        return;
    }
    let Some(guest) = qemu_guest() else { return };
    let m = metald_with_backend("firecracker").start(&guest);
    let api = Rest::new(&m, Some("fcfull"));
    let id = api.create_default();
    api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    api.wait_ready(&id);
    let down = api
        .call(
            "POST",
            &format!("/v1/vms/{id}/shutdown"),
            Some(json!({"timeout_seconds": 30})),
        )
        .ok();
    assert_eq!(down["vm"]["state"], "VM_STATE_SHUTDOWN");
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    assert!(m.vmm_pids().is_empty());
}
