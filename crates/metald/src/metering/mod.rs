//! Metering: every running VM is sampled at a fixed interval (100 ms by default) from the
//! kernel's own counters: CPU time and memory from the VM's cgroup (CPU time followed between
//! its readings every 10 s by the VMM's process CPU clock), disk bytes from
//! `/proc/<pid>/io`, disk operations from the cgroup's block-I/O statistics, network bytes and
//! packets of the VM's host-side veth from one netlink statistics dump.
//!
//! Cheap at scale: one dedicated thread, every file opened once per VM run and re-read with
//! `pread` at offset 0 into a stack buffer, one netlink dump per tick for all VMs' interfaces,
//! slow-moving values once a second (spread over the ticks), the cgroup's CPU counter every
//! 10 s, no process spawned.
//! A VM is counted from the instant its VMM started to the instant it stopped; while paused its
//! vCPU threads do not run, so pause time is not CPU time.

pub mod sources;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::VmmMetrics;
use crate::domain::{now_ms, CustomerId, VmId};
use crate::report::Chain;
use sources::{Depth, NetStats, NetTable, Sources};

pub use metald_domain::usage::Counters;

/// The memory gauge and disk operation counts are read every this many ticks (1 s at the
/// default interval): they change slowly and each costs a syscall per VM.
const SLOW_EVERY: u64 = 10;

/// The cgroup's CPU counter, the authority the process clock is checked against, is read every
/// this many ticks (10 s at the default interval) besides a run's start and stop: for a jailed
/// VMM, the only process in its cgroup, the two count the same scheduler time, and the file
/// read costs twice the clock read.
const FULL_EVERY: u64 = 100;

/// What tick `tick` reads of a run in slow-read phase `phase`. Runs are spread over the phases
/// so that the slower reads of 1000 VMs don't all land in one tick.
fn depth(tick: u64, phase: u64) -> Depth {
    let t = tick.wrapping_add(phase);
    if t.is_multiple_of(FULL_EVERY) {
        Depth::Full
    } else if t.is_multiple_of(SLOW_EVERY) {
        Depth::Second
    } else {
        Depth::Tick
    }
}

/// One sample: cumulative usage since the VM was created, at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsagePoint {
    /// Wall-clock time, Unix milliseconds.
    pub wall_ms: i64,
    /// metald's monotonic clock, nanoseconds since it started.
    pub mono_ns: u64,
    /// Usage so far.
    pub total: Counters,
}

/// What a VM used, as metald knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUsage {
    /// Totals since the VM was created.
    pub total: Counters,
    /// What the VMM run in progress used so far (since its boot, reboot or wake); `None`
    /// when the VM has no VMM.
    pub run: Option<Counters>,
    /// Guest memory configured, bytes.
    pub memory_configured: u64,
    /// Samples still held, oldest first.
    pub samples: Vec<UsagePoint>,
    /// `None` when the samples cover the VM's whole life (before the first, it had used
    /// nothing); otherwise the time of the oldest sample held, before which usage is only known
    /// as a total (older samples aged out, or metald restarted).
    pub known_from_ms: Option<i64>,
    /// The VMM's last own metrics record (Firecracker), as it wrote it.
    pub vmm_metrics_raw: Option<String>,
}

/// One VMM run being sampled.
struct Run {
    sources: Sources,
    host_if: Option<String>,
    /// `host_if`'s index, once it is found.
    ifindex: Option<u32>,
    /// Readings when the run was first sampled (counters of a fresh cgroup/veth start at 0;
    /// a re-adopted VMM's do not).
    base: Counters,
    last: Counters,
    /// Disk operations the VMM itself counted since counting began, when it reports them.
    vmm_ops: Option<(u64, u64)>,
    /// Which ticks read its slower sources (see [`depth`]); also names the run, each run
    /// counted taking the next number.
    phase: u64,
}

impl Run {
    fn apply_vmm_ops(&mut self) {
        if let Some((r, w)) = self.vmm_ops {
            self.last.disk_read_ops = self.base.disk_read_ops + r;
            self.last.disk_write_ops = self.base.disk_write_ops + w;
        }
    }
}

struct VmMeter {
    customer: CustomerId,
    memory_configured: u64,
    /// Usage of finished runs.
    carried: Counters,
    run: Option<Run>,
    series: VecDeque<UsagePoint>,
    /// The newest sample's time, kept beside `series`: reading it back from there costs the
    /// sampler a cache miss per VM per tick.
    last_wall_ms: i64,
    /// Whether `series` holds the VM's whole history: it began with the VM's first run in
    /// this metald and nothing aged out since. Otherwise usage before its oldest sample is
    /// not known by time.
    complete: bool,
    /// The VMM's last own metrics record, as it wrote it.
    vmm_raw: Option<String>,
}

impl VmMeter {
    /// Adds a sample, dropping the oldest beyond `cap`. Wall-clock times are kept strictly
    /// increasing (a stop's last sample can fall in the same millisecond as a tick's): each
    /// billed interval is then named by a time of its own.
    fn record(&mut self, mut p: UsagePoint, cap: usize) {
        if !self.series.is_empty() {
            p.wall_ms = p.wall_ms.max(self.last_wall_ms.saturating_add(1));
        }
        self.last_wall_ms = p.wall_ms;
        if self.series.len() >= cap {
            self.series.pop_front();
            self.complete = false;
        }
        self.series.push_back(p);
    }

    fn total(&self) -> Counters {
        match &self.run {
            Some(r) => self.carried.advanced(&r.base, &r.last),
            None => self.carried,
        }
    }
}

/// A VMM run to count.
#[derive(Debug)]
pub struct RunStart {
    /// The VM's owner.
    pub customer: CustomerId,
    /// Guest memory configured, bytes.
    pub memory_configured: u64,
    /// Where its counters are read.
    pub sources: Sources,
    /// Its host-side interface, for network counters.
    pub host_if: Option<String>,
    /// What earlier runs used.
    pub carried: Counters,
    /// Readings the run's counting started from (a re-adopted VMM); `None`: from now.
    pub base: Option<Counters>,
}

/// Sampler settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterConfig {
    /// Sampling interval.
    pub interval: Duration,
    /// How many samples per VM are kept in memory.
    pub retained_samples: usize,
    /// How often a VMM that keeps its own metrics (Firecracker) is asked to flush them.
    pub vmm_metrics_interval: Duration,
}

/// The sampler and the usage it collected.
pub struct Meter {
    cfg: MeterConfig,
    vms: Mutex<HashMap<VmId, VmMeter>>,
    /// Interface counters; `None` if the netlink socket could not be opened (logged).
    net: Mutex<Option<NetStats>>,
    epoch: Instant,
    /// CPU time spent sampling, nanoseconds (its own cost, exported as a metric).
    busy_ns: AtomicU64,
    ticks: AtomicU64,
    /// The next run's slow-read phase.
    phases: AtomicU64,
}

impl Meter {
    /// Starts sampling on a dedicated thread; it ends when the meter is dropped.
    pub fn start(cfg: MeterConfig) -> Arc<Self> {
        let meter = Arc::new(Self {
            cfg,
            vms: Mutex::new(HashMap::new()),
            net: Mutex::new(match NetStats::open() {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::error!(error = %Chain(&e), "opening the netlink socket for interface counters failed; network usage is not counted");
                    None
                }
            }),
            epoch: Instant::now(),
            busy_ns: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            phases: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&meter);
        let spawned = std::thread::Builder::new()
            .name("metald-meter".into())
            .spawn(move || {
                let mut next = Instant::now();
                loop {
                    next += cfg.interval;
                    let Some(m) = weak.upgrade() else { return };
                    m.tick();
                    drop(m);
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        // Fell behind (a stalled host): skip the missed ticks, never burst.
                        next = now;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %Chain(&e), "starting the metering thread failed; no usage is sampled");
        }
        meter
    }

    fn map(&self) -> MutexGuard<'_, HashMap<VmId, VmMeter>> {
        // Sampling cannot leave the map inconsistent; a poisoned lock is still usable.
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The interface counters; `None` when they can't be read.
    fn net(&self) -> MutexGuard<'_, Option<NetStats>> {
        self.net.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sampling interval.
    pub fn interval(&self) -> Duration {
        self.cfg.interval
    }

    /// How often VMMs are asked for their own metrics.
    pub fn vmm_metrics_interval(&self) -> Duration {
        self.cfg.vmm_metrics_interval
    }

    /// Seconds spent sampling so far, and the number of ticks.
    pub fn cost(&self) -> (f64, u64) {
        (
            self.busy_ns.load(Ordering::Relaxed) as f64 / 1e9,
            self.ticks.load(Ordering::Relaxed),
        )
    }

    /// Starts counting a VMM run; returns the readings its counting starts from, for the
    /// caller to persist.
    pub fn track(&self, vm: &VmId, start: RunStart) -> Counters {
        let RunStart {
            customer,
            memory_configured,
            mut sources,
            host_if,
            carried,
            base,
        } = start;
        // A new VM's series starts from nothing; one with usage from before (a restart, an
        // adopted VMM) does not.
        let fresh = base.is_none() && carried == Counters::default();
        let (ifindex, now) = {
            let mut net = self.net();
            let ifindex = resolve(net.as_ref(), host_if.as_deref());
            if let Some(i) = ifindex {
                refresh(&mut net, Some(i));
            }
            let now = sources.read(ifindex, table(net.as_ref()), &Counters::default());
            (ifindex, now)
        };
        let base = base.unwrap_or(now);
        let mut map = self.map();
        let entry = map.entry(vm.clone()).or_insert_with(|| VmMeter {
            customer,
            memory_configured,
            carried,
            run: None,
            series: VecDeque::with_capacity(self.cfg.retained_samples),
            last_wall_ms: i64::MIN,
            complete: fresh,
            vmm_raw: None,
        });
        entry.memory_configured = memory_configured;
        entry.carried = carried;
        entry.run = Some(Run {
            sources,
            host_if,
            ifindex,
            base,
            last: now,
            vmm_ops: None,
            phase: self.phases.fetch_add(1, Ordering::Relaxed),
        });
        base
    }

    /// Takes what the VMM itself reported: its disk operations replace the cgroup's (which
    /// many hosts don't count), and the raw record is kept.
    pub fn add_vmm_metrics(&self, vm: &VmId, m: VmmMetrics) {
        let mut map = self.map();
        let Some(meter) = map.get_mut(vm) else { return };
        meter.vmm_raw = Some(m.raw);
        if let Some(run) = meter.run.as_mut() {
            if run.vmm_ops.is_none() {
                // The VMM counts its disk operations itself from now on: stop reading the
                // cgroup's (a syscall per VM per second saved).
                run.sources.close_block_ops();
            }
            run.vmm_ops = Some((m.block_read_ops, m.block_write_ops));
            run.apply_vmm_ops();
        }
    }

    /// The number of the VM's run being counted (each run gets a new one), if any.
    pub fn run_number(&self, vm: &VmId) -> Option<u64> {
        self.map().get(vm)?.run.as_ref().map(|r| r.phase)
    }

    /// Takes a last sample of the VM's run and stops counting it; returns the VM's totals.
    pub fn stop(&self, vm: &VmId) -> Option<Counters> {
        let mut net = self.net();
        let mut map = self.map();
        let m = map.get_mut(vm)?;
        if let Some(run) = m.run.as_mut() {
            if let Some(i) = run.ifindex {
                refresh(&mut net, Some(i));
            }
            run.last = run
                .sources
                .read(run.ifindex, table(net.as_ref()), &run.last);
            run.apply_vmm_ops();
        }
        let mut total = m.total();
        total.memory_bytes = 0;
        m.carried = total;
        m.run = None;
        let point = UsagePoint {
            wall_ms: now_ms(),
            mono_ns: self.mono_ns(),
            total,
        };
        m.record(point, self.cfg.retained_samples);
        Some(total)
    }

    /// Raises the VM's totals to at least `floor` counter by counter: usage already billed
    /// (the billing cursor) is never taken back, even when a counter it came from cannot be
    /// read again (a VMM that died while metald was down takes its process's disk counters).
    pub fn raise_to(&self, vm: &VmId, floor: &Counters) {
        let mut map = self.map();
        let Some(m) = map.get_mut(vm) else { return };
        let short = m.total().shortfall(floor);
        if short != Counters::default() {
            m.carried = Counters {
                memory_bytes: m.carried.memory_bytes,
                ..m.carried.plus(&short)
            };
        }
    }

    /// Forgets a deleted VM.
    pub fn forget(&self, vm: &VmId) {
        self.map().remove(vm);
    }

    /// The VM's usage, with the samples taken after `since_ms` (Unix milliseconds).
    pub fn usage(&self, vm: &VmId, since_ms: i64) -> Option<VmUsage> {
        let map = self.map();
        let m = map.get(vm)?;
        Some(VmUsage {
            total: m.total(),
            run: m.run.as_ref().map(|r| r.last.since(&r.base)),
            memory_configured: m.memory_configured,
            samples: m
                .series
                .iter()
                .filter(|p| p.wall_ms > since_ms)
                .copied()
                .collect(),
            known_from_ms: if m.complete {
                None
            } else {
                m.series.front().map(|p| p.wall_ms)
            },
            vmm_metrics_raw: m.vmm_raw.clone(),
        })
    }

    /// The VMs with a VMM run being counted, sorted.
    pub fn running(&self) -> Vec<VmId> {
        self.ids_where(|m| m.run.is_some())
    }

    /// Every VM of `customer` that metald has usage for, sorted.
    pub fn customer_vms(&self, customer: &CustomerId) -> Vec<VmId> {
        self.ids_where(|m| &m.customer == customer)
    }

    fn ids_where(&self, keep: impl Fn(&VmMeter) -> bool) -> Vec<VmId> {
        let mut ids: Vec<VmId> = self
            .map()
            .iter()
            .filter(|(_, m)| keep(m))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// (vm, customer, totals) of every VM with usage, for exporting.
    pub fn snapshot(&self) -> Vec<(VmId, CustomerId, Counters)> {
        self.map()
            .iter()
            .map(|(id, m)| (id.clone(), m.customer.clone(), m.total()))
            .collect()
    }

    fn mono_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn tick(&self) {
        // The sampler's own CPU time (not wall time, which would count being preempted).
        let t0 = thread_cpu_ns();
        let mut net = self.net();
        refresh(&mut net, None);
        let wall_ms = now_ms();
        let mono_ns = self.mono_ns();
        let tick = self.ticks.load(Ordering::Relaxed);
        let mut map = self.map();
        // Two passes: the reads first, then the samples. A sample is a store to a cold line of
        // the VM's series: between syscalls (whose entry waits for pending stores where it
        // switches page tables) each one costs its whole miss; in a loop of their own the
        // misses overlap.
        let mut totals = Vec::with_capacity(map.len());
        for m in map.values_mut() {
            let Some(run) = m.run.as_mut() else { continue };
            if run.ifindex.is_none() {
                run.ifindex = resolve(net.as_ref(), run.host_if.as_deref());
            }
            run.last = run.sources.read_some(
                run.ifindex,
                table(net.as_ref()),
                &run.last,
                depth(tick, run.phase),
            );
            run.apply_vmm_ops();
            totals.push(m.carried.advanced(&run.base, &run.last));
        }
        // The map is locked: it iterates in the same order.
        let running = map.values_mut().filter(|m| m.run.is_some());
        for (m, total) in running.zip(totals) {
            m.record(
                UsagePoint {
                    wall_ms,
                    mono_ns,
                    total,
                },
                self.cfg.retained_samples,
            );
        }
        drop(map);
        drop(net);
        let spent = thread_cpu_ns().saturating_sub(t0);
        self.busy_ns.fetch_add(spent, Ordering::Relaxed);
        self.ticks.fetch_add(1, Ordering::Relaxed);
    }
}

/// Re-reads interface counters: every interface's, or only those of `only` (see
/// [`NetStats::refresh`]). Failures are logged when they start and when they end, not on every
/// tick.
fn refresh(net: &mut Option<NetStats>, only: Option<u32>) {
    let Some(n) = net.as_mut() else { return };
    let was_failing = n.failing();
    match n.refresh(only).err() {
        Some(e) if !was_failing => {
            tracing::warn!(error = %Chain(&e), "reading interface counters failed; network usage stands still until it works again");
        }
        None if was_failing => tracing::info!("reading interface counters works again"),
        _ => {}
    }
}

/// The interface table to read from (empty when interface counters are unavailable).
fn table(net: Option<&NetStats>) -> &NetTable {
    static EMPTY: std::sync::LazyLock<NetTable> = std::sync::LazyLock::new(NetTable::new);
    net.map_or(&EMPTY, NetStats::table)
}

/// The index of a run's host-side interface (absent until the interface exists).
fn resolve(net: Option<&NetStats>, host_if: Option<&str>) -> Option<u32> {
    net?.index(host_if?)
}

fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// Runs for other modules' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A meter sampling every `interval` and keeping `retained_samples` per VM; nothing in
    /// the tests polls a VMM's own metrics.
    pub(crate) fn meter(interval: Duration, retained_samples: usize) -> Arc<Meter> {
        Meter::start(MeterConfig {
            interval,
            retained_samples,
            vmm_metrics_interval: Duration::from_secs(600),
        })
    }

    /// A run of this test process (standing in for a VMM) owned by customer `c`, with `carried`
    /// usage from earlier runs and, for a re-adopted VMM, the `base` its counting started from.
    pub(crate) fn run_start(carried: Counters, base: Option<Counters>) -> RunStart {
        RunStart {
            customer: "c".parse().unwrap(),
            memory_configured: 1 << 20,
            sources: Sources::for_process(std::path::Path::new("/proc"), std::process::id()),
            host_if: None,
            carried,
            base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{meter, run_start};
    use super::*;

    /// Each run counted has a number of its own (a reboot's poll of the VMM's metrics ends
    /// with its run); none once counting stops.
    #[test]
    fn each_run_has_its_own_number() {
        let meter = meter(Duration::from_secs(60), 5);
        let (vm, other) = (VmId::generate(), VmId::generate());
        assert_eq!(meter.run_number(&vm), None);
        meter.track(&vm, run_start(Counters::default(), None));
        meter.track(&other, run_start(Counters::default(), None));
        let first = meter.run_number(&vm).unwrap();
        assert_ne!(meter.run_number(&other), Some(first));
        meter.stop(&vm);
        assert_eq!(meter.run_number(&vm), None);
        meter.track(&vm, run_start(Counters::default(), None));
        let second = meter.run_number(&vm).unwrap();
        assert_ne!(second, first);
    }

    #[test]
    fn a_series_knows_whether_it_covers_the_vms_whole_life() {
        let meter = meter(Duration::from_millis(10), 5);
        let (fresh, old) = (VmId::generate(), VmId::generate());
        meter.track(&fresh, run_start(Counters::default(), None));
        // A VM with usage from before this metald's samples.
        let earlier = Counters {
            cpu_ns: 5,
            ..Counters::default()
        };
        meter.track(&old, run_start(earlier, None));
        assert_eq!(meter.usage(&fresh, i64::MIN).unwrap().known_from_ms, None);
        let u = wait_usage(&meter, &old, |u| !u.samples.is_empty());
        assert_eq!(u.known_from_ms, Some(u.samples[0].wall_ms));
        // Once samples age out, the fresh VM's series no longer reaches back to its start.
        let u = wait_usage(&meter, &fresh, |u| u.known_from_ms.is_some());
        assert_eq!(u.samples.len(), 5);
        assert_eq!(u.known_from_ms, Some(u.samples[0].wall_ms));
        assert_eq!(meter.running(), {
            let mut v = vec![fresh.clone(), old.clone()];
            v.sort();
            v
        });
        meter.stop(&old);
        assert_eq!(meter.running(), vec![fresh]);
        // What the retention setting's documentation says a sample costs.
        assert_eq!(std::mem::size_of::<UsagePoint>(), 96);
    }

    /// The VM's usage once `done` holds: the sampler's ticks are events to wait for, whatever
    /// the machine's speed.
    fn wait_usage(meter: &Meter, vm: &VmId, done: impl Fn(&VmUsage) -> bool) -> VmUsage {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let u = meter.usage(vm, i64::MIN).unwrap();
            if done(&u) {
                return u;
            }
            assert!(std::time::Instant::now() < deadline, "never came: {u:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn slower_reads_come_once_a_second_and_the_authority_every_ten_spread_over_the_ticks() {
        for phase in [0, 1, 37] {
            let seen: Vec<Depth> = (0..FULL_EVERY).map(|t| depth(t, phase)).collect();
            let count = |d| seen.iter().filter(|&&x| x == d).count() as u64;
            assert_eq!(count(Depth::Full), 1);
            assert_eq!(count(Depth::Second), FULL_EVERY / SLOW_EVERY - 1);
        }
        // Ten runs in a row: each tick does the slower reads of one of them.
        for tick in 0..SLOW_EVERY {
            let slow = (0..SLOW_EVERY)
                .filter(|&phase| depth(tick, phase) >= Depth::Second)
                .count();
            assert_eq!(slow, 1);
        }
    }

    #[test]
    fn sample_times_strictly_increase() {
        let mut m = VmMeter {
            customer: "c".parse().unwrap(),
            memory_configured: 0,
            carried: Counters::default(),
            run: None,
            series: VecDeque::new(),
            last_wall_ms: i64::MIN,
            complete: true,
            vmm_raw: None,
        };
        let at = |wall_ms| UsagePoint {
            wall_ms,
            mono_ns: 0,
            total: Counters::default(),
        };
        for t in [100, 100, 99, 250] {
            m.record(at(t), 10);
        }
        let times: Vec<i64> = m.series.iter().map(|p| p.wall_ms).collect();
        assert_eq!(times, vec![100, 101, 102, 250]);
    }

    #[test]
    fn runs_add_up_and_memory_is_the_latest_reading() {
        let carried = Counters {
            cpu_ns: 100,
            net_rx_bytes: 10,
            memory_bytes: 7,
            ..Counters::default()
        };
        let base = Counters {
            cpu_ns: 1000,
            net_rx_bytes: 50,
            ..Counters::default()
        };
        let now = Counters {
            cpu_ns: 1500,
            net_rx_bytes: 80,
            memory_bytes: 42,
            ..Counters::default()
        };
        let t = carried.advanced(&base, &now);
        assert_eq!((t.cpu_ns, t.net_rx_bytes, t.memory_bytes), (600, 40, 42));
        // A counter that went backwards (a reset) never makes usage negative.
        let back = Counters { cpu_ns: 10, ..now };
        assert_eq!(carried.advanced(&base, &back).cpu_ns, 100);
    }
}
