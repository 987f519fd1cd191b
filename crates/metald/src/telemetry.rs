//! OpenTelemetry traces: every API call is a span (method, customer, VM) with child spans for
//! the lifecycle's steps (network and jail set-up, VMM start). A caller's W3C `traceparent`
//! header makes the call's span a child of the caller's.
//!
//! Trace and span ids exist whether or not they are exported, so JSON log lines always carry
//! them (`openTelemetry.traceId`/`spanId`) and a log line can be matched to its request. With
//! `UNKEY_METALD_OTEL_ENABLED` the spans are exported over OTLP/HTTP (JSON) through the SDK's
//! batch processor on its own thread; a collector that is down costs nothing but the lost
//! spans.

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

/// A tracer provider, exporting to `<endpoint>/v1/traces` when an endpoint is given (without
/// one, spans get ids but go nowhere); keep it alive, and shut it down at exit to flush.
pub fn tracer_provider(endpoint: Option<&str>) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("metald")
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(endpoint) = endpoint else {
        return Ok(builder.build());
    };
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
    Ok(builder.with_batch_exporter(exporter).build())
}

/// An id that ties an answer to metald's log lines: the current trace id (which every JSON log
/// line inside the API call carries), or a fresh random id outside a trace.
pub fn request_id() -> String {
    use opentelemetry::trace::{TraceContextExt, TraceId};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let trace = tracing::Span::current()
        .context()
        .span()
        .span_context()
        .trace_id();
    if trace == TraceId::INVALID {
        uuid::Uuid::new_v4().simple().to_string()
    } else {
        trace.to_string()
    }
}

/// The caller's trace context from a W3C `traceparent` header, if it sent one.
pub fn remote_parent(headers: &http::HeaderMap) -> Option<opentelemetry::Context> {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .extract(&opentelemetry_http::HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
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
