//! End-to-end tests: the real metald binary, real QEMU VMs (TCG on hosts without hardware KVM),
//! real SQLite files, real HTTP clients. Skipped with a printed reason when QEMU or the guest
//! image is missing, unless METALD_REQUIRE_E2E=1 (as `make test` sets), where that fails.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;
use crate::Need;
use connectrpc::client::{ClientConfig, HttpClient};
use connectrpc::{ErrorCode, Protocol};
use metald_proto::metald::v1 as pb;
use serde_json::{json, Value};

/// The lifecycle and API tests: each boots the default guest under QEMU; two also need a client.
pub fn tests() -> Vec<crate::E2e> {
    let mut tests = crate::e2e![crate::QEMU_GUEST;
        generated_clients_over_connect_and_grpc,
        bad_input_is_refused_precisely_and_changes_nothing,
        state_survives_a_restart_and_running_vms_are_reattached,
        a_never_run_vms_disk_copy_lost_in_a_host_crash_is_made_again_at_start,
        an_unjailed_vmm_of_a_vm_never_recorded_running_is_killed_at_start,
        a_suspended_debian_guest_wakes_with_its_memory_disk_and_addresses,
        extra_drives_and_kernel_args_reach_the_guest,
        a_vmm_that_dies_on_its_own_marks_the_vm_failed,
        a_guest_that_never_becomes_ready_is_failed_with_its_console,
        host_capacity_and_a_reloaded_quota_file_refuse_what_does_not_fit,
    ];
    tests.extend(
        crate::e2e![&[Need::Root, Need::Qemu, Need::Guest, Need::Buf]; buf_curl_drives_a_vm],
    );
    tests.extend(
        crate::e2e![&[Need::Root, Need::Qemu, Need::Guest, Need::Metaldctl]; metaldctl_manages_vms],
    );
    tests
}

/// One generated-client flavour: Connect+protobuf, Connect+JSON, or gRPC.
fn client(m: &Metald, customer: &str, flavour: &str) -> pb::VmServiceClient<HttpClient> {
    let mut cfg = ClientConfig::new(m.url.parse().unwrap())
        .with_default_header("authorization", format!("Bearer dev_customer_{customer}"));
    let http = match flavour {
        "connect-proto" => HttpClient::plaintext(),
        "connect-json" => {
            cfg = cfg.json();
            HttpClient::plaintext()
        }
        "grpc" => {
            cfg = cfg.with_protocol(Protocol::Grpc);
            HttpClient::plaintext_http2_only()
        }
        other => panic!("unknown flavour {other}"),
    };
    pb::VmServiceClient::new(http, cfg)
}

async fn wait_ready_rpc(c: &pb::VmServiceClient<HttpClient>, id: &str) -> pb::VmInfo {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let vm = c
            .get_vm_info(pb::GetVmInfoRequest {
                vm_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_owned()
            .vm
            .into_option()
            .unwrap();
        if vm.guest_ready {
            return vm;
        }
        assert_ne!(vm.state, pb::VmState::VM_STATE_FAILED, "{vm:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "guest not ready: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn rpc_lifecycle(m: &Metald, flavour: &str) {
    let c = client(m, "rpc", flavour);
    let config = pb::VmConfig {
        cpu: pb::CpuConfig {
            vcpu_count: 1,
            ..Default::default()
        }
        .into(),
        memory: pb::MemoryConfig {
            size_bytes: 256 << 20,
            ..Default::default()
        }
        .into(),
        kernel: pb::KernelConfig {
            image_id: KERNEL_ID.into(),
            ..Default::default()
        }
        .into(),
        rootfs: pb::RootfsConfig {
            image_id: ROOTFS_ID.into(),
            ..Default::default()
        }
        .into(),
        metadata: [("client".to_string(), flavour.to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let created = c
        .create_vm(pb::CreateVmRequest {
            config: config.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{flavour} create: {e}"))
        .into_owned();
    let vm = created.vm.into_option().unwrap();
    assert_eq!(vm.state, pb::VmState::VM_STATE_CREATED);
    assert_eq!(
        vm.config.metadata.get("client").map(String::as_str),
        Some(flavour)
    );
    let id = vm.vm_id.clone();
    let booted = c
        .boot_vm(pb::BootVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(booted.vm.state, pb::VmState::VM_STATE_RUNNING);
    wait_ready_rpc(&c, &id).await;
    let console = c
        .get_vm_console(pb::GetVmConsoleRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert!(
        console.output.contains(READY_MARKER),
        "{flavour}: {}",
        console.output
    );
    let paused = c
        .pause_vm(pb::PauseVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(paused.vm.state, pb::VmState::VM_STATE_PAUSED);
    assert_eq!(
        m.qemu_status(&id),
        "paused",
        "{flavour}: QEMU itself is paused"
    );
    // Illegal: pause a paused VM. FailedPrecondition naming the state, nothing changes.
    let err = c
        .pause_vm(pb::PauseVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::FailedPrecondition, "{flavour}");
    assert!(
        err.message.as_deref().unwrap_or("").contains("PAUSED"),
        "{err:?}"
    );
    let resumed = c
        .resume_vm(pb::ResumeVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(resumed.vm.state, pb::VmState::VM_STATE_RUNNING);
    assert_eq!(m.qemu_status(&id), "running", "{flavour}");
    let rebooted = c
        .reboot_vm(pb::RebootVmRequest {
            vm_id: id.clone(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_ne!(rebooted.vm.vmm_pid, booted.vm.vmm_pid);
    wait_ready_rpc(&c, &id).await;
    let list = c
        .list_vms(pb::ListVmsRequest {
            state_filter: pb::VmState::VM_STATE_RUNNING.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(
        list.vms
            .iter()
            .map(|v| v.vm_id.as_str())
            .collect::<Vec<_>>(),
        vec![id.as_str()]
    );
    let down = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: id.clone(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(down.vm.state, pb::VmState::VM_STATE_SHUTDOWN);
    assert!(!process_alive(u64::from(rebooted.vm.vmm_pid)));
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    m.wait_vm_dir_gone(&id);
}

/// The generated Connect client (protobuf and JSON codecs) and gRPC each drive a VM's whole life.
fn generated_clients_over_connect_and_grpc() {
    let guest = qemu_guest();
    let m = metald().start(&guest);
    block_on(async {
        for flavour in ["connect-proto", "connect-json", "grpc"] {
            rpc_lifecycle(&m, flavour).await;
        }
    });
    assert!(m.vmm_pids().is_empty());
}

fn buf_curl(m: &Metald, protocol: &str, method: &str, data: Value) -> Value {
    let buf = buf_bin().expect("required prerequisite missing: the buf CLI");
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let mut cmd = std::process::Command::new(buf);
    cmd.args(["curl", "--schema"]).arg(&proto).args([
        "--protocol",
        protocol,
        "--http2-prior-knowledge",
        "-H",
        "Authorization: Bearer dev_customer_bufuser",
        "-d",
        &data.to_string(),
        &format!("{}/metald.v1.VmService/{method}", m.url),
    ]);
    let out = cmd.output().expect("run buf");
    assert!(
        out.status.success(),
        "buf curl {method}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "buf curl {method} printed non-JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A client nobody here wrote: `buf curl` (npm's @bufbuild/buf) with the repo's proto files,
/// over Connect and gRPC.
fn buf_curl_drives_a_vm() {
    let guest = qemu_guest();
    let m = metald().start(&guest);
    let created = buf_curl(&m, "connect", "CreateVm", readme_request(1, 256 << 20));
    let id = created["vm"]["vmId"].as_str().expect("vm id").to_string();
    let booted = buf_curl(&m, "grpc", "BootVm", json!({"vm_id": id}));
    assert_eq!(booted["vm"]["state"], "VM_STATE_RUNNING");
    let api = Rest::new(&m, Some("bufuser"));
    api.wait_ready(&id);
    let console = buf_curl(&m, "grpc", "GetVmConsole", json!({"vm_id": id}));
    assert!(console["output"].as_str().unwrap().contains(READY_MARKER));
    let listed = buf_curl(
        &m,
        "connect",
        "ListVms",
        json!({"state_filter": "VM_STATE_RUNNING"}),
    );
    assert_eq!(listed["vms"][0]["vmId"], json!(id));
    let down = buf_curl(
        &m,
        "connect",
        "ShutdownVm",
        json!({"vm_id": id, "force": true}),
    );
    assert_eq!(down["vm"]["state"], "VM_STATE_SHUTDOWN");
    let deleted = buf_curl(&m, "grpc", "DeleteVm", json!({"vm_id": id}));
    assert!(deleted.is_object(), "{deleted}");
    assert_eq!(api.call("GET", &format!("/v1/vms/{id}"), None).status, 404);
    m.assert_clean();
}

/// Every kind of bad input gets its code, names its field, and changes nothing.
fn bad_input_is_refused_precisely_and_changes_nothing() {
    let guest = qemu_guest();
    let m = metald().start(&guest);
    let api = Rest::new(&m, Some("picky"));
    let existing = api.create_default();
    let snapshot = |api: &Rest| {
        let list = api.call("GET", "/v1/vms", None).ok();
        let dirs: Vec<_> = std::fs::read_dir(m.data_dir.join("vms"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        (list, dirs)
    };
    let before = snapshot(&api);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = readme_request(1, 256 << 20);
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, u16, &str, &str)> = vec![
        (
            with(&|v| v["config"]["cpu"]["vcpu_count"] = json!(0)),
            400,
            "invalid_argument",
            "config.cpu.vcpu_count: must be between 1 and 255",
        ),
        (
            with(&|v| v["config"]["cpu"]["vcpu_count"] = json!(256)),
            400,
            "invalid_argument",
            "config.cpu.vcpu_count",
        ),
        (
            with(&|v| v["config"]["memory"]["size_bytes"] = json!(64 << 20)),
            400,
            "invalid_argument",
            "config.memory.size_bytes: must be at least 100663296 (96 MiB)",
        ),
        (
            with(&|v| v["config"]["memory"]["size_bytes"] = json!((256 << 20) + 1)),
            400,
            "invalid_argument",
            "config.memory.size_bytes: must be a whole number of MiB",
        ),
        (
            with(&|v| v["config"]["kernel"]["image_id"] = json!("vmlinux-5.10")),
            400,
            "invalid_argument",
            "config.kernel.image_id: unknown image id 'vmlinux-5.10'",
        ),
        (
            with(&|v| v["config"]["rootfs"]["image_id"] = json!("alpine-rootfs")),
            400,
            "invalid_argument",
            "config.rootfs.image_id: unknown image id 'alpine-rootfs'",
        ),
        (
            with(&|v| v["config"]["rootfs"]["image_id"] = json!(KERNEL_ID)),
            400,
            "invalid_argument",
            "config.rootfs.image_id: image 'vmlinux-6.1' is a kernel image, not a rootfs image",
        ),
        (
            with(&|v| v["config"]["cpu"] = json!({"vcpus": 2})),
            400,
            "invalid_argument",
            "config.cpu.vcpus: unknown field",
        ),
        (
            with(&|v| {
                v["config"]["drives"] = json!([{"drive_id": "Data!", "image_id": ROOTFS_ID}])
            }),
            400,
            "invalid_argument",
            "config.drives[0].drive_id",
        ),
        (
            with(&|v| v["config"]["kernel_args"] = json!("a\nb")),
            400,
            "invalid_argument",
            "config.kernel_args",
        ),
        (
            r#"{"config": {"cpu": "#.to_string(),
            400,
            "invalid_argument",
            "body: malformed JSON",
        ),
        (
            "{}".to_string(),
            400,
            "invalid_argument",
            "config: required",
        ),
    ];
    for (body, status, code, needle) in &cases {
        let r = api.raw("POST", "/v1/vms", Some(body));
        assert_eq!((r.status, r.code()), (*status, *code), "{body}: {}", r.body);
        assert!(
            r.message().starts_with(needle) || r.message().contains(needle),
            "{body}: {}",
            r.message()
        );
    }
    // The same strictness for Connect JSON.
    let r = api.raw(
        "POST",
        "/metald.v1.VmService/CreateVm",
        Some(&with(&|v| v["config"]["memory"]["sizebytes"] = json!(1))),
    );
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_argument"),
        "{}",
        r.body
    );
    assert!(
        r.message()
            .contains("config.memory.sizebytes: unknown field"),
        "{}",
        r.body
    );
    // Ids that are not ids.
    for bad in ["abc", "vm-1", "VM-00000000-0000-4000-8000-000000000000"] {
        let r = api.call("GET", &format!("/v1/vms/{bad}"), None);
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_argument"),
            "{bad}: {}",
            r.body
        );
        assert!(r.message().starts_with("vm_id: "), "{}", r.message());
    }
    // Illegal transitions name the current state.
    for (action, needle) in [
        ("pause", "cannot pause a VM in state CREATED; boot it first"),
        (
            "shutdown",
            "cannot shut down a VM in state CREATED; boot it first",
        ),
        ("resume", "cannot resume a VM in state CREATED"),
    ] {
        let r = api.call("POST", &format!("/v1/vms/{existing}/{action}"), None);
        assert_eq!(
            (r.status, r.code()),
            (400, "failed_precondition"),
            "{action}: {}",
            r.body
        );
        assert_eq!(r.message(), needle);
    }
    // Unknown options and bad paging.
    let r = api.call(
        "POST",
        &format!("/v1/vms/{existing}/shutdown"),
        Some(json!({"forse": true})),
    );
    assert_eq!(r.code(), "invalid_argument", "{}", r.body);
    let r = api.call("GET", "/v1/vms?page_token=garbage", None);
    assert!(r.message().starts_with("page_token:"), "{}", r.body);
    let r = api.call("GET", "/v1/vms?state=sleeping", None);
    assert!(r.message().starts_with("state:"), "{}", r.body);
    let r = api.call(
        "GET",
        &format!("/v1/vms/{existing}/console?tail_bytes=99999999"),
        None,
    );
    assert!(r.message().starts_with("tail_bytes:"), "{}", r.body);
    // Missing or malformed credentials.
    for token in [None, Some("Basic x"), Some("Bearer nope")] {
        let mut req = ::reqwest::Client::new().get(format!("{}/v1/vms", m.url));
        if let Some(t) = token {
            req = req.header("authorization", t);
        }
        let (status, body) = block_on(async {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        });
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body["code"], "unauthenticated");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("Bearer dev_customer_<id>"),
            "{body}"
        );
    }
    block_on(async {
        let c = pb::VmServiceClient::new(
            HttpClient::plaintext_http2_only(),
            ClientConfig::new(m.url.parse().unwrap()).with_protocol(Protocol::Grpc),
        );
        let err = c.list_vms(pb::ListVmsRequest::default()).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthenticated, "gRPC without a token");
        assert!(err
            .message
            .unwrap_or_default()
            .contains("Bearer dev_customer_<id>"));
    });
    assert_eq!(snapshot(&api), before, "nothing changed");
    assert_eq!(api.vm(&existing)["state"], "VM_STATE_CREATED");
}

/// Stop metald with VMs in several states and start it again on the same data dir: the list
/// and states are intact, and the running VM's VMM is re-attached (it can be paused and shut down).
/// A guest script that counts, once a second, on the console and into a file on its root disk
/// (synced each time).
const COUNT_SCRIPT: &str = "n=0\nwhile true; do n=$((n+1)); echo $n >> /suspend-count; sync; echo \"COUNT $n\" > /dev/console; sleep 1; done\n";

/// The counts the guest printed, in order.
fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COUNT ")?.parse().ok())
        .collect()
}

/// The Debian guest under QEMU, counting in memory and on disk, suspended and woken: it goes
/// on counting from where it was (its memory came back, it did not boot again), still
/// answers ping at the same addresses, and what it wrote to its disk before the suspend is
/// there.
fn a_suspended_debian_guest_wakes_with_its_memory_disk_and_addresses() {
    let guest = qemu_guest();
    let m = metald().start(&guest);
    m.import_script("count", COUNT_SCRIPT);
    let api = Rest::new(&m, Some("sleepy"));
    let id = api.create_booted(script_request(Some("count")));
    let before = api.vm(&id);
    let deadline = Instant::now() + Duration::from_secs(60);
    while counts(&m.console(&id)).len() < 2 {
        assert!(Instant::now() < deadline, "no counting: {}", m.console(&id));
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    let suspended = api
        .call("POST", &format!("/v1/vms/{id}/suspend"), None)
        .ok();
    let suspend_time = t0.elapsed();
    assert_eq!(
        suspended["vm"]["state"], "VM_STATE_SUSPENDED",
        "{suspended}"
    );
    let state = m.data_dir.join("vms").join(&id).join("suspend.state");
    let size = std::fs::metadata(&state).expect("saved state").len();
    let last = *counts(&m.console(&id)).last().unwrap();
    m.assert_clean();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        *counts(&m.console(&id)).last().unwrap(),
        last,
        "counting while suspended"
    );

    let t0 = Instant::now();
    let woken = api.call("POST", &format!("/v1/vms/{id}/resume"), None).ok();
    let wake_time = t0.elapsed();
    eprintln!("suspend {suspend_time:?} ({size} bytes saved), wake {wake_time:?}");
    assert_eq!(woken["vm"]["state"], "VM_STATE_RUNNING", "{woken}");
    assert_eq!(woken["vm"]["network"], before["network"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = counts(&m.console(&id));
        if seen.last().is_some_and(|n| *n > last + 1) {
            // On from where it was: never from 1 again.
            assert_eq!(seen.iter().filter(|n| **n == 1).count(), 1, "{seen:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no counting after the wake: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let iso = m.iso.as_ref().unwrap();
    iso.netns
        .assert_pings(before["network"]["ipv6Address"].as_str().unwrap());
    api.force_shutdown(&id);
    // What it wrote to its disk before the suspend is there, and it went on after the wake.
    let rootfs = m.data_dir.join("vms").join(&id).join("rootfs.img");
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /suspend-count"])
        .arg(&rootfs)
        .output()
        .unwrap();
    let on_disk: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(
        on_disk.contains(&last) && on_disk.last().is_some_and(|n| *n > last),
        "on disk {on_disk:?}, last before the suspend {last}"
    );
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    m.assert_clean();
}

/// metald killed between spawning an unjailed VMM (isolation off: no cgroup to sweep) and
/// recording the VM RUNNING leaves a VMM working in the VM's directory. The next start kills
/// it and leaves the VM as stored. The stray here is a stand-in process made the same way.
fn an_unjailed_vmm_of_a_vm_never_recorded_running_is_killed_at_start() {
    let guest = qemu_guest();
    let mut m = metald().unisolated().start(&guest);
    let api = Rest::new(&m, Some("crashy"));
    let id = api.create_default();
    m.stop();
    let mut stray = std::process::Command::new("sleep")
        .arg("600")
        .current_dir(m.data_dir.join("vms").join(&id))
        .spawn()
        .unwrap();
    m.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = stray.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the stray VMM still runs");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.code().is_none(), "killed by a signal: {status}");
    assert!(m
        .log_text()
        .contains("killing a VMM whose VM is not running"));
    assert_eq!(
        Rest::new(&m, Some("crashy")).vm(&id)["state"],
        "VM_STATE_CREATED"
    );
}

/// A host crash right after a CreateVm can lose the VM's disk copy, which reaches stable
/// storage in the background: metald, finding the copy never recorded durable at start, makes
/// it again from its image, and the VM boots.
fn a_never_run_vms_disk_copy_lost_in_a_host_crash_is_made_again_at_start() {
    let guest = qemu_guest();
    let mut m = metald().start(&guest);
    let api = Rest::new(&m, Some("crash"));
    let id = api.create_default();
    // A stop waits for the copy's sync, so it is whole here.
    m.stop();
    let disk = m.data_dir.join("vms").join(&id).join("rootfs.img");
    let whole = std::fs::read(&disk).unwrap();
    // What the crash left: a copy with its first MiB (the file system's superblock) and its
    // second half never written, and no record of the sync.
    let mut torn = whole.clone();
    torn[..1 << 20].fill(0);
    torn.truncate(whole.len() / 2);
    std::fs::write(&disk, &torn).unwrap();
    let db = rusqlite::Connection::open(m.data_dir.join("metald.db")).unwrap();
    let n = db
        .execute("UPDATE vms SET disks_durable = 0 WHERE id = ?1", [&id])
        .unwrap();
    assert_eq!(n, 1);
    drop(db);
    m.spawn();
    assert!(
        std::fs::read(&disk).unwrap() == whole,
        "the copy is made again before metald serves"
    );
    assert!(m.log_text().contains("recopied=true"), "{}", m.log_text());
    let api = Rest::new(&m, Some("crash"));
    api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    api.wait_ready(&id);
}

fn state_survives_a_restart_and_running_vms_are_reattached() {
    let guest = qemu_guest();
    let mut m = metald().start(&guest);
    let api = Rest::new(&m, Some("durable"));
    let created = api.create_default();
    let running = api.create_default();
    let orphan = api.create_default();
    for id in [&running, &orphan] {
        api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    }
    api.wait_ready(&running);
    let orphan_pid = api.vm(&orphan)["vmmPid"].as_u64().unwrap();
    let before = api.call("GET", "/v1/vms", None).ok();
    m.stop();
    // While metald is down, one VMM dies.
    std::process::Command::new("kill")
        .args(["-KILL", &orphan_pid.to_string()])
        .status()
        .unwrap();
    while process_alive(orphan_pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
    m.spawn();
    let api = Rest::new(&m, Some("durable"));
    let mut after = api.call("GET", "/v1/vms", None).ok();
    let failed = after["vms"][2].clone();
    assert_eq!(failed["vmId"], json!(orphan));
    assert_eq!(failed["state"], "VM_STATE_FAILED");
    assert_eq!(
        failed["failure"],
        "VMM process was gone when metald restarted"
    );
    after["vms"][2] = before["vms"][2].clone();
    assert_eq!(after, before, "everything else is exactly as it was");
    assert_eq!(api.vm(&created)["state"], "VM_STATE_CREATED");
    assert_eq!(api.vm(&running)["state"], "VM_STATE_RUNNING");
    assert!(
        m.log_text().contains("re-attached to running VMM"),
        "{}",
        m.log_text()
    );
    // The re-attached VM keeps its addresses, its plumbing and its place in the firewall, which
    // metald rewrote at start; the dead VM's namespace and veth are gone.
    let iso = m.iso.as_ref().unwrap();
    let net = api.vm(&running)["network"].clone();
    iso.netns.assert_pings(net["ipv6Address"].as_str().unwrap());
    let rules = iso
        .netns
        .output("nft", &["list", "table", "inet", "metald"]);
    assert!(
        rules.contains(net["hostInterface"].as_str().unwrap()),
        "{rules}"
    );
    let orphan_if = api.vm(&orphan)["network"]["hostInterface"].clone();
    assert!(!rules.contains(orphan_if.as_str().unwrap()), "{rules}");
    assert!(!iso
        .netns
        .output("ip", &["-br", "link"])
        .contains(orphan_if.as_str().unwrap()));
    assert_eq!(m.qemu_status(&running), "running");
    let paused = api
        .call("POST", &format!("/v1/vms/{running}/pause"), None)
        .ok();
    assert_eq!(paused["vm"]["state"], "VM_STATE_PAUSED");
    assert_eq!(
        m.qemu_status(&running),
        "paused",
        "the re-attached QEMU obeyed"
    );
    let down = api.force_shutdown(&running);
    assert_eq!(down["vm"]["state"], "VM_STATE_SHUTDOWN");
    assert!(m.vmm_pids().is_empty());
    m.assert_clean();
}

/// Extra drives (a private writable copy and a shared read-only one) and kernel arguments reach
/// the guest; an asset in use cannot be removed.
fn extra_drives_and_kernel_args_reach_the_guest() {
    let guest = qemu_guest();
    let m = metald().start(&guest);
    let api = Rest::new(&m, Some("disks"));
    let mut body = readme_request(1, 256 << 20);
    body["config"]["drives"] = json!([
        {"drive_id": "scratch", "image_id": ROOTFS_ID},
        {"drive_id": "shared", "image_id": ROOTFS_ID, "read_only": true}
    ]);
    body["config"]["kernel_args"] = json!("metald.hostname=disks-test");
    let created = api.call("POST", "/v1/vms", Some(body)).ok();
    let id = created["vm"]["vmId"].as_str().unwrap().to_string();
    assert_eq!(created["vm"]["config"]["drives"][1]["readOnly"], true);
    let dir = m.data_dir.join("vms").join(&id);
    assert!(
        dir.join("drive-scratch.img").exists(),
        "writable drive is the VM's own copy"
    );
    assert!(
        !dir.join("drive-shared.img").exists(),
        "read-only drive is shared with the asset"
    );
    api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    api.wait_ready(&id);
    let console = api.call("GET", &format!("/v1/vms/{id}/console"), None).ok();
    let out = console["output"].as_str().unwrap();
    assert!(out.contains("hostname=disks-test"), "{out}");
    assert!(
        out.contains("[vdb]") && out.contains("[vdc]"),
        "three disks seen: {out}"
    );
    let out = m.assets(&["remove", ROOTFS_ID]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("used by {id}")));
    api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
        .ok();
    let out = m.assets(&["remove", ROOTFS_ID]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!m.data_dir.join("assets").join(ROOTFS_ID).exists());
}

/// The CLI, against the real daemon.
fn metaldctl_manages_vms() {
    let guest = qemu_guest();
    let ctl = workspace_bin("metaldctl").expect("required prerequisite missing: metaldctl");
    let m = metald().start(&guest);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&ctl)
            .args(["--endpoint", &m.url, "--token", "dev_customer_cli"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&[
        "create",
        "--kernel",
        KERNEL_ID,
        "--rootfs",
        ROOTFS_ID,
        "--metadata",
        "team=cli",
    ]);
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let id = created["vm"]["vmId"].as_str().unwrap().to_string();
    assert_eq!(created["vm"]["config"]["metadata"]["team"], "cli");
    // `list` prints one JSON object per VM.
    let listed = |out: &str| -> Vec<String> {
        serde_json::Deserializer::from_str(out)
            .into_iter::<Value>()
            .map(|v| {
                let v = v.unwrap_or_else(|e| panic!("list printed non-JSON ({e}): {out}"));
                v["vmId"].as_str().expect("vm id in list").to_string()
            })
            .collect()
    };
    let (ok, out, err) = run(&["list"]);
    assert!(ok, "{err}");
    assert_eq!(listed(&out), std::slice::from_ref(&id));
    let (ok, out, err) = run(&["host"]);
    assert!(ok, "{err}");
    let host: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(num(&host["vms"]["used"]), 1, "{out}");
    let (ok, _, err) = run(&["pause", &id]);
    assert!(!ok);
    assert!(err.contains("cannot pause a VM in state CREATED"), "{err}");
    let (ok, _, err) = run(&["get", "vm-nope"]);
    assert!(!ok && err.contains("is not a VM id"), "{err}");
    let (ok, out, err) = run(&["delete", &id]);
    assert!(ok, "{err}");
    let deleted: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("delete printed non-JSON ({e}): {out}"));
    assert!(deleted.is_object(), "{out}");
    let (ok, out, err) = run(&["list"]);
    assert!(ok, "{err}");
    assert!(listed(&out).is_empty(), "{out}");
    let (ok, _, err) = run(&["get", &id]);
    assert!(!ok && err.contains("not found"), "{err}");
    assert_eq!(
        Rest::new(&m, Some("cli"))
            .call("GET", &format!("/v1/vms/{id}"), None)
            .status,
        404
    );
}

/// A VMM killed from outside is noticed: the VM is FAILED with the exit status, and it can be
/// booted again or deleted.
fn a_vmm_that_dies_on_its_own_marks_the_vm_failed() {
    let guest = qemu_guest();
    let m = metald().start(&guest);
    let api = Rest::new(&m, Some("crashy"));
    let id = api.create_default();
    let pid = api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok()["vm"]["vmmPid"]
        .as_u64()
        .unwrap();
    kill_vmm_and_expect_failed(&api, &id, pid);
    // The crash alone removes the VM's namespace, veth, rules, cgroup and jail.
    m.assert_clean();
    api.call("DELETE", &format!("/v1/vms/{id}"), None).ok();
    m.wait_vm_dir_gone(&id);
}

/// A guest that never prints its readiness line is reported FAILED with its console tail, and
/// its VMM is stopped.
fn a_guest_that_never_becomes_ready_is_failed_with_its_console() {
    let guest = qemu_guest();
    let m = metald()
        .env("UNKEY_METALD_BOOT_TIMEOUT_SECONDS", "2")
        .start(&guest);
    let out = m.assets(&[
        "import",
        "--id",
        "silent",
        "--kind",
        "rootfs",
        "--file",
        &guest.join("rootfs.ext4").display().to_string(),
        "--ready-marker",
        "NEVER_PRINTED",
    ]);
    assert!(out.status.success());
    let api = Rest::new(&m, Some("slow"));
    let mut body = readme_request(1, 256 << 20);
    body["config"]["rootfs"]["image_id"] = json!("silent");
    let id = api.call("POST", "/v1/vms", Some(body)).ok()["vm"]["vmId"]
        .as_str()
        .unwrap()
        .to_string();
    api.call("POST", &format!("/v1/vms/{id}/boot"), None).ok();
    let vm = api.wait_state(&id, "VM_STATE_FAILED", Duration::from_secs(30));
    let failure = vm["failure"].as_str().unwrap();
    assert!(
        failure.contains("no 'NEVER_PRINTED' line within 2s; console ends:"),
        "{failure}"
    );
    assert!(
        m.vmm_pids().is_empty(),
        "the silent guest's VMM was stopped"
    );
    m.assert_clean();
}

/// Host capacity on the real host: with MemTotal less a reserve leaving 1000 MiB admitted, one
/// QEMU VM of 256 MiB (plus QEMU's 384 MiB headroom) boots and a second is refused with the
/// numbers, which GET /v1/host reports too. Quotas from UNKEY_METALD_QUOTA_FILE apply at start,
/// a rewritten file takes effect within seconds, and a bad one is logged and changes nothing.
fn host_capacity_and_a_reloaded_quota_file_refuse_what_does_not_fit() {
    let guest = qemu_guest();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_mib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap()
        / 1024;
    let quotas = tempfile::tempdir().unwrap();
    let file = quotas.path().join("quotas.toml");
    std::fs::write(&file, "[customers.capacity]\nvms = 2\n").unwrap();
    let m = metald()
        .env(
            "UNKEY_METALD_HOST_MEMORY_RESERVE_MIB",
            &(total_mib - 1000).to_string(),
        )
        .env("UNKEY_METALD_HOST_MEMORY_OVERCOMMIT", "1")
        .env("UNKEY_METALD_QUOTA_FILE", file.to_str().unwrap())
        .start(&guest);
    let api = Rest::new(&m, Some("capacity"));
    let first = api.create_default();
    let second = api.create_default();
    let refused = api.call("POST", "/v1/vms", Some(readme_request(1, 256 << 20)));
    assert_eq!(
        (refused.status, refused.message()),
        (
            429,
            "quota UNKEY_METALD_QUOTA_VMS exceeded: 2 in use, 1 more asked, limit 2"
        ),
        "{}",
        refused.body
    );
    api.call("POST", &format!("/v1/vms/{first}/boot"), None)
        .ok();
    let full = api.call("POST", &format!("/v1/vms/{second}/boot"), None);
    assert_eq!(
        (full.status, full.code(), full.message()),
        (
            429,
            "resource_exhausted",
            "host memory exhausted: 640 MiB in use, 640 MiB asked, capacity 1000 MiB"
        ),
        "{}",
        full.body
    );
    assert_eq!(api.vm(&second)["state"], "VM_STATE_CREATED");
    let host = Rest::new(&m, Some("operator"))
        .call("GET", "/v1/host", None)
        .ok();
    // MemTotal is in kB: what is admitted is 1000 MiB and a part.
    assert_eq!(
        (
            num(&host["memoryBytes"]["total"]) >> 20,
            num(&host["memoryBytes"]["used"])
        ),
        (1000, 640 << 20),
        "{host}"
    );
    assert_eq!(num(&host["vcpus"]["used"]), 1, "{host}");
    assert_eq!(num(&host["vms"]["used"]), 2, "{host}");
    // Stopping the first makes room for the second.
    api.force_shutdown(&first);
    api.call("POST", &format!("/v1/vms/{second}/boot"), None)
        .ok();
    // A rewritten file raises the quota within a few polls.
    std::fs::write(&file, "[customers.capacity]\nvms = 3\n# raised\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = api.call("POST", "/v1/vms", Some(readme_request(1, 256 << 20)));
        if r.status == 201 {
            break;
        }
        assert_eq!(r.status, 429, "{}", r.body);
        assert!(
            std::time::Instant::now() < deadline,
            "the raised quota never applied"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // A bad file is logged and the quotas in force stay.
    std::fs::write(&file, "[customers.capacity]\nvms = 9\nbogus = 1\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !m.log_text().contains("quota file refused") {
        assert!(std::time::Instant::now() < deadline, "no error logged");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = api.call("POST", "/v1/vms", Some(readme_request(1, 256 << 20)));
    assert_eq!(
        (r.status, r.message()),
        (
            429,
            "quota UNKEY_METALD_QUOTA_VMS exceeded: 3 in use, 1 more asked, limit 3"
        ),
        "{}",
        r.body
    );
    api.force_shutdown(&second);
}
