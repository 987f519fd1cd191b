//! Metering and billing hooks of a VMM's run, and usage as the API reports it.

use super::*;

/// What one VM used within a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowUsage {
    /// The VM.
    pub vm: VmId,
    /// Used within the window.
    pub usage: Counters,
    /// Set when the window started before the VM's oldest sample held: usage counts from
    /// this time (Unix milliseconds) instead.
    pub covered_from_ms: Option<i64>,
}

impl VmService {
    /// Starts counting a VM's VMM run: a new one (`adopted` false) from its current counter
    /// readings, a re-adopted one from where its counting started, so the totals stay
    /// continuous across a metald restart (the kernel kept counting meanwhile).
    pub(super) fn track(&self, vm: &VmRecord, pid: u32, adopted: bool) {
        let saved = self.store.load_usage(&vm.id).unwrap_or_else(|e| {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "reading saved usage failed");
            None
        });
        let (carried, base) = saved.unwrap_or_default();
        let base = if adopted { base } else { None };
        let (sources, host_if) = self.isolation.meter_sources(vm, pid);
        let base = self.meter.track(
            &vm.id,
            RunStart {
                customer: vm.customer.clone(),
                memory_configured: vm.config.memory_bytes,
                sources,
                host_if,
                carried,
                base,
            },
        );
        if let Err(e) = self.store.save_usage(&vm.id, &carried, Some(&base)) {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "saving usage failed");
        }
        if adopted {
            // What was billed before the restart stays counted, whatever can be read now.
            match self.store.billing_cursor(&vm.id) {
                Ok(Some((_, billed, _))) => self.meter.raise_to(&vm.id, &billed),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(vm_id = %vm.id, error = %Chain(&e), "reading the billing cursor failed")
                }
            }
        }
        self.poll_vmm_metrics(&vm.id);
        if let Some(b) = self.billing.get() {
            if adopted {
                b.resumed(&vm.id);
            } else {
                b.vm_started(&vm.id, &vm.customer);
            }
        }
    }

    /// While the VM runs, reads its VMM's own metrics every
    /// `UNKEY_METALD_VMM_METRICS_INTERVAL`: what Firecracker wrote by itself (every 60 s), or
    /// when it wrote nothing since, a record asked for (`FlushMetrics`). An asked-for record
    /// costs an API round trip and a 5 KB JSON record, a few ms of the host's CPU on a slow
    /// host (15 % of this 2-core test host at 1000 VMs flushed every 10 s), so this is not done
    /// at the 100 ms sampling rate: billing comes from the kernel's counters, and these records
    /// add Firecracker's own view (disk operations, device errors). The first read is one
    /// interval after the start, not during it. Ends with the run: a reboot's next run has a
    /// poll of its own.
    pub(super) fn poll_vmm_metrics(&self, vm: &VmId) {
        let meter = Arc::clone(&self.meter);
        let backend = Arc::clone(&self.backend);
        let vm = vm.clone();
        let Some(run) = meter.run_number(&vm) else {
            return;
        };
        tokio::spawn(async move {
            let period = meter.vmm_metrics_interval();
            let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                every.tick().await;
                if meter.run_number(&vm) != Some(run) {
                    return;
                }
                match backend.vmm_metrics(&vm, true).await {
                    Ok(Some(m)) => meter.add_vmm_metrics(&vm, m),
                    Ok(None) => {}
                    Err(BackendError::NotRunning(_)) => return,
                    Err(e) => {
                        tracing::debug!(vm_id = %vm, error = %Chain(&e), "VMM metrics flush failed")
                    }
                }
            }
        });
    }

    /// Takes the VM's last sample, saves its totals and queues its last usage for billing.
    /// The VMM is gone: the record it wrote as it exited (Firecracker does) is read first, so
    /// the run's last disk operations are in its totals.
    pub(super) async fn untrack_exited(&self, vm: &VmRecord) {
        match self.backend.vmm_metrics(&vm.id, false).await {
            Ok(Some(m)) => self.meter.add_vmm_metrics(&vm.id, m),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(vm_id = %vm.id, error = %Chain(&e), "reading the VMM's last metrics failed")
            }
        }
        self.untrack(vm);
    }

    /// Takes the VM's last sample, saves its totals and queues its last usage for billing.
    pub(super) fn untrack(&self, vm: &VmRecord) {
        let Some(total) = self.meter.stop(&vm.id) else {
            return;
        };
        if let Err(e) = self.store.save_usage(&vm.id, &total, None) {
            tracing::error!(vm_id = %vm.id, error = %Chain(&e), "saving usage failed");
        }
        if let Some(b) = self.billing.get() {
            b.vm_stopped(&vm.id, &vm.customer);
        }
    }

    /// Number of VMs in each state.
    pub fn vm_counts(&self) -> Vec<(VmState, u64)> {
        self.store.count_by_state().unwrap_or_else(|e| {
            tracing::error!(error = %Chain(&e), "counting VMs failed");
            Vec::new()
        })
    }

    /// Every metered VM's totals (for exporting).
    pub fn usage_snapshot(&self) -> Vec<(VmId, CustomerId, Counters)> {
        self.meter.snapshot()
    }

    /// Seconds the sampler spent sampling and its rounds.
    pub fn meter_cost(&self) -> (f64, u64) {
        self.meter.cost()
    }

    /// The metering interval.
    pub fn metering_interval(&self) -> Duration {
        self.meter.interval()
    }

    /// A VM's usage: totals and the samples after `since_ms`.
    pub async fn usage(
        &self,
        customer: &CustomerId,
        id: &VmId,
        since_ms: i64,
    ) -> Result<VmUsage, ServiceError> {
        let vm = self.load(customer, id).await?;
        if let Some(u) = self.meter.usage(id, since_ms) {
            return Ok(u);
        }
        // Not running: the lifetime totals of its finished runs, as saved when each ended.
        let mut carried = self
            .store
            .load_usage(id)?
            .map(|(carried, _)| carried)
            .unwrap_or_default();
        // A gauge: no VMM holds memory now.
        carried.memory_bytes = 0;
        Ok(VmUsage {
            total: carried,
            run: None,
            memory_configured: vm.config.memory_bytes,
            samples: Vec::new(),
            known_from_ms: None,
            vmm_metrics_raw: None,
        })
    }

    /// What each of the customer's VMs used in `(start_ms, end_ms]`, from the samples held.
    /// Where a VM's samples don't reach back to `start_ms` (they age out after the retention
    /// time, and a restarted metald starts a new series) its usage counts from its oldest
    /// sample, whose time comes back beside it.
    pub async fn customer_usage(
        &self,
        customer: &CustomerId,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<WindowUsage>, ServiceError> {
        if end_ms < start_ms {
            return Err(invalid("end", "must not be before start"));
        }
        let meter = &self.meter;
        let mut out = Vec::new();
        for id in meter.customer_vms(customer) {
            let Some(u) = meter.usage(&id, i64::MIN) else {
                continue;
            };
            let at = |t: i64| {
                u.samples
                    .iter()
                    .rev()
                    .find(|p| p.wall_ms <= t)
                    .map(|p| p.total)
            };
            let (before, covered_from_ms) = match (at(start_ms), u.known_from_ms) {
                (Some(p), _) => (p, None),
                // Before its first sample a new VM had used nothing.
                (None, None) => (Counters::default(), None),
                // Usage from before the oldest sample is not known by time: count from it.
                (None, Some(from)) => (
                    u.samples.first().map(|p| p.total).unwrap_or_default(),
                    Some(from),
                ),
            };
            let Some(after) = at(end_ms) else { continue };
            out.push(WindowUsage {
                vm: id,
                usage: after.since(&before),
                covered_from_ms,
            });
        }
        Ok(out)
    }
}
