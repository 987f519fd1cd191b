//! Prometheus metrics on `GET /metrics` (OpenMetrics text), and request accounting.
//!
//! Label cardinality is bounded: request metrics are labelled by route template or Connect
//! procedure (never by id) and status code; per-VM usage carries `vm_id` and `customer`, so it
//! has one series per VM on this host (bounded by `UNKEY_METALD_JAILER_ID_COUNT`) and a VM's
//! series disappear when it is deleted.

use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::report::Chain;
use crate::service::VmService;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

/// The registry and the request metrics the middleware updates.
pub struct ApiMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<MethodLabel, Histogram>,
}

/// Values read from the service at scrape time (VM counts, usage, sampler cost).
struct ServiceCollector(Arc<VmService>);

impl std::fmt::Debug for ServiceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceCollector")
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Collector for ServiceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let svc = &self.0;
        {
            let mut m = encoder.encode_descriptor(
                "metald_vms",
                "VMs on this host by state",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in svc.vm_counts() {
                let l = labels(&[("state", state.as_str())]);
                ConstGauge::new(n as i64).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let (secs, ticks) = svc.meter_cost();
            let m = encoder.encode_descriptor(
                "metald_meter_busy_seconds",
                "Time the usage sampler spent sampling",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(secs).encode(m)?;
            let m = encoder.encode_descriptor(
                "metald_meter_ticks",
                "Sampling rounds over all running VMs",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(ticks).encode(m)?;
        }
        if let Some(depth) = svc.outbox_depth() {
            let m = encoder.encode_descriptor(
                "metald_billing_outbox_rows",
                "Usage batches and events waiting for the billing service",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(depth).unwrap_or(i64::MAX)).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "metald_spare_disks",
            "Spare disk copies ready for creates (UNKEY_METALD_WARM_DISKS per image)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(svc.spare_disks()).unwrap_or(i64::MAX)).encode(m)?;
        if let Some(pools) = svc.pools() {
            for (name, help, n) in [
                (
                    "metald_spare_networks",
                    "Spare VM networks ready for boots (UNKEY_METALD_WARM_POOL)",
                    pools.spare_networks,
                ),
                (
                    "metald_warm_jails",
                    "Jails started ahead and waiting for a VM (UNKEY_METALD_WARM_JAILS)",
                    pools.warm_jails,
                ),
            ] {
                let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(m)?;
            }
            let mut m = encoder.encode_descriptor(
                "metald_jail_starts",
                "VMMs started, by how their jail was made: warm (started ahead) or at_boot",
                None,
                MetricType::Counter,
            )?;
            for (kind, n) in [
                ("warm", pools.warm_jail_starts),
                ("at_boot", pools.cold_jail_starts),
            ] {
                ConstCounter::new(n).encode(m.encode_family(&labels(&[("kind", kind)]))?)?;
            }
        }
        let usage = svc.usage_snapshot();
        type Pick = fn(&crate::metering::Counters) -> u64;
        let counters: [(&str, &str, Pick); 9] = [
            (
                "metald_vm_cpu_nanoseconds",
                "CPU time of the VM's VMM",
                |c| c.cpu_ns,
            ),
            (
                "metald_vm_disk_read_bytes",
                "Bytes the VM read from disk",
                |c| c.disk_read_bytes,
            ),
            (
                "metald_vm_disk_write_bytes",
                "Bytes the VM wrote to disk",
                |c| c.disk_write_bytes,
            ),
            (
                "metald_vm_disk_read_ops",
                "Read requests the VM made to its disks",
                |c| c.disk_read_ops,
            ),
            (
                "metald_vm_disk_write_ops",
                "Write requests the VM made to its disks",
                |c| c.disk_write_ops,
            ),
            (
                "metald_vm_network_rx_bytes",
                "Bytes the guest received",
                |c| c.net_rx_bytes,
            ),
            ("metald_vm_network_tx_bytes", "Bytes the guest sent", |c| {
                c.net_tx_bytes
            }),
            (
                "metald_vm_network_rx_packets",
                "Packets the guest received",
                |c| c.net_rx_packets,
            ),
            (
                "metald_vm_network_tx_packets",
                "Packets the guest sent",
                |c| c.net_tx_packets,
            ),
        ];
        for (name, help, pick) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (vm, customer, c) in &usage {
                let l = labels(&[("vm_id", vm.as_str()), ("customer", customer.as_str())]);
                ConstCounter::new(pick(c)).encode(m.encode_family(&l)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "metald_vm_memory_bytes",
            "Memory the VM's VMM holds",
            None,
            MetricType::Gauge,
        )?;
        for (vm, customer, c) in &usage {
            let l = labels(&[("vm_id", vm.as_str()), ("customer", customer.as_str())]);
            ConstGauge::new(i64::try_from(c.memory_bytes).unwrap_or(i64::MAX))
                .encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

impl ApiMetrics {
    /// Metrics for `svc`.
    pub fn new(svc: Arc<VmService>) -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "metald_api_requests",
            "API requests by method (route or Connect procedure) and HTTP status",
            requests.clone(),
        );
        let latency = Family::<MethodLabel, Histogram>::new_with_constructor(|| {
            // 1 ms .. ~33 s: covers a CreateVm and a slow BootVm.
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "metald_api_request_duration_seconds",
            "API request latency by method; CreateVm and BootVm are the lifecycle durations",
            latency.clone(),
        );
        svc.timings().register(&mut registry);
        registry.register_collector(Box::new(ServiceCollector(svc)));
        Arc::new(Self {
            registry,
            requests,
            latency,
        })
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %Chain(&e), "encoding metrics failed");
        }
        out
    }
}

/// Counts every request and times it.
pub async fn track(State(m): State<Arc<ApiMetrics>>, req: Request, next: Next) -> Response {
    let method = match req.extensions().get::<MatchedPath>() {
        // `/v1/vms/{id}` is written `/v1/vms/:id`: braces in label values trip up some parsers.
        Some(p) => format!(
            "{} {}",
            req.method(),
            p.as_str().replace('{', ":").replace('}', "")
        ),
        None => match req.uri().path().strip_prefix(super::SERVICE_PATH) {
            Some(rpc) if super::RPCS.contains(&rpc) => req.uri().path().to_string(),
            _ => "other".to_string(),
        },
    };
    // One span per API call, named by its method, with who called (recorded by the auth
    // layer) and for which VM.
    let vm_id = req
        .uri()
        .path()
        .split('/')
        .find(|s| s.starts_with("vm-"))
        .unwrap_or("")
        .to_string();
    let span = tracing::info_span!(
        "api",
        otel.name = %method,
        rpc.method = %method,
        customer = tracing::field::Empty,
        vm_id = %vm_id,
        http.status_code = tracing::field::Empty,
    );
    if let Some(parent) = crate::telemetry::remote_parent(req.headers()) {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if let Err(e) = span.set_parent(parent) {
            tracing::debug!(error = %Chain(&e), "ignoring the caller's trace context");
        }
    }
    let t0 = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("http.status_code", resp.status().as_u16());
    m.latency
        .get_or_create(&MethodLabel {
            method: method.clone(),
        })
        .observe(t0.elapsed().as_secs_f64());
    m.requests
        .get_or_create(&RequestLabels {
            method,
            code: resp.status().as_u16().to_string(),
        })
        .inc();
    resp
}

/// Who may read `/metrics`: it names every customer's VMs and their usage, so operators only.
#[derive(Clone)]
pub enum MetricsAccess {
    /// Anyone who reaches the port (a dev-mode loopback API, or the separate metrics port,
    /// which the operator keeps off public networks).
    Open,
    /// Callers sending `Authorization: Bearer <UNKEY_METALD_METRICS_TOKEN>`; the SHA-256 of the
    /// token is kept, so a comparison reveals nothing about the token's bytes.
    Token([u8; 32]),
    /// Nobody on this port (jwt and mtls modes without a metrics token).
    Closed,
}

impl MetricsAccess {
    /// Access by `token`.
    pub fn token(token: &str) -> Self {
        Self::Token(digest(token))
    }
}

/// What a metrics token is compared as.
fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// What `GET /metrics` serves, and to whom.
#[derive(Clone)]
pub struct Scrape {
    /// The metrics.
    pub metrics: Arc<ApiMetrics>,
    /// Who may read them.
    pub access: MetricsAccess,
}

/// `GET /metrics`.
pub async fn serve(State(scrape): State<Scrape>, headers: http::HeaderMap) -> Response {
    match &scrape.access {
        MetricsAccess::Open => {}
        MetricsAccess::Closed => {
            return (
                http::StatusCode::NOT_FOUND,
                "/metrics is not served on the API port: set UNKEY_METALD_METRICS_TOKEN, or \
                 UNKEY_METALD_OTEL_PROMETHEUS_PORT for a port of its own\n",
            )
                .into_response()
        }
        MetricsAccess::Token(want) => {
            let sent = headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| digest(t.trim()));
            if sent.as_ref() != Some(want) {
                return (
                    http::StatusCode::UNAUTHORIZED,
                    "/metrics needs 'Authorization: Bearer <UNKEY_METALD_METRICS_TOKEN>'\n",
                )
                    .into_response();
            }
        }
    }
    let m = &scrape.metrics;
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}
