//! Billing delivery: usage reaches the billing service (`billing.v1.BillingService`) exactly
//! once in effect, through billing outages and metald crashes.
//!
//! Every batch interval the samples each VM gathered since its cursor become per-interval
//! usage (what was used within each sampling interval) and are written to the outbox in
//! SQLite, in the same transaction that moves the cursor. A sender delivers outbox rows oldest
//! first, each with a unique idempotency key, retrying with backoff while the service is down,
//! and deletes a row only once it is acknowledged. A VM metald re-adopted after a restart gets a
//! `NotifyPossibleGap` for the time it could not see, and that time's usage is billed as one
//! interval spanning the gap, marked `reconstructed`: the kernel kept counting while metald was
//! down, so the first sample after the restart less the last one queued before it is exactly
//! what the VM used meanwhile. Billed sums then equal metald's totals across any crash.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connectrpc::client::{ClientConfig, HttpClient};
use metald_proto::billing::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::domain::{now_ms, CustomerId, VmId};
use crate::metering::{Counters, Meter};
use crate::report::Chain;
use crate::store::{OutboxRow, StateStore, StoreError};

/// Billing settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingConfig {
    /// The billing service's base URL.
    pub endpoint: http::Uri,
    /// How often samples are batched into the outbox.
    pub batch_interval: Duration,
    /// How often the running VMs are reported (`SendHeartbeat`).
    pub heartbeat_interval: Duration,
    /// This metald's name in heartbeats.
    pub instance_id: String,
}

/// One interval's usage as queued (mirrors `billing.v1.VMMetrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntervalUsage {
    /// End of the interval, Unix milliseconds.
    pub timestamp: i64,
    /// Used within the interval.
    pub usage: Counters,
    /// The interval spans time metald did not sample (its own downtime); its usage is the
    /// difference of the kernel's counters across it. Rows queued before this field existed
    /// read as `false`.
    #[serde(default)]
    pub reconstructed: bool,
}

/// A queued message's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Payload {
    Metrics(Vec<IntervalUsage>),
    Started { at: i64 },
    Stopped { at: i64 },
    Gap { last_sent: i64, resume_time: i64 },
}

impl Payload {
    fn kind(&self) -> &'static str {
        match self {
            Payload::Metrics(_) => "metrics",
            Payload::Started { .. } => "started",
            Payload::Stopped { .. } => "stopped",
            Payload::Gap { .. } => "gap",
        }
    }
}

/// Batches usage into the outbox and delivers it.
pub struct Billing {
    store: Arc<dyn StateStore>,
    meter: Arc<Meter>,
    cfg: BillingConfig,
    /// VMs re-adopted after a restart whose next batch starts with a gap notice.
    resumed: Mutex<HashSet<VmId>>,
    /// Held from reading a VM's cursor to moving it: the periodic batcher and a stopping VM's
    /// last batch would otherwise both queue the samples after the same cursor.
    batching: Mutex<()>,
    wake: tokio::sync::Notify,
}

/// Per-interval usage from cumulative samples, starting after `prev`.
pub fn intervals(prev: &Counters, points: &[(i64, Counters)]) -> Vec<IntervalUsage> {
    let mut last = *prev;
    points
        .iter()
        .map(|(ms, total)| {
            let usage = total.since(&last);
            last = *total;
            IntervalUsage {
                timestamp: *ms,
                usage,
                reconstructed: false,
            }
        })
        .collect()
}

impl Billing {
    /// Starts batching and delivery.
    pub fn start(store: Arc<dyn StateStore>, meter: Arc<Meter>, cfg: BillingConfig) -> Arc<Self> {
        let b = Arc::new(Self {
            store,
            meter,
            cfg,
            resumed: Mutex::new(HashSet::new()),
            batching: Mutex::new(()),
            wake: tokio::sync::Notify::new(),
        });
        let batcher = Arc::downgrade(&b);
        tokio::spawn(async move {
            loop {
                let Some(b) = batcher.upgrade() else { return };
                let every = b.cfg.batch_interval;
                if let Err(e) = b.batch_all() {
                    tracing::error!(error = %Chain(&e), "batching usage failed");
                }
                b.wake.notify_one();
                drop(b);
                tokio::time::sleep(every).await;
            }
        });
        let sender = Arc::downgrade(&b);
        tokio::spawn(async move { send_loop(sender).await });
        let beat = Arc::downgrade(&b);
        tokio::spawn(async move {
            loop {
                let Some(every) = beat.upgrade().map(|b| b.cfg.heartbeat_interval) else {
                    return;
                };
                tokio::time::sleep(every).await;
                let Some(b) = beat.upgrade() else { return };
                b.heartbeat().await;
            }
        });
        b
    }

    fn client(&self) -> pb::BillingServiceClient<HttpClient> {
        pb::BillingServiceClient::new(
            HttpClient::plaintext(),
            ClientConfig::new(self.cfg.endpoint.clone()),
        )
    }

    /// A VMM run started.
    pub fn vm_started(&self, vm: &VmId, customer: &CustomerId) {
        self.enqueue(vm, customer, Payload::Started { at: now_ms() });
    }

    /// A VMM run ended; its last samples are queued first.
    pub fn vm_stopped(&self, vm: &VmId, customer: &CustomerId) {
        if let Err(e) = self.batch_vm(vm, customer) {
            tracing::error!(vm_id = %vm, error = %Chain(&e), "batching a stopped VM's usage failed");
        }
        self.enqueue(vm, customer, Payload::Stopped { at: now_ms() });
    }

    /// metald re-adopted the VM after a restart: what ran meanwhile was not sampled.
    pub fn resumed(&self, vm: &VmId) {
        self.resumed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.clone());
    }

    /// Rows waiting in the outbox.
    pub fn outbox_depth(&self) -> u64 {
        self.store.outbox_depth().unwrap_or(0)
    }

    fn enqueue(&self, vm: &VmId, customer: &CustomerId, payload: Payload) {
        let row = match row(
            vm,
            customer,
            &format!("{vm}:{}:{}", payload.kind(), now_ms()),
            &payload,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(vm_id = %vm, error = %Chain(&e), "queueing a billing event failed");
                return;
            }
        };
        if let Err(e) = self.store.enqueue_billing(&[row], None) {
            tracing::error!(vm_id = %vm, error = %Chain(&e), "queueing a billing event failed");
        }
        self.wake.notify_one();
    }

    fn batch_all(&self) -> Result<(), StoreError> {
        for (vm, customer, _) in self.meter.snapshot() {
            self.batch_vm(&vm, &customer)?;
        }
        Ok(())
    }

    /// Moves the VM's samples since its cursor into the outbox as one batch.
    fn batch_vm(&self, vm: &VmId, customer: &CustomerId) -> Result<(), StoreError> {
        let _one_batcher = self.batching.lock().unwrap_or_else(|p| p.into_inner());
        let cursor = self.store.billing_cursor(vm)?;
        let (last_ms, prev, seq) = cursor.unwrap_or((i64::MIN, Counters::default(), 0));
        let Some(u) = self.meter.usage(vm, last_ms) else {
            return Ok(());
        };
        let points: Vec<(i64, Counters)> = u.samples.iter().map(|p| (p.wall_ms, p.total)).collect();
        let mut rows = Vec::new();
        let gap = self
            .resumed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
        let resume_time = points.first().map(|&(ms, _)| ms);
        match resume_time {
            None if gap => {
                // No sample since the re-adoption yet: keep the mark for the next batch.
                self.resumed(vm);
                return Ok(());
            }
            Some(resume_time) if gap && cursor.is_some() => {
                // The hole is reported, and the first sample after the restart, which holds
                // the downtime's usage, ends the interval spanning it.
                let payload = Payload::Gap {
                    last_sent: last_ms,
                    resume_time,
                };
                rows.push(row(
                    vm,
                    customer,
                    &format!("{vm}:gap:{resume_time}"),
                    &payload,
                )?);
            }
            _ => {}
        }
        // Without a cursor nothing was ever sent for the VM: its first batch counts from
        // nothing, so its first interval holds everything before it (downtime included).
        let Some(&(end_ms, end_total)) = points.last() else {
            return Ok(());
        };
        let mut list = intervals(&prev, &points);
        if gap {
            if let Some(first) = list.first_mut() {
                first.reconstructed = true;
            }
        }
        let seq = seq + 1;
        let payload = Payload::Metrics(list);
        rows.push(row(vm, customer, &format!("{vm}:{seq}"), &payload)?);
        if !self
            .store
            .enqueue_billing(&rows, Some((vm, end_ms, &end_total, seq)))?
        {
            // Only another writer of this VM's cursor gets here (the lock above keeps this
            // metald's batchers apart): its batch holds these samples, so this one is dropped.
            tracing::warn!(vm_id = %vm, seq, "billing cursor moved meanwhile; batch not queued");
        }
        Ok(())
    }

    async fn heartbeat(&self) {
        // The VMs whose VMM is running now: what the billing service should expect usage for.
        let active: Vec<String> = self
            .meter
            .running()
            .into_iter()
            .map(|vm| vm.to_string())
            .collect();
        let req = pb::SendHeartbeatRequest {
            instance_id: self.cfg.instance_id.clone(),
            active_vms: active,
            ..Default::default()
        };
        if let Err(e) = self.client().send_heartbeat(req).await {
            tracing::debug!(error = %Chain(&e), "heartbeat to the billing service failed");
        }
    }

    /// Delivers one outbox row.
    async fn deliver(&self, r: &OutboxRow) -> Result<(), DeliveryError> {
        let payload: Payload =
            serde_json::from_str(&r.payload_json).map_err(DeliveryError::Payload)?;
        let client = self.client();
        let key = r.key.clone();
        let res = match payload {
            Payload::Metrics(list) => client
                .send_metrics_batch(pb::SendMetricsBatchRequest {
                    vm_id: r.vm_id.clone(),
                    customer_id: r.customer_id.clone(),
                    idempotency_key: key,
                    metrics: list
                        .iter()
                        .map(|m| pb::VMMetrics {
                            timestamp: m.timestamp,
                            cpu_time_nanos: m.usage.cpu_ns,
                            memory_usage_bytes: m.usage.memory_bytes,
                            disk_read_bytes: m.usage.disk_read_bytes,
                            disk_write_bytes: m.usage.disk_write_bytes,
                            network_rx_bytes: m.usage.net_rx_bytes,
                            network_tx_bytes: m.usage.net_tx_bytes,
                            reconstructed: m.reconstructed,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Payload::Started { at } => client
                .notify_vm_started(pb::NotifyVmStartedRequest {
                    vm_id: r.vm_id.clone(),
                    customer_id: r.customer_id.clone(),
                    start_time: at,
                    idempotency_key: key,
                    ..Default::default()
                })
                .await
                .map(drop),
            Payload::Stopped { at } => client
                .notify_vm_stopped(pb::NotifyVmStoppedRequest {
                    vm_id: r.vm_id.clone(),
                    stop_time: at,
                    idempotency_key: key,
                    ..Default::default()
                })
                .await
                .map(drop),
            Payload::Gap {
                last_sent,
                resume_time,
            } => client
                .notify_possible_gap(pb::NotifyPossibleGapRequest {
                    vm_id: r.vm_id.clone(),
                    last_sent,
                    resume_time,
                    idempotency_key: key,
                    ..Default::default()
                })
                .await
                .map(drop),
        };
        res.map_err(DeliveryError::Refused)
    }
}

/// Why an outbox row was not delivered (it stays, and is tried again).
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    /// The row's payload does not parse (written by another metald version).
    #[error("outbox payload")]
    Payload(#[source] serde_json::Error),
    /// The billing service did not take it.
    #[error("billing service")]
    Refused(#[source] connectrpc::ConnectError),
}

fn row(vm: &VmId, customer: &CustomerId, key: &str, p: &Payload) -> Result<OutboxRow, StoreError> {
    Ok(OutboxRow {
        key: key.to_string(),
        kind: p.kind().to_string(),
        vm_id: vm.to_string(),
        customer_id: customer.to_string(),
        payload_json: serde_json::to_string(p).map_err(|e| StoreError::Corrupt {
            id: key.to_string(),
            reason: e.to_string(),
        })?,
    })
}

/// Delivers the outbox oldest first; while the service fails, retries the same row with
/// exponential backoff (100 ms up to 5 s). Nothing is dropped.
async fn send_loop(billing: std::sync::Weak<Billing>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(b) = billing.upgrade() else { return };
        let rows = match b.store.outbox_peek(100) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %Chain(&e), "reading the billing outbox failed");
                Vec::new()
            }
        };
        if rows.is_empty() {
            // Holding the Arc for at most a second only delays shutdown by that much.
            let _ = tokio::time::timeout(Duration::from_secs(1), b.wake.notified()).await;
            continue;
        }
        let mut failed = false;
        for (id, r) in &rows {
            match b.deliver(r).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    if let Err(e) = b.store.outbox_delete(*id) {
                        tracing::error!(error = %Chain(&e), "removing a delivered outbox row failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(key = %r.key, error = %Chain(&e), retry_in_ms = backoff.as_millis() as u64, "billing service unreachable; keeping the batch");
                    failed = true;
                    break;
                }
            }
        }
        drop(b);
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::testing::{meter, run_start};
    use crate::state::VmState;

    fn kinds(store: &dyn StateStore) -> Vec<String> {
        store
            .outbox_peek(100)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.kind)
            .collect()
    }

    /// Billing over `store` and `meter` that never delivers: rows stay in the outbox for the
    /// test to read, and only the test batches.
    fn undelivered(store: &Arc<dyn StateStore>, meter: Arc<Meter>) -> Arc<Billing> {
        Billing::start(
            Arc::clone(store),
            meter,
            BillingConfig {
                // Nothing listens there.
                endpoint: "http://127.0.0.1:9".parse().unwrap(),
                batch_interval: Duration::from_secs(600),
                heartbeat_interval: Duration::from_secs(600),
                instance_id: "test".into(),
            },
        )
    }

    /// A SQLite store in a new directory (kept while the handle lives), holding one running VM.
    fn store_with_vm() -> (
        tempfile::TempDir,
        Arc<dyn StateStore>,
        crate::domain::VmRecord,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> =
            Arc::new(crate::store::Store::open(&dir.path().join("m.db")).unwrap());
        let vm = store
            .insert_vm(&crate::store::testing::record("c", VmState::Running), None)
            .unwrap();
        (dir, store, vm)
    }

    /// Every interval queued in the outbox, in order.
    fn queued_intervals(store: &dyn StateStore) -> Vec<IntervalUsage> {
        store
            .outbox_peek(u32::MAX)
            .unwrap()
            .into_iter()
            .filter_map(
                |(_, r)| match serde_json::from_str(&r.payload_json).unwrap() {
                    Payload::Metrics(list) => Some(list),
                    _ => None,
                },
            )
            .flatten()
            .collect()
    }

    /// A restarted metald re-adopts a VM and its batcher runs before the first sample: the gap
    /// is reported with the first sample that comes, not lost.
    #[tokio::test]
    async fn a_gap_waits_for_the_first_sample_after_a_restart() {
        let (_dir, store, vm) = store_with_vm();
        let cfg = |meter: Arc<Meter>| undelivered(&store, meter);
        // Before the restart: samples batched, so the VM has a cursor.
        let before = meter(Duration::from_millis(10), 100);
        before.track(&vm.id, run_start(Counters::default(), None));
        wait_for("a sample before the restart", || {
            before
                .usage(&vm.id, i64::MIN)
                .is_some_and(|u| !u.samples.is_empty())
        })
        .await;
        let b = cfg(Arc::clone(&before));
        b.batch_vm(&vm.id, &vm.customer).unwrap();
        assert!(store.billing_cursor(&vm.id).unwrap().is_some());
        drop(b);
        // After the restart: no sample yet when the batcher runs.
        let after = meter(Duration::from_secs(600), 100);
        // The sampler ticks once as it starts, then not for 600 s: let that tick pass first,
        // so that no sample exists when the batcher runs.
        wait_for("the new meter's first tick", || after.cost().1 >= 1).await;
        let b = cfg(Arc::clone(&after));
        after.track(
            &vm.id,
            run_start(Counters::default(), Some(Counters::default())),
        );
        // As the service does for a re-adopted VM: what was billed stays counted (this test
        // process's CPU counters differ in resolution, so they may read less than the clock did).
        let (_, billed_before, _) = store.billing_cursor(&vm.id).unwrap().unwrap();
        after.raise_to(&vm.id, &billed_before);
        b.resumed(&vm.id);
        b.batch_vm(&vm.id, &vm.customer).unwrap();
        assert!(!kinds(&*store).contains(&"gap".to_string()));
        // The first sample arrives (here: the run's last); now the hole is reported.
        after.stop(&vm.id);
        b.batch_vm(&vm.id, &vm.customer).unwrap();
        assert!(
            kinds(&*store).contains(&"gap".to_string()),
            "{:?}",
            kinds(&*store)
        );
        // The downtime's usage is billed, as one reconstructed interval ending when sampling
        // resumed: every interval queued adds up to the VM's total.
        let queued = queued_intervals(&*store);
        let total = after.usage(&vm.id, i64::MIN).unwrap().total;
        let billed: u64 = queued.iter().map(|i| i.usage.cpu_ns).sum();
        assert_eq!(billed, total.cpu_ns);
        let reconstructed: Vec<&IntervalUsage> =
            queued.iter().filter(|i| i.reconstructed).collect();
        assert_eq!(reconstructed.len(), 1, "{queued:?}");
        let (_, before_total, _) = store.billing_cursor(&vm.id).unwrap().unwrap();
        assert_eq!(before_total, total);
    }

    /// The periodic batcher and a stopping VM's last batch run at the same time: every sample
    /// is queued once (chaos found an instant billed twice when both read the same cursor).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_batchers_queue_each_sample_once() {
        let (_dir, store, vm) = store_with_vm();
        let meter = meter(Duration::from_millis(1), 100);
        meter.track(&vm.id, run_start(Counters::default(), None));
        let b = undelivered(&store, Arc::clone(&meter));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        b.batch_vm(&vm.id, &vm.customer).unwrap();
                    }
                });
            }
        });
        meter.stop(&vm.id);
        b.batch_vm(&vm.id, &vm.customer).unwrap();
        let queued = queued_intervals(&*store);
        let mut times: Vec<i64> = queued.iter().map(|i| i.timestamp).collect();
        times.sort_unstable();
        let n = times.len();
        times.dedup();
        assert_eq!(times.len(), n, "an instant was queued twice");
        let total = meter.usage(&vm.id, i64::MIN).unwrap().total;
        let billed: u64 = queued.iter().map(|i| i.usage.cpu_ns).sum();
        assert_eq!(billed, total.cpu_ns);
    }

    /// Waits for `done`, however slow the machine (a minute at most).
    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never came: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn intervals_are_differences_of_cumulative_samples() {
        let c = |cpu: u64, mem: u64| Counters {
            cpu_ns: cpu,
            memory_bytes: mem,
            ..Counters::default()
        };
        let got = intervals(
            &c(100, 0),
            &[(1, c(150, 7)), (2, c(150, 8)), (3, c(400, 9))],
        );
        let cpu: Vec<u64> = got.iter().map(|i| i.usage.cpu_ns).collect();
        assert_eq!(cpu, vec![50, 0, 250]);
        assert_eq!(
            got[2].usage.memory_bytes, 9,
            "memory is the reading, not a difference"
        );
        assert_eq!(got.iter().map(|i| i.usage.cpu_ns).sum::<u64>(), 400 - 100);
    }
}
