//! OpenTelemetry traces over OTLP/HTTP (JSON), when `UNKEY_METALD_OTEL_ENABLED` is set: every
//! API call is a span (method, customer, VM) with child spans for the lifecycle's steps
//! (network and jail set-up, VMM start). Spans go through the SDK's batch processor on its own
//! thread; a collector that is down costs nothing but the lost spans.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Errors setting up trace export.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter for {endpoint}: {reason}")]
pub struct TelemetryError {
    /// The collector's URL.
    pub endpoint: String,
    /// Why.
    pub reason: String,
}

/// A tracer provider exporting to `<endpoint>/v1/traces`; keep it alive, and shut it down at
/// exit to flush.
pub fn tracer_provider(endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(url)
        .build()
        .map_err(|e| TelemetryError {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("metald")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("metald"))
}
