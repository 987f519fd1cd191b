//! Boot cost against the number of VMs already running (issue 14): jailed Firecracker tiny
//! guests (the idle one: it prints its banner and halts) created and booted one after another
//! through metald's REST API up to `BENCH_SCALE_VMS` (default 1000), each timed from CreateVm
//! to its banner on the console; then all deleted, each timed. Beside it, in the same run, the
//! same number of bare Firecracker processes started one after another the same way (spawn,
//! four API calls, banner). Prints the boot time around 1, 100, 500 and 1000 running VMs,
//! the totals, the host's CPU time while each phase booted, and metald's memory per running
//! VM. metald's run directory is a tmpfs, as `/run` is on a systemd host (in a mount namespace
//! of the bench's own). The boots begin once metald's pools are full and the host is quiet.
//! At 1, 100, 500 and the last number of VMs running, `BENCH_SETTLED` boots (default 30; 0:
//! none) are made one at a time, each with the pools full again and the host quiet, and
//! deleted after: the boot time at that fleet size apart from the stream's back-to-back load
//! (their time and CPU are not counted in the stream's). Each is paired with a bare
//! Firecracker started the same way beside the same fleet once the host is quiet again: the
//! host's own growth with the VMs running shows in the bare ones, metald's in the difference.
//!
//! `cargo bench -p metald --bench scale` (root, a Firecracker binary, /dev/kvm). Not in
//! `make bench`: it holds `BENCH_SCALE_VMS` VMs (about 4.3 MB each) at once.
//! `BENCH_WARM_JAILS=n` sets metald's `UNKEY_METALD_WARM_JAILS` (default metald's, 3; 0 builds every jail at its boot),
//! `BENCH_WARM_POOL=n` its `UNKEY_METALD_WARM_POOL` (default 4; 0 makes every network at its boot),
//! `BENCH_WARM_DISKS=n` its `UNKEY_METALD_WARM_DISKS` (default 2; 0 copies every disk at its create).
//! `BENCH_METRICS_INTERVAL_MS=n` its `UNKEY_METALD_METRICS_INTERVAL` (default 100).
//! `BENCH_BARE_FIRST=1` starts the bare Firecrackers before metald's boots, not after its deletes.
//! `BENCH_UNISOLATED=1` runs metald's VMMs without jail, cgroups or network
//! (`UNKEY_METALD_ISOLATION=none`).
//! `BENCH_SCALE_PAIRED=k` also starts bare Firecrackers between metald's boots, `k` after each
//! `k` boots, and prints the two sums: both fleets grow together and see the host in the same
//! moments, which the two phases of the stream above do not (a host whose speed changes
//! between them moves their ratio). With `k=1` the bare starts also carry metald's pool
//! refills, which wait for the quiet moment after a start, so no ratio is printed; with
//! blocks of 100 (`k=100`) only the first few starts of each bare block do. No settled boots
//! are made then: the bare fleet keeps the host from the quiet they wait for.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use metald::backend::firecracker::api::FirecrackerApi;
use serde_json::json;
use support::*;

/// Bare Firecrackers started beside metald's VMs once they all run.
const BESIDE: usize = 20;

fn main() {
    let Some(fc) = firecracker_bin() else {
        println!("scale: skipped (no firecracker binary on PATH)");
        return;
    };
    let n: usize = env_num("BENCH_SCALE_VMS", 1000);
    // Before any thread exists: a mount namespace of the bench's own (see `RunTmpfs`).
    let own_mounts = own_mount_namespace();
    wait_host_quiet("metald's boots");
    let mut run_tmpfs = None;
    let mut builder = metald_with_backend("firecracker");
    let unisolated = env_num::<u8>("BENCH_UNISOLATED", 0) == 1;
    let pair_block = env_num::<usize>("BENCH_SCALE_PAIRED", 0);
    // A settled boot waits for a quiet host, which a paired bare fleet idling beside metald's
    // keeps from coming (it waited a minute before each boot and each bare start).
    let settled_k = match pair_block {
        0 => env_num::<usize>("BENCH_SETTLED", 30),
        _ => 0,
    };
    let (warm_jails, warm_pool) = (
        env_num::<usize>("BENCH_WARM_JAILS", metald::config::DEFAULT_WARM_JAILS),
        env_num::<usize>("BENCH_WARM_POOL", 4),
    );
    if unisolated {
        // No jail, cgroup or network: what of a boot's growth is the isolation's.
        builder = builder.unisolated();
    }
    let m = builder
        .env("UNKEY_METALD_RATE_LIMIT_PER_SECOND", "1000000")
        .env("UNKEY_METALD_RATE_LIMIT_BURST", "1000000")
        // The settled boots run beside the last fleet size.
        .env("UNKEY_METALD_QUOTA_VMS", &(n + settled_k + 10).to_string())
        .env("UNKEY_METALD_IPV4_SUBNET", "10.208.0.0/16")
        .env(
            "UNKEY_METALD_JAILER_ID_COUNT",
            &(n + settled_k + 100).to_string(),
        )
        .env("UNKEY_METALD_HOST_MEMORY_OVERCOMMIT", "100")
        .env("UNKEY_METALD_HOST_CPU_OVERCOMMIT", "1000")
        // metald's default spare disk copies (the test harness turns them off).
        .env(
            "UNKEY_METALD_WARM_DISKS",
            &env_num::<usize>("BENCH_WARM_DISKS", 2).to_string(),
        )
        .env(
            "UNKEY_METALD_WARM_JAILS",
            &warm_jails.to_string(),
        )
        // metald's default sampling; longer to see what the 100 ms samples of all running
        // VMs cost the boots beside them.
        .env(
            "UNKEY_METALD_METRICS_INTERVAL",
            &format!("{}ms", env_num::<u64>("BENCH_METRICS_INTERVAL_MS", 100)),
        )
        .env(
            "UNKEY_METALD_WARM_POOL",
            &warm_pool.to_string(),
        )
        // The per-step lines of a start and a delete (see `steps` below).
        .env(
            "UNKEY_METALD_LOG",
            "info,metald::sandbox=debug,metald_host::network=debug,metald_host::jailer=debug,metald_vmm::firecracker=debug",
        )
        .start_with(|m| {
            if let Some(iso) = m.iso.as_ref().filter(|_| own_mounts) {
                run_tmpfs = RunTmpfs::mount(&iso.run_dir);
            }
            Metald::import_tiny_guest(m)
        });
    let mut api = Rest::new(&m, Some("scale")).keep_alive();
    if !unisolated {
        // Full pools, as after any quiet while: a boot then finds them stocked, and a refill
        // with stock to spare waits until no start runs.
        let t0 = Instant::now();
        m.wait_pools_within(warm_jails, warm_pool, Duration::from_secs(600));
        println!(
            "pools full ({warm_jails} warm jails, {warm_pool} spare networks) after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        wait_host_quiet("metald's boots, with its pools full");
    }
    // The bare fleet before metald's boots instead of after its deletes: the host's memory (a
    // nested VM's, whose free pages are handed back to the hypervisor after a while) then
    // serves the bare starts first, from the same state metald's boots get otherwise.
    let bare_first = (env_num::<u8>("BENCH_BARE_FIRST", 0) == 1).then(|| {
        let done = bare_fleet_run(&fc, &m.data_dir, n);
        wait_host_quiet("metald's boots, after the bare Firecrackers");
        done
    });
    let body = json!({"config": {"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 128 << 20},
        "kernel": {"image_id": "tiny-idle-elf"}, "rootfs": {"image_id": "tiny-disk"}}});
    let rss_before = rss_kib(m.pid().unwrap());
    let mut boots = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    // Paired: bare Firecrackers started between the boots through metald (a block of
    // `pair_block` after each as many boots), so both see the same host (its speed drifts from
    // run to run, and within one) and the same number of VMMs running. Every other figure
    // then includes the bare VMMs running beside metald's.
    let mut paired = (pair_block > 0).then(|| BareFleet::new(&fc, &m.data_dir, n));
    let mut paired_bare = Vec::with_capacity(n);
    // Boots on a settled host at a few fleet sizes, between the stream's boots (their time
    // and CPU are not the stream's).
    let pools = (!unisolated).then_some((warm_jails, warm_pool));
    let mut settled: Vec<Settled> = Vec::new();
    let (mut settled_time, mut settled_cpu) = (Duration::ZERO, CpuSpent::default());
    let t_all = Instant::now();
    let cpu_all = CpuMark::now(m.pid().unwrap());
    loop {
        if settled_k > 0 && [1usize, 100, 500, n].contains(&ids.len()) {
            let (t0, cpu) = (Instant::now(), CpuMark::now(m.pid().unwrap()));
            let at = settled_boots(&m, &api, &body, settled_k, pools, &fc);
            settled.push(Settled {
                running: ids.len(),
                ..at
            });
            settled_time += t0.elapsed();
            settled_cpu = settled_cpu.plus(cpu.since());
        }
        if ids.len() == n {
            break;
        }
        let (id, took) = m.boot_to_banner(&api, &body, Duration::from_secs(60));
        boots.push(took);
        ids.push(id);
        if let Some(fleet) = paired.as_mut() {
            // A block of bare starts after each block of boots (and after the last boots).
            if ids.len() % pair_block == 0 || ids.len() == n {
                while paired_bare.len() < ids.len() {
                    paired_bare.push(fleet.start_one());
                }
            }
        }
    }
    // Paired, the bare starts between the boots are not metald's time; nor are the settled
    // boots.
    let all_booted = t_all.elapsed() - paired_bare.iter().sum::<Duration>() - settled_time;
    let cpu_booted = cpu_all.since().minus(settled_cpu);
    if let Some(fleet) = paired {
        let bare_steps = fleet.stop();
        let through: Duration = boots.iter().sum();
        let bare: Duration = paired_bare.iter().sum();
        if pair_block == 1 {
            // No ratio: metald refills its pools in the quiet moments between its starts,
            // which are now the bare starts, so these carry metald's refills (and its boots
            // get room for them). What it shows is a boot through metald whose refills had
            // room.
            println!(
                "paired: {n} boots through metald {:.1} s; the {n} bare starts between them {:.1} s (these carry metald's pool refills)",
                through.as_secs_f64(),
                bare.as_secs_f64(),
            );
        } else {
            // A block of bare starts begins with metald's pools low (a stream's boots refill
            // them beside the next start), so its first starts carry the last refills, and
            // metald's next block begins with full pools.
            println!(
                "paired in blocks of {pair_block}: {n} boots through metald {:.1} s; the {n} bare starts in the blocks between them {:.1} s ({:.2}x)",
                through.as_secs_f64(),
                bare.as_secs_f64(),
                through.as_secs_f64() / bare.as_secs_f64(),
            );
        }
        println!(
            "paired, median of each 100: metald {}",
            hundred_medians(&boots)
        );
        println!(
            "paired, median of each 100: bare   {}",
            hundred_medians(&paired_bare)
        );
        for (i, name) in [
            "spawn until its API answers",
            "configured, guest started",
            "start until the banner",
            "InstanceStart",
        ]
        .iter()
        .enumerate()
        {
            println!(
                "paired, median of each 100: bare, {name}: {}",
                hundred_medians(&bare_steps[i])
            );
        }
    }
    let rss_after = rss_kib(m.pid().unwrap());
    // What the host spends with the VMs running and nothing starting (metering, the VMMs'
    // metrics flushes, the VMMs themselves), the background every boot above competed with.
    let idle_busy = host_busy(Duration::from_secs(5));
    if let Some(secs) = std::env::var("BENCH_SCALE_HOLD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        println!(
            "holding {n} VMs for {secs} s (metald pid {})",
            m.pid().unwrap()
        );
        std::thread::sleep(Duration::from_secs(secs));
        // The kept-alive connection has idled out meanwhile: the deletes use a new one.
        api = Rest::new(&m, Some("scale")).keep_alive();
    }
    // Bare Firecrackers started beside metald's running VMs: what the host's load with them
    // (metering, metrics flushes, the idle guests) does to a VMM's own start, apart from
    // anything metald does on a boot's path.
    let (_, beside) = bare_firecrackers(&fc, &m.data_dir, BESIDE.min(n), false);
    let mut deletes = Vec::with_capacity(n);
    let t_del = Instant::now();
    for id in &ids {
        let t0 = Instant::now();
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
        deletes.push(t0.elapsed());
    }
    let all_deleted = t_del.elapsed();
    // Each delete answers before its VM's leftovers (namespace, veth, jail, directory) are
    // removed; the bare Firecrackers start once metald has finished, on a host as quiet as the
    // one metald's first boot had.
    m.wait_vms_removed(Duration::from_secs(600));
    let all_removed = t_del.elapsed();
    let (bare_all, bare_steps_ref, cpu_bare) = match bare_first {
        Some(done) => done,
        None => {
            wait_host_quiet("the bare Firecrackers");
            bare_fleet_run(&fc, &m.data_dir, n)
        }
    };

    println!();
    println!("| {n} jailed tiny Firecracker VMs, one after another        | median ms | min ms | max ms |");
    println!(
        "|-------------------------------------------------------|-----------|--------|--------|"
    );
    for at in [1usize, 100, 500, 1000].into_iter().filter(|at| *at <= n) {
        // The boots made with about `at - 1` VMs already running: five around it.
        let (lo, hi) = around(at, n);
        row(
            &format!("CreateVm + BootVm -> banner, ~{} running", at - 1),
            &boots[lo..hi],
        );
    }
    // Five boots around a size vary by as much as the target on 2 shared cores: the median of
    // each hundred shows the trend.
    println!(
        "| CreateVm + BootVm -> banner, median of each 100 boots | {} |",
        hundred_medians(&boots)
    );
    for at in [1usize, 500, 1000].into_iter().filter(|at| *at <= n) {
        let (lo, hi) = around(at, n);
        row(
            &format!("DeleteVm (force), the {at}th of {n}"),
            &deletes[lo..hi],
        );
    }
    let log = m.log_text();
    if let Ok(p) = std::env::var("BENCH_SCALE_LOG") {
        std::fs::write(p, &log).unwrap();
    }
    let warm = log
        .lines()
        .filter(|l| l.contains("VMM started in a warm jail"))
        .count();
    let all_boots = n + settled.iter().map(|s| s.jailed.len()).sum::<usize>();
    println!(
        "boots whose VMM started in a warm jail: {warm} of {all_boots} (the settled ones too)"
    );
    let steps = step_values(&log);
    print_steps(&steps, &ids);
    print_settled(&settled, &steps);
    println!();
    println!("| bare Firecracker, same run (all {n}), step | median ms | min ms | max ms |");
    println!("|---|---|---|---|");
    for (name, samples) in [
        "spawn until its API answers",
        "configured, guest started (four calls + start)",
        "  of which InstanceStart",
        "start until the banner",
    ]
    .iter()
    .zip([0, 1, 3, 2].map(|i| &bare_steps_ref[i]))
    {
        row(name, samples);
    }
    let beside_total: Vec<Duration> = (0..beside[0].len())
        .map(|i| beside[0][i] + beside[1][i] + beside[2][i])
        .collect();
    row(
        &format!("bare, beside metald's {n} VMs: spawn -> banner"),
        &beside_total,
    );
    row(
        &format!("bare, beside metald's {n} VMs: configured, started"),
        &beside[1],
    );
    // The same starts by how many bare VMMs already ran: the host's own growth, which no
    // change to metald can remove.
    let bare_total: Vec<Duration> = (0..n)
        .map(|i| bare_steps_ref[0][i] + bare_steps_ref[1][i] + bare_steps_ref[2][i])
        .collect();
    for at in [1usize, 100, 500, 1000].into_iter().filter(|at| *at <= n) {
        let (lo, hi) = around(at, n);
        row(
            &format!("bare: spawn -> banner, ~{} running", at - 1),
            &bare_total[lo..hi],
        );
    }
    // The bare VMMs' own trend, read like metald's boots above.
    println!(
        "| bare: spawn -> banner, median of each 100 starts | {} |",
        hundred_medians(&bare_total)
    );
    // Beside the jailed boots' `InstanceStart` per hundred (the step table above): how much of
    // its growth is the host's with as many VMMs running.
    println!(
        "| bare: of which InstanceStart, median of each 100 | {} |",
        hundred_medians(&bare_steps_ref[3])
    );
    println!();
    println!("host CPUs busy with {n} VMs running through metald, none starting: {idle_busy:.1} %");
    println!(
        "all {n}: metald {:.1} s to boot, {:.1} s to delete (every leftover removed after {:.1} s); bare firecracker {:.1} s to start ({:.2}x)",
        all_booted.as_secs_f64(),
        all_deleted.as_secs_f64(),
        all_removed.as_secs_f64(),
        bare_all.as_secs_f64(),
        all_booted.as_secs_f64() / bare_all.as_secs_f64()
    );
    // Busy near 100 % of both CPUs means the boots wait for CPU (work anywhere on the host
    // counts: metering, pool refills, the kernel's); well below it, they wait on each other.
    println!(
        "host CPUs busy while booting: through metald {:.1} % ({:.1} CPU s, metald's own process {:.1} s); bare {:.1} % ({:.1} CPU s)",
        cpu_booted.busy_percent(),
        cpu_booted.busy_secs,
        cpu_booted.process_secs,
        cpu_bare.busy_percent(),
        cpu_bare.busy_secs,
    );
    println!(
        "metald RSS: {} MiB with none running, {} MiB with {n} running ({:.1} KiB per VM)",
        rss_before / 1024,
        rss_after / 1024,
        (rss_after.saturating_sub(rss_before)) as f64 / n as f64
    );
}

/// The median of each hundred, in ms, joined by " / ".
fn hundred_medians(d: &[Duration]) -> String {
    d.chunks(100)
        .map(|c| {
            let mut ms: Vec<f64> = c.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
            ms.sort_by(f64::total_cmp);
            format!("{:.1}", ms[ms.len() / 2])
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The lines metald logs for each start and delete, by what they time, in the order of a
/// start and then a delete: (log message, its `*_ms` field, name in the table).
const STEPS: &[(&str, &str, &str)] = &[
    (
        "vm created",
        "checks_ms",
        "create: validation, quota, disk room",
    ),
    ("vm created", "disks_ms", "create: disk copy"),
    (
        "vm created",
        "record_ms",
        "create: backend files, record (IPAM)",
    ),
    (
        "vm booted",
        "admission_ms",
        "boot: quota and capacity admission",
    ),
    (
        "network made",
        "leftovers_ms",
        "boot: network, an earlier run's leftovers",
    ),
    (
        "network made",
        "plumbing_ms",
        "boot: network (a spare: its namespace re-pinned)",
    ),
    (
        "network opened",
        "firewall_ms",
        "boot: host end, nft elements (beside the VMM start)",
    ),
    (
        "spare taken",
        "rename_ms",
        "boot:   of which the spare's veth renamed",
    ),
    (
        "sandbox ready",
        "jail_ms",
        "boot: jail (cgroup, directories)",
    ),
    (
        "firecracker started",
        "spawn_ms",
        "boot: VMM files and spawn",
    ),
    (
        "VMM started in a warm jail",
        "assign_ms",
        "boot: a warm jail given the VM (in the spawn)",
    ),
    (
        "warm jail assigned",
        "prepare_ms",
        "boot:   of which the VM's descriptors",
    ),
    (
        "warm jail assigned",
        "child_ms",
        "boot:   of which the jail until the VMM's exec",
    ),
    (
        "firecracker started",
        "ready_ms",
        "boot: jail child + VMM until API answers",
    ),
    (
        "firecracker started",
        "configure_ms",
        "boot: VMM configured, guest started",
    ),
    (
        "firecracker started",
        "net_ms",
        "boot:   of which the network device (TAP)",
    ),
    (
        "firecracker started",
        "instance_start_ms",
        "boot:   of which InstanceStart",
    ),
    (
        "vm booted",
        "record_ms",
        "boot: record RUNNING, start metering",
    ),
    ("vm deleted", "vmm_ms", "delete: VMM sent SIGKILL"),
    (
        "vm deleted",
        "rest_ms",
        "delete: last usage, record removed",
    ),
    (
        "network removed",
        "firewall_ms",
        "delete, after: nft elements (batched)",
    ),
    (
        "network removed",
        "plumbing_ms",
        "delete, after: veth + netns",
    ),
    (
        "sandbox released",
        "jail_ms",
        "delete, after: VMM gone, cgroup, jail dir",
    ),
    (
        "leftovers removed",
        "reap_ms",
        "delete, after: all, VM directory included",
    ),
];

/// Each step's value per VM from metald's own log lines: (vm id, message, field) -> ms.
type StepValues<'a> = std::collections::HashMap<(String, &'a str, &'a str), f64>;

/// Reads the [`STEPS`] of every VM from metald's log.
fn step_values(log: &str) -> StepValues<'static> {
    let mut seen = StepValues::new();
    for line in log.lines() {
        for (msg, field, _) in STEPS {
            if !line.contains(&format!(" {msg} ")) && !line.ends_with(msg) {
                continue;
            }
            let Some(id) = line
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("vm_id="))
                .find(|v| v.starts_with("vm-"))
                .map(|v| v.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-'))
            else {
                continue;
            };
            if let Some(v) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{field}=")))
                .and_then(|v| v.parse::<f64>().ok())
            {
                seen.insert((id.to_string(), *msg, *field), v);
            }
        }
    }
    seen
}

/// Prints the median of each step of a start and a delete for each hundred VMs in the order
/// they were booted, from metald's own log lines (the per-step profile of issue 14).
fn print_steps(seen: &StepValues, ids: &[String]) {
    // Medians of each hundred boots: the five around a count vary too much to show a trend
    // (a step flat at 8-9 ms per hundred read 8.4 → 10.9 ms from five).
    let chunks: Vec<&[String]> = ids.chunks(100).collect();
    println!();
    print!("| step, median ms of each 100 boots (deletes) ");
    for (i, c) in chunks.iter().enumerate() {
        print!("| {}-{} ", i * 100 + 1, i * 100 + c.len());
    }
    println!("|");
    println!("|{}", "---|".repeat(chunks.len() + 1));
    for (msg, field, name) in STEPS {
        print!("| {name:<45} ");
        for c in &chunks {
            let mut v: Vec<f64> = c
                .iter()
                .filter_map(|id| seen.get(&(id.clone(), *msg, *field)).copied())
                .collect();
            v.sort_by(f64::total_cmp);
            match v.get(v.len() / 2) {
                Some(m) => print!("| {m:.1} "),
                None => print!("| - "),
            }
        }
        println!("|");
    }
}

/// Prints the settled boots beside their paired bare starts at each fleet size, and how far
/// each measure's highest is above its lowest (the flatness target of issue 14).
fn print_settled(settled: &[Settled], steps: &StepValues) {
    if settled.is_empty() {
        return;
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let k = settled[0].jailed.len();
    println!();
    println!("| {k} at a time, settled host (pools full, host quiet), ms | metald median | mean | bare median | mean | metald - bare (median of pairs) | metald's InstanceStart | bare's |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut columns: [Vec<f64>; 5] = Default::default();
    for s in settled {
        let diffs: Vec<f64> = s
            .jailed
            .iter()
            .zip(&s.bare)
            .map(|(j, b)| ms(j) - ms(b))
            .collect();
        let instance_start: Vec<f64> = s
            .ids
            .iter()
            .filter_map(|id| {
                steps
                    .get(&(id.clone(), "firecracker started", "instance_start_ms"))
                    .copied()
            })
            .collect();
        let row = [
            median_ms(&s.jailed),
            mean_ms(&s.jailed),
            median_ms(&s.bare),
            mean_ms(&s.bare),
            median(&diffs),
        ];
        println!(
            "| {} running | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.running,
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            median(&instance_start),
            median_ms(&s.bare_instance_start),
        );
        for (c, v) in columns.iter_mut().zip(row) {
            c.push(v);
        }
    }
    // The host's own growth shows in the bare columns; metald's in the difference.
    let [jailed_median, jailed_mean, bare_median, bare_mean, diff] = &columns;
    println!(
        "settled, highest above lowest: metald median {:.0} %, mean {:.0} %; bare median {:.0} %, mean {:.0} %; metald - bare from {:.1} to {:.1} ms",
        spread_percent(jailed_median),
        spread_percent(jailed_mean),
        spread_percent(bare_median),
        spread_percent(bare_mean),
        diff.iter().copied().fold(f64::MAX, f64::min),
        diff.iter().copied().fold(f64::MIN, f64::max),
    );
}

/// Waits (at most 5 min) until the host's CPUs are less than [`QUIET_BUSY`] % busy over a
/// second, and says how long that took: the kernel tears network namespaces down on a work
/// queue of its own (`cleanup_net`), minutes after the last one of 1000 was removed, and a
/// phase started beside that measures the teardown too.
fn wait_host_quiet(before: &str) {
    let t0 = Instant::now();
    let busy = quiet_host(Duration::from_secs(1), Duration::from_secs(300));
    println!(
        "host {busy:.1} % busy after {:.0} s of waiting, before {before}",
        t0.elapsed().as_secs_f64()
    );
}

/// Measures the host's busy % over `window` until it is below [`QUIET_BUSY`] or `max` has
/// passed; the last measure.
fn quiet_host(window: Duration, max: Duration) -> f64 {
    let t0 = Instant::now();
    loop {
        let busy = host_busy(window);
        if busy < QUIET_BUSY || t0.elapsed() > max {
            return busy;
        }
    }
}

/// What counts as a quiet host (this one idles at 2-3 %: its agent, DAMON).
const QUIET_BUSY: f64 = 6.0;

/// How busy the host's CPUs were over `window`, in percent of all of them (from /proc/stat).
fn host_busy(window: Duration) -> f64 {
    let mark = CpuMark::now(std::process::id());
    std::thread::sleep(window);
    mark.since().busy_percent()
}

/// The host's CPU counters and one process's at a moment (from /proc/stat and
/// /proc/<pid>/stat, in clock ticks).
struct CpuMark {
    total: u64,
    idle: u64,
    pid: u32,
    process: u64,
}

/// What the host and the process spent between a [`CpuMark`] and now.
#[derive(Default, Clone, Copy)]
struct CpuSpent {
    /// All CPUs' time that passed, busy or not.
    total_secs: f64,
    busy_secs: f64,
    process_secs: f64,
}

impl CpuSpent {
    fn busy_percent(&self) -> f64 {
        100.0 * self.busy_secs / self.total_secs.max(0.01)
    }

    /// This without `other`, a part of it.
    fn minus(self, other: CpuSpent) -> CpuSpent {
        CpuSpent {
            total_secs: self.total_secs - other.total_secs,
            busy_secs: self.busy_secs - other.busy_secs,
            process_secs: self.process_secs - other.process_secs,
        }
    }

    fn plus(self, other: CpuSpent) -> CpuSpent {
        CpuSpent {
            total_secs: self.total_secs + other.total_secs,
            busy_secs: self.busy_secs + other.busy_secs,
            process_secs: self.process_secs + other.process_secs,
        }
    }
}

impl CpuMark {
    fn now(pid: u32) -> Self {
        let (total, idle) = host_ticks();
        let process = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // Fields after the command's closing parenthesis: utime and stime are the
                // 12th and 13th of them.
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<u64> = rest
                    .split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                Some(f.iter().sum())
            })
            .unwrap_or(0);
        CpuMark {
            total,
            idle,
            pid,
            process,
        }
    }

    fn since(&self) -> CpuSpent {
        let now = CpuMark::now(self.pid);
        let total = now.total.saturating_sub(self.total).max(1) as f64;
        let busy = total - now.idle.saturating_sub(self.idle) as f64;
        // USER_HZ is 100 on every Linux this runs on.
        CpuSpent {
            total_secs: total / 100.0,
            busy_secs: busy / 100.0,
            process_secs: now.process.saturating_sub(self.process) as f64 / 100.0,
        }
    }
}

/// The host's (all, idle + iowait) clock ticks from /proc/stat's first line.
fn host_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (v.iter().take(8).sum(), idle)
}

/// Boots on a settled host at one fleet size, each paired with a bare Firecracker started
/// the same way right after it.
struct Settled {
    /// VMs running through metald meanwhile.
    running: usize,
    /// The boots' VM ids.
    ids: Vec<String>,
    /// Each boot: CreateVm + BootVm -> banner.
    jailed: Vec<Duration>,
    /// Each bare start: spawn -> banner.
    bare: Vec<Duration>,
    /// Each bare start's `InstanceStart`.
    bare_instance_start: Vec<Duration>,
}

/// `k` boots one after another, each once metald's pools are full again (`pools`: warm jails
/// and spare networks; `None` without isolation) and the host is quiet: the boot time at the
/// fleet's present size, apart from the stream's back-to-back load. After each, once the host
/// is quiet again, a bare Firecracker starts the same way beside the same fleet: whatever the
/// host adds at this size (its kernel's work per running VM, the tick a wait lands on) it
/// adds to both, and their difference is metald's own. All run until the last of them is
/// done (a size's 1 running is up to 2k VMMs by its end); then they are ended, and the
/// boots' leftovers awaited, so the fleet is as before.
fn settled_boots(
    m: &Metald,
    api: &Rest,
    body: &serde_json::Value,
    k: usize,
    pools: Option<(usize, usize)>,
    fc: &Path,
) -> Settled {
    let mut bare = BareFleet::new(fc, &m.data_dir, k);
    let mut jailed = Vec::with_capacity(k);
    let mut bare_times = Vec::with_capacity(k);
    let mut ids = Vec::with_capacity(k);
    for _ in 0..k {
        if let Some((jails, spares)) = pools {
            m.wait_pools_within(jails, spares, Duration::from_secs(600));
        }
        settle_host();
        let (id, took) = m.boot_to_banner(api, body, Duration::from_secs(60));
        jailed.push(took);
        ids.push(id);
        settle_host();
        bare_times.push(bare.start_one());
    }
    let [_, _, _, bare_instance_start] = bare.stop();
    for id in &ids {
        api.call("DELETE", &format!("/v1/vms/{id}?force=true"), None)
            .ok();
    }
    for id in &ids {
        m.wait_vm_dir_gone(id);
    }
    if let Some((jails, spares)) = pools {
        m.wait_pools_within(jails, spares, Duration::from_secs(600));
    }
    settle_host();
    Settled {
        running: 0,
        ids,
        jailed,
        bare: bare_times,
        bare_instance_start,
    }
}

/// Waits (at most 60 s, silently) until the host's CPUs are less than [`QUIET_BUSY`] % busy
/// over half a second.
fn settle_host() {
    quiet_host(Duration::from_millis(500), Duration::from_secs(60));
}

/// The five starts around the one made with `at - 1` already running, of `n`: `lo..hi`.
fn around(at: usize, n: usize) -> (usize, usize) {
    let lo = at.saturating_sub(3).min(n - 1);
    (lo, (lo + 5).min(n))
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `n` bare Firecrackers started one after another, then killed: the time for all and each
/// one's steps (spawn until its API answers, configured and started, until the banner, and the
/// `InstanceStart` of the second). With `idle`, the host's load with all `n` running is printed
/// before they go.
fn bare_firecrackers(
    fc: &Path,
    assets: &Path,
    n: usize,
    idle: bool,
) -> (Duration, [Vec<Duration>; 4]) {
    let mut fleet = BareFleet::new(fc, assets, n);
    let t0 = Instant::now();
    for _ in 0..n {
        fleet.start_one();
    }
    let took = t0.elapsed();
    if idle {
        println!(
            "host CPUs busy with {n} bare Firecrackers running, none starting: {:.1} %",
            host_busy(Duration::from_secs(5))
        );
    }
    (took, fleet.stop())
}

/// The bare fleet of `n` beside which metald's boots are read: all its starts, each one's
/// steps (see [`BareFleet`]), and what the host spent on them.
fn bare_fleet_run(fc: &Path, assets: &Path, n: usize) -> (Duration, [Vec<Duration>; 4], CpuSpent) {
    let cpu = CpuMark::now(std::process::id());
    let (all, steps) = bare_firecrackers(fc, assets, n, true);
    (all, steps, cpu.since())
}

/// Bare Firecrackers started one at a time, each the same way (spawn, four API calls, banner),
/// with each one's steps: spawn until its API answers, configured and started, until the
/// banner, and the `InstanceStart` of the second.
struct BareFleet {
    fc: std::path::PathBuf,
    kernel: std::path::PathBuf,
    disk: std::path::PathBuf,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    children: Vec<std::process::Child>,
    steps: [Vec<Duration>; 4],
}

impl BareFleet {
    fn new(fc: &Path, assets: &Path, n: usize) -> Self {
        Self {
            fc: fc.to_path_buf(),
            kernel: assets.join("tiny-idle.elf"),
            disk: assets.join("tiny.img"),
            dir: tempfile::Builder::new()
                .prefix("mdb")
                .tempdir_in("/tmp")
                .unwrap(),
            rt: tokio::runtime::Runtime::new().unwrap(),
            children: Vec::with_capacity(n),
            steps: Default::default(),
        }
    }

    /// Starts the next one; its time from spawn to banner.
    fn start_one(&mut self) -> Duration {
        let i = self.children.len();
        let sock = self.dir.path().join(format!("{i}.sock"));
        let console = self.dir.path().join(format!("{i}.log"));
        let t = Instant::now();
        self.children
            .push(spawn_bare_firecracker(&self.fc, &sock, &console));
        let steps = &mut self.steps;
        let (kernel, disk) = (&self.kernel, &self.disk);
        self.rt.block_on(async {
            let api = FirecrackerApi::new(&sock);
            api.wait_ready(Duration::from_secs(10)).await.unwrap();
            steps[0].push(t.elapsed());
            let t = Instant::now();
            let instance_start = boot_bare_tiny(&api, kernel, disk).await;
            steps[1].push(t.elapsed());
            steps[3].push(instance_start);
            let t = Instant::now();
            wait_for_banner(&console, t, Duration::from_secs(60));
            steps[2].push(t.elapsed());
        });
        t.elapsed()
    }

    /// Kills them all; the steps of each.
    fn stop(mut self) -> [Vec<Duration>; 4] {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::mem::take(&mut self.steps)
    }
}

/// Moves this bench (still single-threaded) into a mount namespace of its own whose mounts
/// never reach the host's, so what it mounts goes with it however it ends; metald and its
/// jails inherit it. False (and a note) where that is not allowed.
fn own_mount_namespace() -> bool {
    use rustix::mount::{mount_change, MountPropagationFlags};
    // SAFETY: NEWNS only gives this single-threaded process its own mount table; no file
    // descriptor table is unshared.
    let made = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
        .and_then(|()| {
            mount_change(
                "/",
                MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
            )
        });
    if let Err(e) = &made {
        println!("no mount namespace of the bench's own ({e}): metald's run directory stays on the data directory's file system");
    }
    made.is_ok()
}

/// metald's run directory (its namespace pins) on a tmpfs, as `/run` is on every systemd host
/// (`UNKEY_METALD_RUN_DIR` defaults to `/run/metald`): the harness puts it in the data
/// directory, here on an ext4 without a journal, where each pin is an inode allocation that
/// looks past every inode freed in the last minutes. Unmounted after metald (declared before
/// it, dropped after it).
struct RunTmpfs(std::path::PathBuf);

impl RunTmpfs {
    fn mount(dir: &Path) -> Option<Self> {
        use rustix::mount::{mount, MountFlags};
        std::fs::create_dir_all(dir).unwrap();
        match mount(
            "tmpfs",
            dir,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            c"mode=0755",
        ) {
            Ok(()) => {
                println!("metald's run directory is a tmpfs, as /run is on a systemd host");
                Some(Self(dir.to_path_buf()))
            }
            Err(e) => {
                println!("no tmpfs for metald's run directory ({e})");
                None
            }
        }
    }
}

impl Drop for RunTmpfs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        // The data directory's removal (with metald's) stopped at this mount point.
        if let Some(data_dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(data_dir);
        }
    }
}
