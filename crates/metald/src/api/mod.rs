//! The API layer: decodes requests, authenticates the caller and maps results. It never
//! touches the OS; everything goes through [`crate::service::VmService`].

pub mod audit;
pub mod auth;
pub mod connect;
pub mod error;
pub mod forward;
pub mod handlers;
pub mod internal;
pub mod limits;
pub mod metrics;
pub mod rest;
pub mod strict;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use connectrpc::ConnectError;
use metald_proto::metald::v1::VmServiceExt;

use crate::service::VmService;

/// Largest request body accepted (VM configs are small).
const MAX_BODY: usize = 1 << 20;

/// Connect path of CreateVm, whose JSON bodies are checked strictly.
const CREATE_VM_PATH: &str = "/metald.v1.VmService/CreateVm";

/// Connect path prefix of `metald.v1.VmService`.
pub const SERVICE_PATH: &str = "/metald.v1.VmService/";

/// Every RPC of `metald.v1.VmService`: metrics label only these, so made-up paths cannot grow
/// the label set.
pub const RPCS: &[&str] = &[
    "CreateVm",
    "BootVm",
    "ShutdownVm",
    "PauseVm",
    "ResumeVm",
    "SuspendVm",
    "RebootVm",
    "DeleteVm",
    "GetVmInfo",
    "ListVms",
    "GetVmConsole",
    "GetVmUsage",
    "ListCustomerUsage",
    "GetHostCapacity",
    "GetFleet",
    "CreateSnapshot",
    "ListSnapshots",
    "DeleteSnapshot",
];

/// What the API needs besides the service.
pub struct ApiSettings {
    /// Checks credentials.
    pub auth: Arc<auth::Authenticator>,
    /// Request rates and deadline caps.
    pub limits: crate::config::RequestLimits,
    /// Whether `/metrics` has a port of its own.
    pub separate_metrics: bool,
    /// The operator token `/metrics` requires, if one is set.
    pub metrics_token: Option<crate::config::Secret>,
    /// How calls for VMs on other hosts of the fleet reach them.
    pub peers: Arc<forward::Peers>,
}

/// The HTTP surfaces: the API port's, and the metrics port's when `/metrics` has its own.
pub struct Routers {
    /// REST, Connect and gRPC behind auth, plus health checks (and `/metrics` when it has no
    /// port of its own).
    pub api: axum::Router,
    /// `/metrics` and the health checks, for a separate port; `None` when `/metrics` is on
    /// the API port.
    pub metrics: Option<axum::Router>,
}

/// Builds the routers; `separate_metrics` puts `/metrics` on a router of its own.
pub fn routers(svc: Arc<VmService>, settings: ApiSettings) -> Routers {
    let metrics = metrics::ApiMetrics::new(Arc::clone(&svc));
    let separate_metrics = settings.separate_metrics;
    // `/metrics` names every customer's VMs: an operator token, or a port of its own, or the
    // loopback-only dev mode.
    let access = match &settings.metrics_token {
        Some(t) => metrics::MetricsAccess::token(t.expose()),
        None if separate_metrics || settings.auth.is_dev() => metrics::MetricsAccess::Open,
        None => metrics::MetricsAccess::Closed,
    };
    let scrape = axum::routing::get(metrics::serve).with_state(metrics::Scrape {
        metrics: Arc::clone(&metrics),
        access,
    });
    let api = health(router(svc.clone(), metrics, settings), svc.clone());
    if separate_metrics {
        Routers {
            api,
            metrics: Some(health(axum::Router::new().route("/metrics", scrape), svc)),
        }
    } else {
        Routers {
            api: api.route("/metrics", scrape),
            metrics: None,
        }
    }
}

/// `/healthz` (liveness) and `/readyz` (readiness) on `r`.
fn health(r: axum::Router, svc: Arc<VmService>) -> axum::Router {
    r.route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || readyz(Arc::clone(&svc))),
        )
}

/// REST routes and Connect/gRPC as the fallback, all behind auth and the customer's rate,
/// every call counted and capped in time.
fn router(
    svc: Arc<VmService>,
    metrics: Arc<metrics::ApiMetrics>,
    settings: ApiSettings,
) -> axum::Router {
    let connect = Arc::new(connect::ConnectApi::new(
        Arc::clone(&svc),
        Arc::clone(&settings.peers),
    ))
    .register(connectrpc::Router::new());
    let max = settings.limits.max_deadline;
    rest::router(svc, Arc::clone(&settings.peers))
        .layer(axum::middleware::from_fn_with_state(
            max,
            limits::rest_deadline,
        ))
        .fallback_service(
            connect
                .into_axum_service()
                .with_deadline_policy(limits::deadline_policy(max)),
        )
        .layer(axum::middleware::from_fn(strict_connect_json))
        .layer(axum::middleware::from_fn_with_state(
            limits::RateLimiter::start(&settings.limits),
            limits::throttle,
        ))
        .layer(axum::middleware::from_fn_with_state(
            settings.auth,
            auth::layer,
        ))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            metrics::track,
        ))
}

/// Readiness: the store answers and the backend can start VMMs (503 with the reason if not).
async fn readyz(svc: Arc<VmService>) -> Response {
    match svc.ready() {
        Ok(()) => "ready".into_response(),
        Err(why) => (
            http::StatusCode::SERVICE_UNAVAILABLE,
            crate::report::chain(&why),
        )
            .into_response(),
    }
}

/// Applies the same unknown-field check as REST to Connect JSON CreateVm calls.
async fn strict_connect_json(req: Request, next: Next) -> Response {
    let is_json_create = req.uri().path() == CREATE_VM_PATH
        && req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
    if !is_json_create {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return ConnectError::resource_exhausted(format!("body: {e}")).into_response(),
    };
    if let Err(e) = strict::check(&bytes, strict::CREATE_VM_REQUEST) {
        return ConnectError::invalid_argument(e.to_string()).into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
