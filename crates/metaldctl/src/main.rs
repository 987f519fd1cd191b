//! `metaldctl`: a command-line client for metald's `VmService`, speaking Connect (protobuf) to
//! the daemon and printing results as JSON.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use connectrpc::client::{ClientConfig, HttpClient};
use metald_proto::metald::v1 as pb;

#[derive(Parser)]
#[command(name = "metaldctl", version, about = "Manage microVMs through metald")]
struct Cli {
    /// metald's base URL.
    #[arg(long, env = "METALD_ENDPOINT", default_value = "http://127.0.0.1:8080")]
    endpoint: String,
    /// Bearer token (dev mode: dev_customer_<id>).
    #[arg(long, env = "METALD_TOKEN", default_value = "dev_customer_demo")]
    token: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a VM.
    Create {
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Kernel image id.
        #[arg(long, required_unless_present = "from_snapshot")]
        kernel: Option<String>,
        /// Root filesystem image id.
        #[arg(long, required_unless_present = "from_snapshot")]
        rootfs: Option<String>,
        /// Create the VM from this snapshot (its configuration, its saved guest) instead.
        #[arg(long, conflicts_with_all = ["kernel", "rootfs"])]
        from_snapshot: Option<String>,
        /// Extra kernel arguments.
        #[arg(long, default_value = "")]
        kernel_args: String,
        /// Metadata as key=value (repeatable).
        #[arg(long = "metadata", value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
    },
    /// Boot a VM.
    Boot { vm_id: String },
    /// Shut a VM down.
    Shutdown {
        vm_id: String,
        /// Kill at once.
        #[arg(long)]
        force: bool,
        /// Seconds the guest may take (0: default).
        #[arg(long, default_value_t = 0)]
        timeout: u32,
    },
    /// Pause a VM.
    Pause { vm_id: String },
    /// Resume a paused VM, or wake a suspended one.
    Resume { vm_id: String },
    /// Save a VM's memory to disk and end its VMM (resume wakes it).
    Suspend { vm_id: String },
    /// Reboot a VM.
    Reboot {
        vm_id: String,
        /// Kill instead of a clean shutdown first.
        #[arg(long)]
        force: bool,
    },
    /// Delete a VM.
    Delete {
        vm_id: String,
        /// Delete even while running.
        #[arg(long)]
        force: bool,
    },
    /// Show one VM.
    Get { vm_id: String },
    /// List VMs.
    List {
        /// Only this state (created, running, paused, shutdown, failed, suspended).
        #[arg(long)]
        state: Option<String>,
    },
    /// Print the tail of a VM's serial console.
    Console {
        vm_id: String,
        /// Bytes from the end (0: 64 KiB).
        #[arg(long, default_value_t = 0)]
        tail: u32,
    },
    /// Show the host's capacity and what its VMs hold (every customer's).
    Host,
    /// The fleet's hosts: status, capacity, labels and VM counts (an operator call).
    Fleet,
    /// Snapshots that start new VMs (create --from-snapshot).
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Snapshot a running, paused or suspended VM.
    Create { vm_id: String },
    /// List your snapshots.
    List,
    /// Delete a snapshot (VMs created from it keep running).
    Delete { snapshot_id: String },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not key=value"))
}

fn parse_state(s: &str) -> anyhow::Result<pb::VmState> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "created" => pb::VmState::VM_STATE_CREATED,
        "running" => pb::VmState::VM_STATE_RUNNING,
        "paused" => pb::VmState::VM_STATE_PAUSED,
        "shutdown" => pb::VmState::VM_STATE_SHUTDOWN,
        "failed" => pb::VmState::VM_STATE_FAILED,
        "suspended" => pb::VmState::VM_STATE_SUSPENDED,
        other => {
            anyhow::bail!(
                "unknown state '{other}' (created, running, paused, shutdown, failed, suspended)"
            )
        }
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metaldctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let uri = cli
        .endpoint
        .parse()
        .with_context(|| format!("--endpoint {}", cli.endpoint))?;
    let config = ClientConfig::new(uri)
        .with_default_header("authorization", format!("Bearer {}", cli.token));
    let client = pb::VmServiceClient::new(HttpClient::plaintext(), config);
    match cli.command {
        Command::Create {
            vcpus,
            memory_mib,
            kernel,
            rootfs,
            kernel_args,
            metadata,
            from_snapshot,
        } => {
            let metadata = metadata
                .into_iter()
                .collect::<HashMap<_, _>>()
                .into_iter()
                .collect();
            if let Some(snapshot) = from_snapshot {
                let req = pb::CreateVmRequest {
                    config: pb::VmConfig {
                        metadata,
                        ..Default::default()
                    }
                    .into(),
                    from_snapshot: snapshot,
                    ..Default::default()
                };
                return print(&client.create_vm(req).await?.into_owned());
            }
            let config = pb::VmConfig {
                cpu: pb::CpuConfig {
                    vcpu_count: vcpus,
                    ..Default::default()
                }
                .into(),
                memory: pb::MemoryConfig {
                    size_bytes: memory_mib * 1024 * 1024,
                    ..Default::default()
                }
                .into(),
                kernel: pb::KernelConfig {
                    image_id: kernel.unwrap_or_default(),
                    ..Default::default()
                }
                .into(),
                rootfs: pb::RootfsConfig {
                    image_id: rootfs.unwrap_or_default(),
                    ..Default::default()
                }
                .into(),
                kernel_args,
                metadata,
                ..Default::default()
            };
            let req = pb::CreateVmRequest {
                config: config.into(),
                ..Default::default()
            };
            print(&client.create_vm(req).await?.into_owned())
        }
        Command::Boot { vm_id } => print(
            &client
                .boot_vm(pb::BootVmRequest {
                    vm_id,
                    ..Default::default()
                })
                .await?
                .into_owned(),
        ),
        Command::Shutdown {
            vm_id,
            force,
            timeout,
        } => {
            let req = pb::ShutdownVmRequest {
                vm_id,
                force,
                timeout_seconds: timeout,
                ..Default::default()
            };
            print(&client.shutdown_vm(req).await?.into_owned())
        }
        Command::Pause { vm_id } => print(
            &client
                .pause_vm(pb::PauseVmRequest {
                    vm_id,
                    ..Default::default()
                })
                .await?
                .into_owned(),
        ),
        Command::Resume { vm_id } => print(
            &client
                .resume_vm(pb::ResumeVmRequest {
                    vm_id,
                    ..Default::default()
                })
                .await?
                .into_owned(),
        ),
        Command::Suspend { vm_id } => print(
            &client
                .suspend_vm(pb::SuspendVmRequest {
                    vm_id,
                    ..Default::default()
                })
                .await?
                .into_owned(),
        ),
        Command::Reboot { vm_id, force } => print(
            &client
                .reboot_vm(pb::RebootVmRequest {
                    vm_id,
                    force,
                    ..Default::default()
                })
                .await?
                .into_owned(),
        ),
        Command::Delete { vm_id, force } => print(
            &client
                .delete_vm(pb::DeleteVmRequest {
                    vm_id,
                    force,
                    ..Default::default()
                })
                .await?
                .into_owned(),
        ),
        Command::Get { vm_id } => print(
            &client
                .get_vm_info(pb::GetVmInfoRequest {
                    vm_id,
                    ..Default::default()
                })
                .await?
                .into_owned(),
        ),
        Command::List { state } => {
            let state_filter = state
                .as_deref()
                .map(parse_state)
                .transpose()?
                .unwrap_or(pb::VmState::VM_STATE_UNSPECIFIED);
            let mut page_token = String::new();
            loop {
                let req = pb::ListVmsRequest {
                    state_filter: state_filter.into(),
                    page_token,
                    ..Default::default()
                };
                let page = client.list_vms(req).await?.into_owned();
                for vm in &page.vms {
                    print(vm)?;
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                page_token = page.next_page_token;
            }
        }
        Command::Console { vm_id, tail } => {
            let resp = client
                .get_vm_console(pb::GetVmConsoleRequest {
                    vm_id,
                    tail_bytes: tail,
                    ..Default::default()
                })
                .await?
                .into_owned();
            print!("{}", resp.output);
            Ok(())
        }
        Command::Snapshot { command } => match command {
            SnapshotCommand::Create { vm_id } => print(
                &client
                    .create_snapshot(pb::CreateSnapshotRequest {
                        vm_id,
                        ..Default::default()
                    })
                    .await?
                    .into_owned(),
            ),
            SnapshotCommand::List => print(
                &client
                    .list_snapshots(pb::ListSnapshotsRequest::default())
                    .await?
                    .into_owned(),
            ),
            SnapshotCommand::Delete { snapshot_id } => print(
                &client
                    .delete_snapshot(pb::DeleteSnapshotRequest {
                        snapshot_id,
                        ..Default::default()
                    })
                    .await?
                    .into_owned(),
            ),
        },
        Command::Host => print(
            &client
                .get_host_capacity(pb::GetHostCapacityRequest::default())
                .await?
                .into_owned(),
        ),
        Command::Fleet => print(
            &client
                .get_fleet(pb::GetFleetRequest::default())
                .await?
                .into_owned(),
        ),
    }
}
