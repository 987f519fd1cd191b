//! Chaos (issue 13): client threads create, boot, pause, resume, reboot, shut down and delete
//! real VMs at random while the runner kills metald with SIGKILL at random instants, now and
//! then kills a VMM too, and restarts metald each time. After every restart, with every client
//! held still, it checks what must hold whatever instant metald died at:
//!
//! - a VM row is RUNNING or PAUSED exactly when a live VMM runs in the VM's cgroup, and every
//!   row has its VM directory;
//! - nothing of a VM (VMM process, network namespace, veth, TAP, cgroup, mount, jail
//!   directory, nft element, VM directory with its disk copy) exists without its row, and
//!   nothing of a sandbox while the VM has no VMM;
//! - no IP, network slot or uid is held twice;
//! - no acknowledged create is lost and no acknowledged delete undone (a call whose answer
//!   never came may have gone either way);
//! - for every VM without a VMM, billaged's sums equal metald's lifetime totals once metald's
//!   outbox drained, and no interval was billed twice.
//!
//! At the end every VM is shut down, checked once more, deleted, and nothing may be left. A
//! report (kills, operations, checks, violations) goes to stderr; any violation fails the
//! test. From the environment: `METALD_CHAOS_KILLS` (20: the short run `make test` includes;
//! `make chaos` runs 200), `METALD_CHAOS_SEED` (random, printed; it repeats every random
//! choice, though not the machine's timing), `METALD_CHAOS_CLIENTS` (4) and
//! `METALD_CHAOS_BACKEND` (`firecracker` with the tiny guest where a Firecracker binary and
//! /dev/kvm exist, else `qemu` with the default guest).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use metald::domain::VmId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::support::*;
use crate::Need;

/// The chaos run. It needs what a QEMU run needs (which `make test` provides) and billaged;
/// it drives Firecracker instead where that exists.
pub fn tests() -> Vec<crate::E2e> {
    crate::e2e![&[Need::Root, Need::Qemu, Need::Guest, Need::Billaged];
        chaos_kills_and_restarts_keep_every_invariant,
    ]
}

/// How long one client call may take before the client gives up on its answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the machine may take to agree with metald's rows after a restart: a VMM that died
/// on its own is marked FAILED and its sandbox removed by metald's exit handler a moment later.
const SETTLE: Duration = Duration::from_secs(5);
/// Stored VMs one client keeps at most.
const VMS_PER_CLIENT: usize = 3;

/// The run: kill cycles, the end, the report; fails on any violation.
fn chaos_kills_and_restarts_keep_every_invariant() {
    let settings = Settings::from_env();
    eprintln!("chaos: {settings}");
    let mut run = Run::start(&settings);
    run.cycles(&settings);
    let calls = run.finish(settings.kills + 1);
    let kept = run.keep_evidence(&settings);
    let report = run.report(&settings, &calls, &kept);
    let violations = run.violations().len();
    // Printed before metald goes: its drop checks again and may fail with its whole log.
    eprintln!("{report}");
    drop(run);
    assert!(
        violations == 0,
        "chaos: {violations} invariant violation(s); the report above lists each"
    );
}

/// What a run does (from the environment).
struct Settings {
    /// How many times metald is killed.
    kills: usize,
    /// Seeds every random choice, the clients' and the runner's.
    seed: u64,
    /// How many client threads, one customer each.
    clients: usize,
    /// The VMs driven.
    flavor: Flavor,
}

impl Settings {
    /// The settings the environment asks for (see the module's doc).
    fn from_env() -> Self {
        let num = |k: &str| {
            std::env::var(k).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|e| panic!("{k}={v}: not a number ({e})"))
            })
        };
        let flavor = match std::env::var("METALD_CHAOS_BACKEND").ok().as_deref() {
            Some("qemu") => Flavor::Qemu,
            Some("firecracker") => Flavor::Firecracker,
            Some(other) => panic!("METALD_CHAOS_BACKEND={other}: qemu or firecracker"),
            None if firecracker_bin().is_some() && Path::new("/dev/kvm").exists() => {
                Flavor::Firecracker
            }
            None => Flavor::Qemu,
        };
        Self {
            kills: num("METALD_CHAOS_KILLS").map_or(20, |n| n as usize),
            seed: num("METALD_CHAOS_SEED").unwrap_or_else(rand::random),
            clients: num("METALD_CHAOS_CLIENTS").map_or(4, |n| n as usize).max(1),
            flavor,
        }
    }
}

impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kills of metald, {} clients, {} VMs, seed {} (METALD_CHAOS_SEED={} repeats the choices)",
            self.kills,
            self.clients,
            self.flavor.backend(),
            self.seed,
            self.seed
        )
    }
}

/// The VMs a run drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    /// The default guest under QEMU (TCG here: each running guest takes a core).
    Qemu,
    /// The tiny guest under Firecracker (its vCPU busy-polls the keyboard controller).
    Firecracker,
}

impl Flavor {
    /// UNKEY_METALD_BACKEND.
    fn backend(self) -> &'static str {
        match self {
            Flavor::Qemu => "qemu",
            Flavor::Firecracker => "firecracker",
        }
    }

    /// The CreateVm body.
    fn request(self) -> Value {
        match self {
            Flavor::Qemu => readme_request(1, 256 << 20),
            Flavor::Firecracker => crate::lifecycle::tiny_request(1),
        }
    }

    /// How many VMs one customer may run at once (UNKEY_METALD_QUOTA_RUNNING_VMS): every
    /// running guest competes for the host's two cores, and a starved metald is slow to
    /// answer, which would only test the timeouts.
    fn running_per_customer(self) -> u32 {
        match self {
            Flavor::Qemu => 1,
            Flavor::Firecracker => 2,
        }
    }

    /// A metald (not started) for these VMs, batching usage every 500 ms to billaged on
    /// `billing_port`.
    fn metald(self, billing_port: u16) -> Metald {
        let b = metald_with_backend(self.backend())
            .env("UNKEY_METALD_BILLING_ENABLED", "true")
            .env(
                "UNKEY_METALD_BILLING_ENDPOINT",
                &format!("http://127.0.0.1:{billing_port}"),
            )
            .env("UNKEY_METALD_BILLING_BATCH_INTERVAL", "500ms")
            .env("UNKEY_METALD_BILLING_HEARTBEAT_INTERVAL", "1s")
            .env(
                "UNKEY_METALD_QUOTA_RUNNING_VMS",
                &self.running_per_customer().to_string(),
            );
        match self {
            Flavor::Qemu => {
                let guest = qemu_guest();
                b.prepare(|m| m.import_default_guest(&guest))
            }
            Flavor::Firecracker => b.prepare(Metald::import_tiny_guest),
        }
    }
}

/// A call a client makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    /// `POST /v1/vms`.
    Create,
    /// `POST /v1/vms/{id}/boot`.
    Boot,
    /// `POST /v1/vms/{id}/pause`.
    Pause,
    /// `POST /v1/vms/{id}/resume`: unpauses, or wakes a suspended VM.
    Resume,
    /// `POST /v1/vms/{id}/suspend`.
    Suspend,
    /// `POST /v1/vms/{id}/reboot`, forced or not.
    Reboot,
    /// `POST /v1/vms/{id}/shutdown`, forced or with a 2 s grace.
    Shutdown,
    /// `DELETE /v1/vms/{id}`, mostly with `force=true`.
    Delete,
    /// `GET /v1/vms/{id}`: learns the state after an answer that did not tell it.
    Get,
}

impl Op {
    /// Every operation on an existing VM (for the occasional call the state does not allow).
    const ON_A_VM: [Op; 8] = [
        Op::Boot,
        Op::Pause,
        Op::Resume,
        Op::Suspend,
        Op::Reboot,
        Op::Shutdown,
        Op::Delete,
        Op::Get,
    ];

    /// Its name in the report.
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Boot => "boot",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Suspend => "suspend",
            Op::Reboot => "reboot",
            Op::Shutdown => "shutdown",
            Op::Delete => "delete",
            Op::Get => "get",
        }
    }
}

/// How a call ended.
enum Outcome {
    /// A 2xx answer, with its body.
    Ok(Value),
    /// An error answer.
    Refused {
        /// HTTP status.
        status: u16,
        /// Connect code.
        code: String,
        /// Its message.
        message: String,
    },
    /// No answer: metald was down or died during the call, or the timeout passed.
    NoAnswer,
}

/// How one operation's calls ended.
#[derive(Default, Clone)]
struct Tally {
    /// Calls sent.
    attempted: u64,
    /// 2xx answers.
    ok: u64,
    /// Error answers by Connect code.
    refused: BTreeMap<String, u64>,
    /// Calls without an answer.
    no_answer: u64,
}

/// What the clients saw: tallies per operation and the `internal` answers.
#[derive(Default)]
struct Calls {
    /// Per operation.
    tallies: BTreeMap<Op, Tally>,
    /// Each `internal` answer (a metald error worth reading, not in itself a violation).
    internal: Vec<String>,
}

/// What a client knows of one of its VMs from the answers it got.
#[derive(Clone, Debug, Default)]
struct Known {
    /// The state last answered (`VM_STATE_…`), None when no answer told it.
    state: Option<String>,
    /// A delete was sent and its answer never came: the VM may be gone.
    delete_unanswered: bool,
}

/// What one client knows of its customer's VMs. The runner reads (and completes) it while
/// the clients are held still.
#[derive(Default)]
struct Book {
    /// VMs whose create was acknowledged, or that a check found after a create without an
    /// answer.
    vms: BTreeMap<String, Known>,
    /// Creates that got no answer: each may or may not have made a VM.
    unknown_creates: u64,
    /// VMs a check found that no acknowledged create made (each one an unanswered create's).
    adopted: u64,
    /// VMs whose delete was acknowledged: never to be seen again.
    deleted: BTreeSet<String>,
    /// Creates that were acknowledged.
    acked_creates: u64,
}

/// The invariants checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Invariant {
    /// RUNNING or PAUSED exactly when a live VMM is in the VM's cgroups; a row has its
    /// directory.
    StateMatchesVmm,
    /// Nothing of a VM without its row; no sandbox piece of a VM without a VMM.
    NothingWithoutItsVm,
    /// No IP, network slot or uid held by two VMs.
    NothingHeldTwice,
    /// Acknowledged creates stay, acknowledged deletes stay done.
    AckedCallsHold,
    /// billaged's sums equal metald's lifetime totals; no interval billed twice.
    BillingMatches,
    /// metald comes back ready, answers and never panics.
    MetaldServes,
    /// Deleting every VM at the end leaves nothing.
    CleanAtEnd,
}

impl Invariant {
    /// Its statement in the report.
    fn text(self) -> &'static str {
        match self {
            Invariant::StateMatchesVmm => "RUNNING or PAUSED <=> a live VMM in the VM's cgroup",
            Invariant::NothingWithoutItsVm => {
                "nothing of a VM without its row, no sandbox without a VMM"
            }
            Invariant::NothingHeldTwice => "no IP, slot or uid held twice",
            Invariant::AckedCallsHold => {
                "no acknowledged create lost, no acknowledged delete undone"
            }
            Invariant::BillingMatches => "billaged's sums == metald's totals, no interval twice",
            Invariant::MetaldServes => "metald restarts, serves and does not panic",
            Invariant::CleanAtEnd => "nothing left once every VM is deleted",
        }
    }
}

/// One violation as found: the invariant, what it is about (a VM id, or a thing when no VM
/// can be named), and what was seen.
struct Finding {
    /// The invariant violated.
    invariant: Invariant,
    /// What it is about: the same subject in later checks is the same violation.
    subject: String,
    /// What was seen.
    detail: String,
}

/// A [`Finding`], its detail on one line (a failure reason quotes the guest's console).
fn finding(invariant: Invariant, subject: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding {
        invariant,
        subject: subject.into(),
        detail: detail.into().replace(['\n', '\r'], " "),
    }
}

/// A violation as reported: seen in how many checks, first in which kill cycle, what was
/// seen first and last.
struct Seen {
    /// Checks that found it.
    checks: u64,
    /// The kill cycle of the first.
    first_cycle: usize,
    /// What the first check saw.
    first: String,
    /// What the last check saw.
    last: String,
}

/// Every violation, once per (invariant, subject): a VM whose billing is short stays short
/// in every later check, and is one finding.
#[derive(Default)]
struct Violations(BTreeMap<(Invariant, String), Seen>);

impl Violations {
    /// How many distinct violations.
    fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds a finding of kill cycle `cycle`.
    fn record(&mut self, cycle: usize, f: Finding) {
        self.0
            .entry((f.invariant, f.subject))
            .and_modify(|s| {
                s.checks += 1;
                s.last.clone_from(&f.detail);
            })
            .or_insert(Seen {
                checks: 1,
                first_cycle: cycle,
                first: f.detail.clone(),
                last: f.detail,
            });
    }
}

/// What the runner and the client threads share.
#[derive(Default)]
struct Shared {
    /// Clients hold it (read) through each call and the bookkeeping of its answer; the
    /// runner takes it (write) to check while no call is in flight.
    gate: RwLock<()>,
    /// Set when the clients must end.
    stop: AtomicBool,
    /// The kill cycle under way (the clients' findings name it).
    cycle: AtomicUsize,
    /// Violations found, by the runner's checks and by the clients' answers.
    violations: Mutex<Violations>,
}

/// Tells the clients to stop when dropped, so a run that fails half-way ends them too.
struct StopClients(Arc<Shared>);

impl Drop for StopClients {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

/// One client thread: one customer, at most [`VMS_PER_CLIENT`] VMs.
struct Client {
    /// Its customer's REST client, with [`CALL_TIMEOUT`].
    rest: Rest,
    /// What it knows of its VMs (shared with the runner's checks).
    book: Arc<Mutex<Book>>,
    /// The gate, the stop flag and the violations.
    shared: Arc<Shared>,
    /// Its own random choices, seeded from the run's seed.
    rng: StdRng,
    /// The CreateVm body.
    request: Value,
    /// What it saw so far.
    calls: Calls,
}

impl Client {
    /// Calls until told to stop; what it saw.
    fn run(mut self) -> Calls {
        let shared = Arc::clone(&self.shared);
        while !shared.stop.load(Ordering::SeqCst) {
            let answered = {
                let _held = shared.gate.read().unwrap();
                let (op, vm) = self.choose();
                let outcome = self.call(op, vm.as_deref());
                let answered = !matches!(outcome, Outcome::NoAnswer);
                self.note(op, vm, outcome);
                answered
            };
            // While metald is down every call fails at once: no need to spin on it.
            let pause = if answered { 0..150 } else { 100..400 };
            std::thread::sleep(Duration::from_millis(self.rng.gen_range(pause)));
        }
        self.calls
    }

    /// The next call: mostly one the VM's last known state allows, sometimes any.
    fn choose(&mut self) -> (Op, Option<String>) {
        let book = self.book.lock().unwrap();
        let n = book.vms.len();
        if n == 0 || (n < VMS_PER_CLIENT && self.rng.gen_ratio(1, 4)) {
            return (Op::Create, None);
        }
        let (id, known) = book.vms.iter().nth(self.rng.gen_range(0..n)).unwrap();
        let weighted: &[(Op, u32)] = if known.delete_unanswered {
            &[(Op::Delete, 1)]
        } else {
            match known.state.as_deref() {
                _ if self.rng.gen_ratio(1, 8) => &[],
                Some("VM_STATE_CREATED" | "VM_STATE_SHUTDOWN" | "VM_STATE_FAILED") => {
                    &[(Op::Boot, 4), (Op::Delete, 1)]
                }
                Some("VM_STATE_RUNNING") => &[
                    (Op::Pause, 2),
                    (Op::Suspend, 1),
                    (Op::Reboot, 1),
                    (Op::Shutdown, 2),
                    (Op::Delete, 1),
                    (Op::Get, 1),
                ],
                Some("VM_STATE_PAUSED") => &[
                    (Op::Resume, 2),
                    (Op::Suspend, 1),
                    (Op::Reboot, 1),
                    (Op::Shutdown, 1),
                    (Op::Delete, 1),
                ],
                Some("VM_STATE_SUSPENDED") => {
                    &[(Op::Resume, 3), (Op::Shutdown, 1), (Op::Delete, 1)]
                }
                _ => &[(Op::Get, 1)],
            }
        };
        let op = if weighted.is_empty() {
            Op::ON_A_VM[self.rng.gen_range(0..Op::ON_A_VM.len())]
        } else {
            let total: u32 = weighted.iter().map(|(_, w)| w).sum();
            let mut pick = self.rng.gen_range(0..total);
            weighted
                .iter()
                .find(|(_, w)| {
                    let hit = pick < *w;
                    pick = pick.saturating_sub(*w);
                    hit
                })
                .map_or(Op::Get, |(op, _)| *op)
        };
        (op, Some(id.clone()))
    }

    /// Sends `op` (on VM `vm`), with random but valid options.
    fn call(&mut self, op: Op, vm: Option<&str>) -> Outcome {
        let id = vm.unwrap_or_default();
        let (method, path, body) = match op {
            Op::Create => ("POST", "/v1/vms".to_string(), Some(self.request.clone())),
            Op::Boot | Op::Pause | Op::Resume | Op::Suspend => {
                ("POST", format!("/v1/vms/{id}/{}", op.name()), None)
            }
            Op::Reboot => (
                "POST",
                format!("/v1/vms/{id}/reboot"),
                Some(json!({"force": self.rng.gen_bool(0.5)})),
            ),
            Op::Shutdown => (
                "POST",
                format!("/v1/vms/{id}/shutdown"),
                Some(if self.rng.gen_bool(0.5) {
                    json!({"force": true})
                } else {
                    json!({"timeout_seconds": 2})
                }),
            ),
            Op::Delete => (
                "DELETE",
                if self.rng.gen_ratio(7, 10) {
                    format!("/v1/vms/{id}?force=true")
                } else {
                    format!("/v1/vms/{id}")
                },
                None,
            ),
            Op::Get => ("GET", format!("/v1/vms/{id}"), None),
        };
        match self.rest.try_call(method, &path, body) {
            Ok(a) if (200..300).contains(&a.status) => Outcome::Ok(a.body),
            Ok(a) => Outcome::Refused {
                status: a.status,
                code: a.code().to_string(),
                message: a.message().to_string(),
            },
            Err(_) => Outcome::NoAnswer,
        }
    }

    /// Counts the call and keeps what its answer says about the VM.
    fn note(&mut self, op: Op, vm: Option<String>, outcome: Outcome) {
        let tally = self.calls.tallies.entry(op).or_default();
        tally.attempted += 1;
        match &outcome {
            Outcome::Ok(_) => tally.ok += 1,
            Outcome::Refused { code, .. } => *tally.refused.entry(code.clone()).or_default() += 1,
            Outcome::NoAnswer => tally.no_answer += 1,
        }
        let id = vm.unwrap_or_default();
        if let Outcome::Refused {
            status: 500,
            message,
            ..
        } = &outcome
        {
            let cycle = self.shared.cycle.load(Ordering::SeqCst);
            self.calls
                .internal
                .push(format!("cycle {cycle}: {} {id}: {message}", op.name()));
        }
        let mut book = self.book.lock().unwrap();
        let state = |body: &Value| body["vm"]["state"].as_str().map(str::to_string);
        match (op, outcome) {
            (Op::Create, Outcome::Ok(body)) => {
                let id = body["vm"]["vmId"].as_str().unwrap_or_default().to_string();
                book.acked_creates += 1;
                book.vms.insert(
                    id,
                    Known {
                        state: state(&body),
                        delete_unanswered: false,
                    },
                );
            }
            (Op::Create, Outcome::NoAnswer) => book.unknown_creates += 1,
            (Op::Create, Outcome::Refused { .. }) => {}
            (Op::Delete, Outcome::Ok(_)) => {
                book.vms.remove(&id);
                book.deleted.insert(id);
            }
            (
                _,
                Outcome::Refused {
                    status: 404,
                    message,
                    ..
                },
            ) => {
                // A check may have settled this VM's fate already (then it is not in the book).
                if let Some(known) = book.vms.remove(&id) {
                    if !known.delete_unanswered {
                        let cycle = self.shared.cycle.load(Ordering::SeqCst);
                        self.shared.violations.lock().unwrap().record(
                            cycle,
                            finding(
                                Invariant::AckedCallsHold,
                                id,
                                format!(
                                    "an acknowledged VM (no delete sent) answered {} with not_found: {message}",
                                    op.name()
                                ),
                            ),
                        );
                    }
                }
            }
            (_, outcome) => {
                if let Some(known) = book.vms.get_mut(&id) {
                    match outcome {
                        Outcome::Ok(body) => known.state = state(&body),
                        Outcome::NoAnswer if op == Op::Delete => {
                            known.delete_unanswered = true;
                            known.state = None;
                        }
                        Outcome::Refused { .. } | Outcome::NoAnswer => known.state = None,
                    }
                }
            }
        }
    }
}

/// What the runner did.
#[derive(Default)]
struct Counts {
    /// SIGKILLs of metald.
    metald_kills: u64,
    /// SIGKILLs of VMMs.
    vmm_kills: u64,
    /// Of which while metald was down.
    vmm_kills_while_down: u64,
    /// Restarts of metald.
    restarts: u64,
    /// Invariant checks run.
    checks: u64,
    /// Machine scans repeated while waiting for metald to settle.
    settle_rounds: u64,
    /// VM billings compared (one per VM without a VMM per check).
    billing_compared: u64,
}

/// One row of metald's `vms` table, with its network allocation.
struct Row {
    /// The VM id.
    id: String,
    /// Its customer.
    customer: String,
    /// CREATED, RUNNING, PAUSED, SHUTDOWN or FAILED.
    state: String,
    /// Why it is FAILED.
    failure: Option<String>,
    /// Its VMM's pid, while it has one.
    pid: Option<i64>,
    /// Its network slot (which also gives its uid).
    slot: Option<i64>,
    /// Its IPv4 address.
    ipv4: Option<String>,
    /// Its IPv6 address.
    ipv6: Option<String>,
}

impl Row {
    /// RUNNING or PAUSED: a VMM should exist.
    fn has_vmm(&self) -> bool {
        matches!(self.state.as_str(), "RUNNING" | "PAUSED")
    }
}

/// metald's VM rows, read from its database read-only.
fn read_rows(db: &Path) -> Vec<Row> {
    let db = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", db.display()));
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut stmt = db
        .prepare(
            "SELECT v.id, v.customer_id, v.state, v.failure, v.vmm_pid, n.slot, n.ipv4, n.ipv6 \
             FROM vms v LEFT JOIN vm_network n ON n.vm_id = v.id ORDER BY v.seq",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok(Row {
            id: r.get(0)?,
            customer: r.get(1)?,
            state: r.get(2)?,
            failure: r.get(3)?,
            pid: r.get(4)?,
            slot: r.get(5)?,
            ipv4: r.get(6)?,
            ipv6: r.get(7)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// A process that is a VM's VMM (in a VM's cgroup, or naming the data dir).
struct Vmm {
    /// Its pid.
    pid: u32,
    /// The VM whose cgroup holds it.
    vm: Option<String>,
    /// Its real uid.
    uid: Option<u32>,
    /// Its command line, for the report.
    cmdline: String,
}

/// Something of a VM's sandbox found on the machine.
struct Thing {
    /// What it is ("cgroup", "veth", ...).
    kind: &'static str,
    /// Where it is (a path or a name).
    at: String,
    /// The VM it is for, when it names one.
    vm: Option<String>,
}

/// What is on the machine for this metald's VMs.
struct Scan {
    /// metald's rows.
    rows: Vec<Row>,
    /// Live VMM processes.
    vmms: Vec<Vmm>,
    /// Sandbox pieces.
    things: Vec<Thing>,
    /// Per VM id: its cgroup in each controller, with the pids in it.
    cgroup_procs: BTreeMap<String, Vec<(PathBuf, BTreeSet<u32>)>>,
    /// The directories under data_dir/vms.
    vm_dirs: BTreeSet<String>,
    /// The VM directories holding a saved suspend state.
    saved: BTreeSet<String>,
}

impl Scan {
    /// What it saw, in a line.
    fn summary(&self) -> String {
        let mut pieces: BTreeMap<&str, usize> = BTreeMap::new();
        for t in &self.things {
            *pieces.entry(t.kind).or_default() += 1;
        }
        format!(
            "{} VMs stored ({} with a VMM), {} VMM processes, sandbox pieces {pieces:?}",
            self.rows.len(),
            self.rows.iter().filter(|r| r.has_vmm()).count(),
            self.vmms.len()
        )
    }
}

/// The first VM id `text` holds.
fn vm_id_in(text: &str) -> Option<String> {
    text.match_indices("vm-").find_map(|(i, _)| {
        let id = text.get(i..i + 39)?;
        id.parse::<VmId>().ok().map(|_| id.to_string())
    })
}

/// The VM whose cgroup (under `parent`) holds `pid`.
fn cgroup_vm(pid: u32, parent: &str) -> Option<String> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let marker = format!("/{parent}/");
    cgroups.lines().find_map(|l| {
        let (_, rest) = l.split_once(&marker)?;
        vm_id_in(rest.split('/').next()?)
    })
}

/// UNKEY_METALD_JAILER_ID_COUNT as the test harness sets it: the VM uids are
/// `uid_base..uid_base + JAIL_IDS`.
const JAIL_IDS: u32 = 1000;

/// Every process whose real uid is in `uids`.
fn pids_with_uid_in(uids: std::ops::Range<u32>) -> Vec<u32> {
    entries(Path::new("/proc"))
        .iter()
        .filter_map(|e| name_of(e).parse::<u32>().ok())
        .filter(|pid| proc_uid(*pid).is_some_and(|u| uids.contains(&u)))
        .collect()
}

/// The real uid of `pid`.
fn proc_uid(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The command line of `pid`, spaces between its arguments.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The entries of directory `dir` (none when it is missing).
fn entries(dir: &Path) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .collect()
}

/// A directory entry's name.
fn name_of(e: &std::fs::DirEntry) -> String {
    e.file_name().to_string_lossy().into_owned()
}

/// A chaos run: metald, billaged, the clients, and what was counted and found.
struct Run {
    /// Tells the clients to stop however the run ends (first: dropped first).
    _stop: StopClients,
    /// The client threads.
    clients: Vec<std::thread::JoinHandle<Calls>>,
    /// Each client's customer and book.
    books: Vec<(String, Arc<Mutex<Book>>)>,
    /// The gate, the stop flag and the violations.
    shared: Arc<Shared>,
    /// The runner's random choices (delays, which VMM to kill).
    rng: StdRng,
    /// What the runner did.
    counts: Counts,
    /// When the run started.
    started: Instant,
    /// How far metald's log was read for panics.
    log_read: usize,
    /// What the last check saw on the machine, in a line.
    last_scan: String,
    /// The billing service (dropped before metald, whose namespace it runs in).
    billaged: Billaged,
    /// metald.
    m: Metald,
}

impl Run {
    /// Starts metald, billaged and the clients.
    fn start(s: &Settings) -> Self {
        let port = free_port();
        let mut m = s.flavor.metald(port);
        m.spawn();
        let billaged = Billaged::start(&m, port);
        let shared = Arc::new(Shared::default());
        let mut books = Vec::new();
        let mut clients = Vec::new();
        for i in 0..s.clients {
            let customer = format!("chaos{i}");
            let book = Arc::new(Mutex::new(Book::default()));
            let client = Client {
                rest: Rest::new(&m, Some(&customer)).with_timeout(CALL_TIMEOUT),
                book: Arc::clone(&book),
                shared: Arc::clone(&shared),
                rng: StdRng::seed_from_u64(s.seed.wrapping_add(1 + i as u64)),
                request: s.flavor.request(),
                calls: Calls::default(),
            };
            clients.push(
                std::thread::Builder::new()
                    .name(format!("chaos-client-{i}"))
                    .spawn(move || client.run())
                    .unwrap(),
            );
            books.push((customer, book));
        }
        Self {
            _stop: StopClients(Arc::clone(&shared)),
            clients,
            books,
            shared,
            rng: StdRng::seed_from_u64(s.seed),
            counts: Counts::default(),
            started: Instant::now(),
            log_read: 0,
            last_scan: String::new(),
            billaged,
            m,
        }
    }

    /// The kill cycles: wait a random moment, kill metald (and one time in five a VMM,
    /// before or after), restart it, check.
    fn cycles(&mut self, s: &Settings) {
        for cycle in 1..=s.kills {
            self.shared.cycle.store(cycle, Ordering::SeqCst);
            // 50-1500 ms: long enough for calls to be under way, short enough to land in the
            // middle of boots and deletes.
            std::thread::sleep(Duration::from_millis(self.rng.gen_range(50..=1500)));
            // Half the VMM kills happen while metald runs (its exit handler must notice), half
            // while it is down (its start-up reconcile must).
            let vmm_kill = self.rng.gen_ratio(1, 5).then(|| self.rng.gen_bool(0.5));
            if vmm_kill == Some(false) {
                self.kill_a_vmm(false);
            }
            self.kill_metald();
            if vmm_kill == Some(true) {
                self.kill_a_vmm(true);
            }
            self.restart();
            self.check(cycle);
            eprintln!(
                "chaos: cycle {cycle}/{}: {}; {} violation(s) so far",
                s.kills,
                self.last_scan,
                self.violations().len()
            );
        }
    }

    /// SIGKILLs metald and reaps it.
    fn kill_metald(&mut self) {
        let pid = self.m.pid().expect("metald runs");
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -KILL {pid}");
        // Reaps it (its SIGTERM goes to a dead process).
        self.m.stop();
        self.counts.metald_kills += 1;
    }

    /// SIGKILLs one VMM chosen at random, if any runs.
    fn kill_a_vmm(&mut self, metald_down: bool) {
        let vmms: Vec<u32> = self
            .scan()
            .vmms
            .iter()
            .filter(|v| v.vm.is_some())
            .map(|v| v.pid)
            .collect();
        if vmms.is_empty() {
            return;
        }
        let pid = vmms[self.rng.gen_range(0..vmms.len())];
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        self.counts.vmm_kills += 1;
        self.counts.vmm_kills_while_down += u64::from(metald_down);
    }

    /// Starts metald again and waits until it answers /healthz (which follows its start-up
    /// reconcile) and /readyz.
    fn restart(&mut self) {
        self.m.spawn();
        self.counts.restarts += 1;
        let probe = Rest::new(&self.m, None).with_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match probe.try_call("GET", "/readyz", None) {
                Ok(a) if a.status == 200 => return,
                answer if Instant::now() > deadline => {
                    let cycle = self.shared.cycle.load(Ordering::SeqCst);
                    self.record(
                        cycle,
                        finding(
                            Invariant::MetaldServes,
                            "readiness",
                            format!("/readyz never answered 200 within 30 s: {answer:?}"),
                        ),
                    );
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Records a finding of kill cycle `cycle`.
    fn record(&self, cycle: usize, f: Finding) {
        self.shared.violations.lock().unwrap().record(cycle, f);
    }

    /// The violations recorded so far: (invariant, subject) → what was seen.
    fn violations(&self) -> std::sync::MutexGuard<'_, Violations> {
        self.shared.violations.lock().unwrap()
    }

    /// Every check, with the clients held still (no call in flight).
    fn check(&mut self, cycle: usize) {
        let shared = Arc::clone(&self.shared);
        let _held = shared.gate.write().unwrap();
        self.counts.checks += 1;
        let mut found = self.settled_machine_findings();
        let rows = read_rows(&self.m.data_dir.join("metald.db"));
        found.extend(self.book_findings(&rows));
        found.extend(self.billing_findings(&rows));
        found.extend(self.log_findings());
        for f in found {
            self.record(cycle, f);
        }
    }

    /// What is on the machine for this metald's VMs.
    fn scan(&self) -> Scan {
        let m = &self.m;
        let iso = m.iso.as_ref().expect("chaos runs an isolating metald");
        let rows = read_rows(&m.data_dir.join("metald.db"));
        let mut things = Vec::new();
        let mut cgroup_procs: BTreeMap<String, Vec<(PathBuf, BTreeSet<u32>)>> = BTreeMap::new();
        for parent in iso.cgroup_dirs() {
            for e in entries(&parent).into_iter().filter(|e| e.path().is_dir()) {
                let vm = vm_id_in(&name_of(&e));
                let procs: BTreeSet<u32> = std::fs::read_to_string(e.path().join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|p| p.trim().parse().ok())
                    .collect();
                if let Some(id) = &vm {
                    cgroup_procs
                        .entry(id.clone())
                        .or_default()
                        .push((e.path(), procs));
                }
                things.push(Thing {
                    kind: "cgroup",
                    at: e.path().display().to_string(),
                    vm,
                });
            }
        }
        // The warm pool's spares belong to no VM by design (the pool's own test checks that a
        // restart sweeps them and a clean stop removes them).
        let spare = is_metalds_own;
        for e in entries(&iso.run_dir.join("netns")) {
            if spare(&e.path().display().to_string()) {
                continue;
            }
            things.push(Thing {
                kind: "network namespace",
                at: e.path().display().to_string(),
                vm: vm_id_in(&name_of(&e)),
            });
        }
        for kind in entries(&iso.jail_dir) {
            for e in entries(&kind.path()) {
                things.push(Thing {
                    kind: "jail directory",
                    at: e.path().display().to_string(),
                    vm: vm_id_in(&name_of(&e)),
                });
            }
        }
        let data_dir = m.data_dir.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for line in mounts
            .lines()
            .filter(|l| l.contains(&data_dir) && !spare(l))
        {
            things.push(Thing {
                kind: "mount",
                at: line.split(' ').nth(4).unwrap_or(line).to_string(),
                vm: vm_id_in(line),
            });
        }
        // Interface names carry 12 hex digits of the VM id: matched against the rows' ids.
        let by_if: HashMap<String, String> = rows
            .iter()
            .filter_map(|r| {
                let (host, _) = metald::network::interface_names(&r.id.parse().ok()?);
                Some((host[2..].to_string(), r.id.clone()))
            })
            .collect();
        for line in iso.netns.output("ip", &["-br", "link"]).lines() {
            let name = line.split([' ', '@']).next().unwrap_or_default();
            if metald::network::is_vm_interface(name)
                && !metald::network::pool::is_pool_interface(name)
            {
                things.push(Thing {
                    kind: "veth",
                    at: name.to_string(),
                    vm: by_if.get(&name[2..]).cloned(),
                });
            }
        }
        // TAPs belong inside a VM's own namespace (gone with it), never in metald's.
        for line in iso
            .netns
            .output("ip", &["-br", "link", "show", "type", "tun"])
            .lines()
        {
            things.push(Thing {
                kind: "TAP in metald's namespace",
                at: line.split(' ').next().unwrap_or(line).to_string(),
                vm: None,
            });
        }
        // Any layout of the table (per-customer sets and rules, or sets and maps with
        // elements): a VM is named in it by its host interface, `mv` + 12 hex digits.
        let nft = iso
            .netns
            .output("nft", &["list", "table", "inet", "metald"]);
        let named: BTreeSet<&str> = nft
            .match_indices("mv")
            .filter_map(|(i, _)| nft.get(i + 2..i + 14))
            .filter(|hex| hex.chars().all(|c| c.is_ascii_hexdigit()))
            .collect();
        for hex in named {
            things.push(Thing {
                kind: "nft element",
                at: format!("mv{hex}"),
                vm: by_if.get(hex).cloned(),
            });
        }
        let vm_dirs: BTreeSet<String> = entries(&m.data_dir.join("vms"))
            .iter()
            .map(name_of)
            .collect();
        let saved = vm_dirs
            .iter()
            .filter(|id| {
                m.data_dir
                    .join("vms")
                    .join(id)
                    .join("suspend.state")
                    .is_file()
            })
            .cloned()
            .collect();
        let mut pids: BTreeSet<u32> = cgroup_procs
            .values()
            .flatten()
            .flat_map(|(_, procs)| procs.iter().copied())
            .collect();
        pids.extend(m.vmm_pids());
        // A VMM that left its cgroup still runs as its VM's uid.
        pids.extend(pids_with_uid_in(iso.uid_base..iso.uid_base + JAIL_IDS));
        let vmms = pids
            .into_iter()
            .filter(|p| process_alive(u64::from(*p)))
            .map(|pid| Vmm {
                pid,
                vm: cgroup_vm(pid, &iso.cgroup_parent),
                uid: proc_uid(pid),
                cmdline: cmdline(pid),
            })
            .collect();
        Scan {
            rows,
            vmms,
            things,
            cgroup_procs,
            vm_dirs,
            saved,
        }
    }

    /// The machine's findings, read again (for up to [`SETTLE`]) while any remain.
    fn settled_machine_findings(&mut self) -> Vec<Finding> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let scan = self.scan();
            let found = self.machine_findings(&scan);
            if found.is_empty() || Instant::now() > deadline {
                self.last_scan = scan.summary();
                return found;
            }
            self.counts.settle_rounds += 1;
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Rows against the machine: states against VMMs, things against rows, nothing twice.
    fn machine_findings(&self, scan: &Scan) -> Vec<Finding> {
        let iso = self.m.iso.as_ref().expect("isolated");
        let mut found = Vec::new();
        let rows: HashMap<&str, &Row> = scan.rows.iter().map(|r| (r.id.as_str(), r)).collect();
        let none = Vec::new();
        for row in &scan.rows {
            let cgroups = scan.cgroup_procs.get(&row.id).unwrap_or(&none);
            let procs: BTreeSet<u32> = cgroups
                .iter()
                .flat_map(|(_, procs)| procs.iter().copied())
                .collect();
            if row.has_vmm() {
                let pid = row.pid.and_then(|p| u32::try_from(p).ok());
                let alive = pid.is_some_and(|p| process_alive(u64::from(p)));
                // In the VM's cgroup of every controller: one it escaped no longer limits it.
                let outside: Vec<String> = cgroups
                    .iter()
                    .filter(|(_, procs)| !pid.is_some_and(|p| procs.contains(&p)))
                    .map(|(dir, _)| dir.display().to_string())
                    .collect();
                if !alive || cgroups.is_empty() || !outside.is_empty() {
                    found.push(finding(
                        Invariant::StateMatchesVmm,
                        &row.id,
                        format!(
                            "state {} with VMM pid {:?}, which is {}; its cgroups hold {procs:?}",
                            row.state,
                            row.pid,
                            if !alive {
                                "gone".to_string()
                            } else if cgroups.is_empty() {
                                "alive, but the VM has no cgroup".to_string()
                            } else {
                                format!("not in {}", outside.join(", "))
                            }
                        ),
                    ));
                }
            } else if !procs.is_empty() {
                let lines: Vec<String> = procs
                    .iter()
                    .map(|p| format!("{p} ({})", cmdline(*p)))
                    .collect();
                found.push(finding(
                    Invariant::StateMatchesVmm,
                    &row.id,
                    format!(
                        "state {} (no VMM), yet its cgroups hold {}",
                        row.state,
                        lines.join(", ")
                    ),
                ));
            }
            if row.state == "SUSPENDED" && !scan.saved.contains(&row.id) {
                found.push(finding(
                    Invariant::StateMatchesVmm,
                    &row.id,
                    "state SUSPENDED without its saved state (suspend.state)".to_string(),
                ));
            }
            if !scan.vm_dirs.contains(&row.id) {
                found.push(finding(
                    Invariant::StateMatchesVmm,
                    format!("{} directory", row.id),
                    format!(
                        "row in state {} without its VM directory (data_dir/vms/{})",
                        row.state, row.id
                    ),
                ));
            }
        }
        for v in &scan.vmms {
            match v.vm.as_deref().map(|id| (id, rows.get(id))) {
                None => found.push(finding(
                    Invariant::NothingWithoutItsVm,
                    format!("process {}", v.pid),
                    format!("VMM process {} in no VM's cgroup: {}", v.pid, v.cmdline),
                )),
                Some((id, None)) => found.push(finding(
                    Invariant::NothingWithoutItsVm,
                    format!("{id} process"),
                    format!("VMM process {} of a VM without a row: {}", v.pid, v.cmdline),
                )),
                // A VMM of a VM without one is a state mismatch, reported above.
                Some((_, Some(_))) => {}
            }
        }
        for t in &scan.things {
            match t.vm.as_deref().map(|id| (id, rows.get(id))) {
                None => found.push(finding(
                    Invariant::NothingWithoutItsVm,
                    format!("{} {}", t.kind, t.at),
                    format!("{} {} names no VM with a row", t.kind, t.at),
                )),
                Some((id, None)) => found.push(finding(
                    Invariant::NothingWithoutItsVm,
                    format!("{id} {}", t.kind),
                    format!("{} {} of a VM without a row", t.kind, t.at),
                )),
                Some((id, Some(row))) if !row.has_vmm() => found.push(finding(
                    Invariant::NothingWithoutItsVm,
                    format!("{id} {}", t.kind),
                    format!(
                        "{} {} of a VM in state {} (no VMM)",
                        t.kind, t.at, row.state
                    ),
                )),
                Some(_) => {}
            }
        }
        for dir in &scan.vm_dirs {
            if !rows.contains_key(dir.as_str()) {
                found.push(finding(
                    Invariant::NothingWithoutItsVm,
                    format!("{dir} directory"),
                    format!("VM directory (disk copy) data_dir/vms/{dir} without a row"),
                ));
            }
        }
        // Held twice: the rows' addresses and slots, and the uids VMMs really run as.
        let mut held: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for r in &scan.rows {
            let keys = [
                r.ipv4.as_ref().map(|a| format!("IPv4 {a}")),
                r.ipv6.as_ref().map(|a| format!("IPv6 {a}")),
                r.slot.map(|s| format!("slot {s}")),
            ];
            for k in keys.into_iter().flatten() {
                held.entry(k).or_default().insert(&r.id);
            }
        }
        for v in &scan.vmms {
            if let (Some(id), Some(uid)) = (v.vm.as_deref(), v.uid) {
                held.entry(format!("uid {uid}")).or_default().insert(id);
                let slot = rows.get(id).and_then(|r| r.slot);
                let want = slot.map(|s| i64::from(iso.uid_base) + s);
                if want != Some(i64::from(uid)) {
                    found.push(finding(
                        Invariant::NothingHeldTwice,
                        format!("{id} uid"),
                        format!(
                            "VMM {} runs as uid {uid}, its VM's slot {slot:?} gives uid {want:?}",
                            v.pid
                        ),
                    ));
                }
            }
        }
        for (what, vms) in held.into_iter().filter(|(_, vms)| vms.len() > 1) {
            found.push(finding(
                Invariant::NothingHeldTwice,
                what.clone(),
                format!("{what} held by {vms:?}"),
            ));
        }
        found
    }

    /// The clients' books against the rows: every acknowledged create is there, every
    /// acknowledged delete is not, and a VM nobody acknowledged belongs to a create that got
    /// no answer (it is then adopted into its client's book).
    fn book_findings(&self, rows: &[Row]) -> Vec<Finding> {
        let mut found = Vec::new();
        for (customer, book) in &self.books {
            let mut book = book.lock().unwrap();
            let present: BTreeSet<&str> = rows
                .iter()
                .filter(|r| &r.customer == customer)
                .map(|r| r.id.as_str())
                .collect();
            let gone: Vec<String> = book
                .vms
                .keys()
                .filter(|id| !present.contains(id.as_str()))
                .cloned()
                .collect();
            for id in gone {
                let known = book.vms.remove(&id).unwrap_or_default();
                // A delete without an answer that went through is no loss.
                if !known.delete_unanswered {
                    found.push(finding(
                        Invariant::AckedCallsHold,
                        &id,
                        format!(
                            "acknowledged create of {customer}'s VM, no delete sent, and no row \
                             (last known state {:?})",
                            known.state
                        ),
                    ));
                }
            }
            for id in present {
                if book.vms.contains_key(id) {
                    continue;
                }
                if book.deleted.contains(id) {
                    found.push(finding(
                        Invariant::AckedCallsHold,
                        id,
                        format!("{customer}'s VM is back after an acknowledged delete"),
                    ));
                } else if book.adopted < book.unknown_creates {
                    book.adopted += 1;
                    book.vms.insert(id.to_string(), Known::default());
                } else {
                    found.push(finding(
                        Invariant::AckedCallsHold,
                        id,
                        format!(
                            "{customer} has a VM that no create made: {} creates acknowledged, \
                             {} without an answer, all accounted for",
                            book.acked_creates, book.unknown_creates
                        ),
                    ));
                }
            }
        }
        found
    }

    /// A value on metald's /metrics.
    fn metric(&self, name: &str) -> Option<f64> {
        let a = Rest::new(&self.m, None)
            .with_timeout(Duration::from_secs(10))
            .try_call("GET", "/metrics", None)
            .ok()?;
        let text = a.body.as_str()?.to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Billing against metald, for every VM without a VMM once the outbox drained: billaged's
    /// sums equal metald's lifetime totals (re-read while they still move), and no VM has an
    /// interval billed twice.
    fn billing_findings(&mut self, rows: &[Row]) -> Vec<Finding> {
        let mut found = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut depth = self.metric("metald_billing_outbox_rows");
        while depth != Some(0.0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            depth = self.metric("metald_billing_outbox_rows");
        }
        if depth != Some(0.0) {
            found.push(finding(
                Invariant::BillingMatches,
                "outbox",
                format!("metald's billing outbox never drained in 20 s (metald_billing_outbox_rows {depth:?})"),
            ));
            return found;
        }
        let billed = rusqlite::Connection::open_with_flags(
            &self.billaged.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        billed.busy_timeout(Duration::from_secs(10)).unwrap();
        // A VM's last interval may still be on its way (batched every 500 ms): equal settles
        // a VM, and so does the same mismatch read three times over a second and more.
        let stopped: Vec<&Row> = rows.iter().filter(|r| !r.has_vmm()).collect();
        let mut read: BTreeMap<&str, Compared> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for r in &stopped {
                let c = read.entry(r.id.as_str()).or_default();
                if c.settled() {
                    continue;
                }
                let api =
                    Rest::new(&self.m, Some(&r.customer)).with_timeout(Duration::from_secs(10));
                let usage = match api.try_call("GET", &format!("/v1/vms/{}/usage", r.id), None) {
                    Ok(a) if a.status == 200 => a.body,
                    other => {
                        found.push(finding(
                            Invariant::MetaldServes,
                            format!("{} usage", r.id),
                            format!("GetVmUsage answered {other:?}"),
                        ));
                        c.unreadable = true;
                        continue;
                    }
                };
                let totals: Vec<u64> = USAGE_FIELDS
                    .iter()
                    .map(|(_, api)| num(&usage["total"][api]))
                    .collect();
                let sums = billaged_sums(&billed, &r.id);
                c.same = if sums == c.sums && totals == c.totals {
                    c.same + 1
                } else {
                    0
                };
                (c.sums, c.totals) = (sums, totals);
            }
            if read.values().all(Compared::settled) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(600));
        }
        self.counts.billing_compared += stopped.len() as u64;
        for r in &stopped {
            let c = &read[r.id.as_str()];
            if !c.unreadable && c.sums != c.totals {
                found.push(finding(
                    Invariant::BillingMatches,
                    &r.id,
                    format!(
                        "{} state {}{}: {}; {}",
                        billed_side(&c.sums, &c.totals),
                        r.state,
                        r.failure
                            .as_ref()
                            .map(|f| format!(" ({})", f.chars().take(120).collect::<String>()))
                            .unwrap_or_default(),
                        usage_differences(&c.sums, &c.totals),
                        billing_history(&billed, &r.id)
                    ),
                ));
            }
        }
        found.extend(twice_billed(&billed));
        found
    }

    /// Panics in metald's log since the last look.
    fn log_findings(&mut self) -> Vec<Finding> {
        let log = self.m.log_text();
        let new = log.get(self.log_read..).unwrap_or_default();
        let found = new
            .lines()
            .filter(|l| l.contains("panicked at"))
            .enumerate()
            .map(|(i, l)| {
                finding(
                    Invariant::MetaldServes,
                    format!("panic at log byte {}+{i}", self.log_read),
                    l.to_string(),
                )
            })
            .collect();
        self.log_read = log.len();
        found
    }

    /// Ends the run: stops the clients, checks once more, shuts every VM down and checks its
    /// billing, deletes every VM and checks nothing is left. What the clients saw.
    fn finish(&mut self, cycle: usize) -> Calls {
        self.shared.cycle.store(cycle, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut calls = Calls::default();
        for h in self.clients.drain(..) {
            let c = h.join().expect("a client thread panicked");
            for (op, t) in c.tallies {
                let sum = calls.tallies.entry(op).or_default();
                sum.attempted += t.attempted;
                sum.ok += t.ok;
                sum.no_answer += t.no_answer;
                for (code, n) in t.refused {
                    *sum.refused.entry(code).or_default() += n;
                }
            }
            calls.internal.extend(c.internal);
        }
        self.check(cycle);
        // Every VM stopped, so that the billing of each one is compared.
        let db = self.m.data_dir.join("metald.db");
        for r in read_rows(&db).iter().filter(|r| r.has_vmm()) {
            let a = Rest::new(&self.m, Some(&r.customer))
                .with_timeout(CALL_TIMEOUT)
                .try_call(
                    "POST",
                    &format!("/v1/vms/{}/shutdown", r.id),
                    Some(json!({"force": true})),
                );
            if !matches!(&a, Ok(a) if a.status == 200) {
                self.record(
                    cycle,
                    finding(
                        Invariant::CleanAtEnd,
                        &r.id,
                        format!("forced shutdown at the end answered {a:?}"),
                    ),
                );
            }
        }
        self.check(cycle);
        for r in read_rows(&db) {
            let a = Rest::new(&self.m, Some(&r.customer))
                .with_timeout(CALL_TIMEOUT)
                .try_call("DELETE", &format!("/v1/vms/{}?force=true", r.id), None);
            if !matches!(&a, Ok(a) if a.status == 200) {
                self.record(
                    cycle,
                    finding(
                        Invariant::CleanAtEnd,
                        &r.id,
                        format!("delete at the end answered {a:?}"),
                    ),
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let left = loop {
            let mut left = self.m.leftovers();
            left.extend(
                read_rows(&db)
                    .iter()
                    .map(|r| format!("row {} ({})", r.id, r.state)),
            );
            left.extend(
                entries(&self.m.data_dir.join("vms"))
                    .iter()
                    .map(|e| format!("VM directory {}", e.path().display())),
            );
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        for l in left {
            self.record(cycle, finding(Invariant::CleanAtEnd, l.clone(), l));
        }
        // The last intervals, delivered after the deletes, are no duplicates either.
        let billed = rusqlite::Connection::open_with_flags(
            &self.billaged.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        billed.busy_timeout(Duration::from_secs(10)).unwrap();
        for f in twice_billed(&billed) {
            self.record(cycle, f);
        }
        calls
    }

    /// Copies metald's log and both databases out of the data dir (which goes with the
    /// test) to `<target>/tmp/chaos-<seed>/`, where the report's findings can be looked up.
    fn keep_evidence(&self, s: &Settings) -> PathBuf {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{}", s.seed));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "metald.log",
            "billaged.log",
            "metald.db",
            "metald.db-wal",
            "billaged.db",
            "billaged.db-wal",
        ] {
            // Best effort: a missing file is missing from the evidence too.
            let _ = std::fs::copy(self.m.data_dir.join(f), dir.join(f));
        }
        dir
    }

    /// The closing report.
    fn report(&self, s: &Settings, calls: &Calls, kept: &Path) -> String {
        let c = &self.counts;
        let mut r = String::new();
        let _ = writeln!(
            r,
            "==== chaos report ({} s): {s}",
            self.started.elapsed().as_secs()
        );
        let _ = writeln!(
            r,
            "metald SIGKILLs: {}, restarts: {}, VMM SIGKILLs: {} ({} while metald was down)",
            c.metald_kills, c.restarts, c.vmm_kills, c.vmm_kills_while_down
        );
        let _ = writeln!(
            r,
            "invariant checks: {} (after each restart and twice at the end), settle re-reads: {}, \
             VM billings compared: {}",
            c.checks, c.settle_rounds, c.billing_compared
        );
        let _ = writeln!(
            r,
            "operations (attempted / ok / no answer / refused by code):"
        );
        for (op, t) in &calls.tallies {
            let refused: Vec<String> = t.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(
                r,
                "  {:<9}{:>6} / {:>6} / {:>5} / {}",
                op.name(),
                t.attempted,
                t.ok,
                t.no_answer,
                if refused.is_empty() {
                    "-".to_string()
                } else {
                    refused.join(", ")
                }
            );
        }
        let (mut acked, mut unknown, mut adopted) = (0, 0, 0);
        for (_, b) in &self.books {
            let b = b.lock().unwrap();
            acked += b.acked_creates;
            unknown += b.unknown_creates;
            adopted += b.adopted;
        }
        let _ = writeln!(
            r,
            "creates acknowledged: {acked}; without an answer: {unknown}, of which {adopted} made a VM"
        );
        let _ = writeln!(r, "internal errors answered: {}", calls.internal.len());
        for line in calls.internal.iter().take(20) {
            let _ = writeln!(r, "  {line}");
        }
        let v = self.violations();
        let ways = |start: &str| {
            v.0.iter()
                .filter(|((inv, _), seen)| {
                    *inv == Invariant::BillingMatches && seen.last.starts_with(start)
                })
                .count()
        };
        let _ = writeln!(
            r,
            "violations: {} (billing: {} VMs billed less than metald's totals, {} billed more)",
            v.0.len(),
            ways(BILLED_LESS),
            ways(BILLED_MORE)
        );
        for ((inv, subject), seen) in &v.0 {
            let _ = writeln!(
                r,
                "  [{}] {subject}: in {} check(s) from cycle {}\n    first: {}",
                inv.text(),
                seen.checks,
                seen.first_cycle,
                seen.first
            );
            if seen.last != seen.first {
                let _ = writeln!(r, "    last:  {}", seen.last);
            }
        }
        let _ = write!(
            r,
            "==== metald's log and both databases: {} (metald's log names each VM id)",
            kept.display()
        );
        r
    }
}

/// One VM's billing as last compared.
#[derive(Default)]
struct Compared {
    /// billaged's sums of [`USAGE_FIELDS`].
    sums: Vec<u64>,
    /// metald's lifetime totals of the same.
    totals: Vec<u64>,
    /// How many reads in a row found both unchanged.
    same: u32,
    /// GetVmUsage did not answer (a finding of its own).
    unreadable: bool,
}

impl Compared {
    /// Nothing more to wait for: equal, unreadable, or the same mismatch three reads running.
    fn settled(&self) -> bool {
        self.unreadable || (!self.totals.is_empty() && (self.sums == self.totals || self.same >= 2))
    }
}

/// The usage counters compared: billaged's column, GetVmUsage's `total` field.
const USAGE_FIELDS: [(&str, &str); 5] = [
    ("cpu_time_nanos", "cpuTimeNanos"),
    ("disk_read_bytes", "diskReadBytes"),
    ("disk_write_bytes", "diskWriteBytes"),
    ("network_rx_bytes", "networkRxBytes"),
    ("network_tx_bytes", "networkTxBytes"),
];

/// billaged's sums of [`USAGE_FIELDS`] for `vm`.
fn billaged_sums(db: &rusqlite::Connection, vm: &str) -> Vec<u64> {
    let cols: Vec<String> = USAGE_FIELDS
        .iter()
        .map(|(c, _)| format!("COALESCE(SUM({c}), 0)"))
        .collect();
    db.query_row(
        &format!("SELECT {} FROM metrics WHERE vm_id = ?1", cols.join(", ")),
        [vm],
        |r| {
            (0..USAGE_FIELDS.len())
                .map(|i| r.get::<_, i64>(i).map(|v| v as u64))
                .collect()
        },
    )
    .unwrap()
}

/// Which counters differ, billaged's against metald's.
fn usage_differences(sums: &[u64], totals: &[u64]) -> String {
    let diffs: Vec<String> = USAGE_FIELDS
        .iter()
        .zip(sums.iter().zip(totals))
        .filter(|(_, (s, t))| s != t)
        .map(|((name, _), (s, t))| {
            format!(
                "{name}: billaged {s} vs metald {t} ({:+})",
                *s as i128 - *t as i128
            )
        })
        .collect();
    diffs.join(", ")
}

/// Which way billaged's sums miss metald's totals (the report counts each way).
fn billed_side(sums: &[u64], totals: &[u64]) -> &'static str {
    let less = sums.iter().zip(totals).any(|(s, t)| s < t);
    let more = sums.iter().zip(totals).any(|(s, t)| s > t);
    match (less, more) {
        (true, false) => BILLED_LESS,
        (false, true) => BILLED_MORE,
        _ => "BILLED BOTH LESS AND MORE than metald's totals;",
    }
}

/// The start of a billing finding where billaged has less than metald's totals.
const BILLED_LESS: &str = "BILLED LESS than metald's totals;";
/// The start of a billing finding where billaged has more than metald's totals.
const BILLED_MORE: &str = "BILLED MORE than metald's totals;";

/// What billaged holds for `vm` besides its sums: intervals, starts, stops and gap notices.
fn billing_history(db: &rusqlite::Connection, vm: &str) -> String {
    let count = |sql: &str| -> i64 { db.query_row(sql, [vm], |r| r.get(0)).unwrap_or(-1) };
    let intervals = count("SELECT COUNT(*) FROM metrics WHERE vm_id = ?1");
    let started = count("SELECT COUNT(*) FROM events WHERE vm_id = ?1 AND kind = 'started'");
    let stopped = count("SELECT COUNT(*) FROM events WHERE vm_id = ?1 AND kind = 'stopped'");
    let gaps: Vec<String> = db
        .prepare("SELECT last_sent, resume_time FROM gaps WHERE vm_id = ?1 ORDER BY last_sent")
        .unwrap()
        .query_map([vm], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .map(|(a, b)| format!("{a}..{b} ({} ms)", b - a))
        .collect();
    format!(
        "billaged holds {intervals} intervals, {started} starts, {stopped} stops and {} gap \
         notice(s){}",
        gaps.len(),
        if gaps.is_empty() {
            String::new()
        } else {
            format!(
                " [{}] (for each, metald was down: billaged got a notice, not usage)",
                gaps.join(", ")
            )
        }
    )
}

/// VMs with two intervals for the same instant in billaged.
fn twice_billed(db: &rusqlite::Connection) -> Vec<Finding> {
    let mut stmt = db
        .prepare(
            "SELECT vm_id, timestamp, GROUP_CONCAT(key || '#' || idx, ' ') FROM metrics \
             GROUP BY vm_id, timestamp HAVING COUNT(*) > 1 ORDER BY vm_id, timestamp",
        )
        .unwrap();
    let twice: Vec<(String, i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut by_vm: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (vm, ts, keys) in twice {
        by_vm.entry(vm).or_default().push(format!("{ts}: {keys}"));
    }
    by_vm
        .into_iter()
        .map(|(vm, dup)| {
            finding(
                Invariant::BillingMatches,
                format!("{vm} twice"),
                format!(
                    "{} instant(s) billed more than once, e.g. {}",
                    dup.len(),
                    dup.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
                ),
            )
        })
        .collect()
}
