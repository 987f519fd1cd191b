//! One VM lifecycle, run against every backend present: create, boot, ready, pause, resume,
//! reboot, shut down (from paused), delete, and nothing left. Each state the API reports is
//! checked against the VMM itself (QMP for QEMU, Firecracker's API), never against metald's
//! word alone. Backend-specific checks (limits, jail, devices) stay in the backends' modules.

use serde_json::{json, Value};

use crate::support::*;
use crate::Need;

/// The scenario once per backend, each with that backend's needs: a machine without
/// Firecracker skips only the Firecracker run.
pub fn tests() -> Vec<crate::E2e> {
    let mut tests = crate::e2e![crate::QEMU_GUEST; qemu_with_the_readme_request];
    tests.extend(crate::e2e![&[Need::Root, Need::Firecracker, Need::Kvm];
        firecracker_with_the_tiny_guest,
    ]);
    tests
}

/// What the scenario needs to know of a backend.
struct Backend {
    /// UNKEY_METALD_BACKEND, and the VM's `backend` field.
    name: &'static str,
    /// A metald on this backend with its guest imported.
    start: fn() -> Metald,
    /// The CreateVm body.
    request: Value,
    /// The guest's readiness line.
    marker: &'static str,
    /// What else the guest's readiness output must show (the configured VM, as the guest sees it).
    ready_shows: Option<&'static str>,
    /// The VMM's own word for its state, asked on its control socket.
    vmm_state: fn(&Metald, &str) -> String,
    /// That word for a running and for a paused VM.
    running: &'static str,
    paused: &'static str,
    /// The line the guest prints on the console when it shuts down on its own (the tiny guest
    /// prints nothing: it resets).
    shutdown_line: Option<&'static str>,
}

/// QEMU with the default guest and the README's exact request.
fn qemu_with_the_readme_request() {
    scenario(&Backend {
        name: "qemu",
        start: || metald().start(&qemu_guest()),
        request: readme_request(2, 1_073_741_824),
        marker: READY_MARKER,
        ready_shows: Some("cpus=2"),
        vmm_state: Metald::qemu_status,
        running: "running",
        paused: "paused",
        shutdown_line: Some("METALD_GUEST_SHUTDOWN reason=ctrlaltdel"),
    });
}

/// Firecracker with the tiny guest (any host with /dev/kvm).
fn firecracker_with_the_tiny_guest() {
    scenario(&Backend {
        name: "firecracker",
        start: || metald_with_backend("firecracker").start_with(Metald::import_tiny_guest),
        request: tiny_request(1),
        marker: TINY_MARKER,
        ready_shows: None,
        vmm_state: Metald::firecracker_state,
        running: "Running",
        paused: "Paused",
        shutdown_line: None,
    });
}

fn scenario(b: &Backend) {
    let m = (b.start)();
    assert!(
        m.log_text().contains(&format!("using {}", b.name)),
        "{}",
        m.log_text()
    );
    let api = Rest::new(&m, Some("life"));
    let vm_path = |id: &str, action: &str| format!("/v1/vms/{id}{action}");

    let created = api.call("POST", "/v1/vms", Some(b.request.clone()));
    assert_eq!(created.status, 201, "{}", created.body);
    let vm = &created.body["vm"];
    assert_eq!(vm["state"], "VM_STATE_CREATED");
    assert_eq!(vm["backend"], b.name);
    assert_eq!(
        vm["config"]["cpu"]["vcpuCount"],
        b.request["config"]["cpu"]["vcpu_count"]
    );
    assert_eq!(
        num(&vm["config"]["memory"]["sizeBytes"]),
        b.request["config"]["memory"]["size_bytes"]
            .as_u64()
            .unwrap()
    );
    let id = vm["vmId"].as_str().expect("vm id").to_string();
    let dir = m.data_dir.join("vms").join(&id);
    assert!(dir.join("rootfs.img").exists(), "the VM's own root disk");

    // Boot: a VMM process, its control socket, the guest's readiness line.
    let booted = api.call("POST", &vm_path(&id, "/boot"), None).ok();
    assert_eq!(booted["vm"]["state"], "VM_STATE_RUNNING");
    let pid = booted["vm"]["vmmPid"].as_u64().expect("vmm pid");
    assert!(process_alive(pid));
    assert!(m.control_socket(&id).exists());
    api.wait_ready(&id);
    assert_eq!((b.vmm_state)(&m, &id), b.running);
    let console = api.call("GET", &vm_path(&id, "/console"), None).ok();
    let out = console["output"].as_str().expect("console output");
    assert!(out.contains(b.marker), "console: {out}");
    if let Some(shows) = b.ready_shows {
        assert!(
            out.contains(shows),
            "the guest sees the configured VM: {out}"
        );
    }
    let tail = api
        .call("GET", &vm_path(&id, "/console?tail_bytes=10"), None)
        .ok();
    assert_eq!(tail["output"].as_str().expect("tail").len(), 10, "{tail}");
    assert_eq!(tail["truncated"], true);

    // Pause and resume, as the VMM itself sees them.
    let paused = api.call("POST", &vm_path(&id, "/pause"), None).ok();
    assert_eq!(paused["vm"]["state"], "VM_STATE_PAUSED");
    assert_eq!((b.vmm_state)(&m, &id), b.paused, "the VMM itself is paused");
    let again = api.call("POST", &vm_path(&id, "/pause"), None);
    assert_eq!(
        (again.status, again.code()),
        (400, "failed_precondition"),
        "{}",
        again.body
    );
    assert!(again.message().contains("PAUSED"), "{}", again.body);
    assert_eq!((b.vmm_state)(&m, &id), b.paused);
    let resumed = api.call("POST", &vm_path(&id, "/resume"), None).ok();
    assert_eq!(resumed["vm"]["state"], "VM_STATE_RUNNING");
    assert_eq!((b.vmm_state)(&m, &id), b.running, "the VMM runs again");

    // A graceful reboot: the guest goes down on Ctrl-Alt-Del and a fresh VMM boots it again.
    let (log_at, console_at) = (m.log_len(), m.console_len(&id));
    let rebooted = api
        .call("POST", &vm_path(&id, "/reboot"), Some(json!({})))
        .ok();
    assert_eq!(rebooted["vm"]["state"], "VM_STATE_RUNNING");
    let new_pid = rebooted["vm"]["vmmPid"].as_u64().expect("vmm pid");
    assert_ne!(new_pid, pid, "reboot starts a fresh VMM");
    assert!(!process_alive(pid));
    api.wait_ready(&id);
    assert_eq!((b.vmm_state)(&m, &id), b.running);
    assert_clean_stop(&m, &id, log_at, "reboot");
    let since = m.console_from(&id, console_at);
    assert!(since.contains(b.marker), "the new boot got ready: {since}");
    if let Some(line) = b.shutdown_line {
        assert!(since.contains(line), "the guest went down first: {since}");
    }

    // Shut down from paused: resumed, then Ctrl-Alt-Del; the guest goes down by itself.
    api.call("POST", &vm_path(&id, "/pause"), None).ok();
    assert_eq!((b.vmm_state)(&m, &id), b.paused);
    let (log_at, console_at) = (m.log_len(), m.console_len(&id));
    let down = api
        .call(
            "POST",
            &vm_path(&id, "/shutdown"),
            Some(json!({"timeout_seconds": 30})),
        )
        .ok();
    assert_eq!(down["vm"]["state"], "VM_STATE_SHUTDOWN");
    assert_eq!(
        down["vm"]["vmmPid"],
        Value::Null,
        "no pid once shut down (0 is omitted in JSON)"
    );
    assert!(!process_alive(new_pid));
    assert_clean_stop(&m, &id, log_at, "shutdown");
    if let Some(line) = b.shutdown_line {
        let since = m.console_from(&id, console_at);
        assert!(
            since.contains(line),
            "the guest shut down by itself on Ctrl-Alt-Del: {since}"
        );
    }

    // Delete: the VM, its directory and everything made for it are gone.
    api.call("DELETE", &vm_path(&id, ""), None).ok();
    assert_eq!(api.call("GET", &vm_path(&id, ""), None).status, 404);
    // VM directory (disk, console, socket) removed.
    m.wait_vm_dir_gone(&id);
    assert_eq!(api.call("GET", "/v1/vms", None).ok()["vms"], Value::Null);
    m.assert_clean();
}

/// The VMM stopped once since log byte `log_at`, and cleanly (the guest went down on its own,
/// nothing was killed).
fn assert_clean_stop(m: &Metald, id: &str, log_at: usize, what: &str) {
    let stops = m.vmm_stops_since(id, log_at);
    assert_eq!(stops.len(), 1, "{what}: one VMM stop: {stops:?}");
    assert!(stops[0].contains("outcome=Clean"), "{what}: {}", stops[0]);
}

/// A CreateVm body for the tiny Firecracker guest.
pub fn tiny_request(vcpus: u32) -> Value {
    json!({"config": {"cpu": {"vcpu_count": vcpus}, "memory": {"size_bytes": 128 << 20},
        "kernel": {"image_id": "tiny-elf"}, "rootfs": {"image_id": "tiny-disk"}}})
}
