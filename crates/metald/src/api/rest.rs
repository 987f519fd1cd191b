//! REST routes over the same handlers: `/v1/vms...`, JSON in and out (protobuf JSON mapping,
//! so bodies look exactly like Connect JSON), errors as Connect error JSON with its HTTP status.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use connectrpc::ConnectError;
use metald_proto::metald::v1 as pb;
use serde::Deserialize;

use super::auth::Caller;
use super::forward::Peers;
use super::handlers as h;
use super::strict;
use crate::service::VmService;
use crate::state::VmState;

type Svc = State<Arc<VmService>>;

/// A REST result: protobuf JSON on success, Connect error JSON otherwise.
struct Reply(Result<(StatusCode, serde_json::Value), ConnectError>);

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        match self.0 {
            Ok((status, body)) => (status, Json(body)).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

fn ok<T: serde::Serialize>(status: StatusCode, msg: &T) -> Reply {
    Reply(
        serde_json::to_value(msg)
            .map(|v| (status, v))
            .map_err(|e| ConnectError::internal(format!("encoding response: {e}"))),
    )
}

fn done<T: serde::Serialize>(status: StatusCode, r: Result<T, ConnectError>) -> Reply {
    match r {
        Ok(msg) => ok(status, &msg),
        Err(e) => Reply(Err(e)),
    }
}

/// Decodes an optional JSON body strictly: unknown fields are errors, an empty body is defaults.
fn body<T: Default + serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ConnectError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ConnectError::invalid_argument(format!("body: malformed JSON: {e}")))
}

/// The routes, to be wrapped by the auth layer; calls for VMs on other hosts go to `peers`.
pub fn router(svc: Arc<VmService>, peers: Arc<Peers>) -> Router {
    Router::new()
        .route("/v1/vms", post(create).get(list))
        .route("/v1/vms/{id}", get(info).delete(delete))
        .route("/v1/vms/{id}/boot", post(boot))
        .route("/v1/vms/{id}/shutdown", post(shutdown))
        .route("/v1/vms/{id}/pause", post(pause))
        .route("/v1/vms/{id}/suspend", post(suspend))
        .route("/v1/vms/{id}/resume", post(resume))
        .route("/v1/vms/{id}/reboot", post(reboot))
        .route("/v1/vms/{id}/console", get(console))
        .route("/v1/vms/{id}/usage", get(usage))
        .route("/v1/vms/{id}/snapshots", post(create_snapshot))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{id}", axum::routing::delete(delete_snapshot))
        .route("/v1/usage", get(customer_usage))
        .route("/v1/host", get(host))
        .route("/v1/fleet", get(fleet))
        .route("/internal/v1/assets/{sha256}", get(super::internal::asset))
        .layer(Extension(peers))
        .with_state(svc)
}

async fn create(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    bytes: Bytes,
) -> Reply {
    let run = async {
        let who = caller.identity()?.clone();
        strict::check(&bytes, strict::CREATE_VM_REQUEST)
            .map_err(|e| ConnectError::invalid_argument(e.to_string()))?;
        let req: pb::CreateVmRequest = serde_json::from_slice(&bytes)
            .map_err(|e| ConnectError::invalid_argument(format!("body: {e}")))?;
        h::create_vm(&svc, &peers, &who, req).await
    };
    done(StatusCode::CREATED, run.await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    page_size: Option<u32>,
    page_token: Option<String>,
}

async fn list(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let run = async {
        let who = caller.identity()?.clone();
        let Query(q) = query
            .map_err(|e| ConnectError::invalid_argument(format!("query: {}", e.body_text())))?;
        let state = match q.state.as_deref() {
            None | Some("") => None,
            Some(s) => Some(parse_state(s)?),
        };
        h::list_vms(
            &svc,
            &who,
            state,
            q.page_size.unwrap_or(0),
            q.page_token.as_deref().unwrap_or(""),
        )
        .await
    };
    done(StatusCode::OK, run.await)
}

/// Accepts `RUNNING`, `running` or `VM_STATE_RUNNING`.
fn parse_state(s: &str) -> Result<VmState, ConnectError> {
    let upper = s.to_ascii_uppercase();
    VmState::parse(upper.strip_prefix("VM_STATE_").unwrap_or(&upper)).ok_or_else(|| {
        ConnectError::invalid_argument(format!(
            "state: '{}' is not one of CREATED, RUNNING, PAUSED, SHUTDOWN, FAILED",
            crate::domain::truncate_for_message(s)
        ))
    })
}

async fn info(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Reply {
    let run = async { h::get_vm(&svc, caller.identity()?, &id).await };
    done(StatusCode::OK, run.await.map(wrap_vm))
}

fn wrap_vm(vm: pb::VmInfo) -> pb::GetVmInfoResponse {
    pb::GetVmInfoResponse {
        vm: vm.into(),
        ..Default::default()
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ForceQuery {
    force: Option<bool>,
}

async fn delete(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
    query: Result<Query<ForceQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let run = async {
        let who = caller.identity()?.clone();
        let Query(q) = query
            .map_err(|e| ConnectError::invalid_argument(format!("query: {}", e.body_text())))?;
        h::delete_vm(&svc, &peers, &who, &id, q.force.unwrap_or(false)).await
    };
    done(
        StatusCode::OK,
        run.await.map(|()| pb::DeleteVmResponse::default()),
    )
}

async fn boot(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
) -> Reply {
    let run = async { h::boot_vm(&svc, &peers, caller.identity()?, &id).await };
    done(StatusCode::OK, run.await.map(wrap_vm))
}

async fn pause(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
) -> Reply {
    let run = async { h::pause_vm(&svc, &peers, caller.identity()?, &id).await };
    done(StatusCode::OK, run.await.map(wrap_vm))
}

async fn suspend(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
) -> Reply {
    let run = async { h::suspend_vm(&svc, &peers, caller.identity()?, &id).await };
    done(StatusCode::OK, run.await.map(wrap_vm))
}

async fn create_snapshot(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
) -> Reply {
    let run = async { h::create_snapshot(&svc, &peers, caller.identity()?, &id).await };
    done(StatusCode::CREATED, run.await)
}

async fn list_snapshots(State(svc): Svc, Extension(caller): Extension<Caller>) -> Reply {
    let run = async { h::list_snapshots(&svc, caller.identity()?).await };
    done(StatusCode::OK, run.await)
}

async fn delete_snapshot(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
) -> Reply {
    let run = async { h::delete_snapshot(&svc, &peers, caller.identity()?, &id).await };
    done(
        StatusCode::OK,
        run.await.map(|()| pb::DeleteSnapshotResponse::default()),
    )
}

async fn resume(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
) -> Reply {
    let run = async { h::resume_vm(&svc, &peers, caller.identity()?, &id).await };
    done(StatusCode::OK, run.await.map(wrap_vm))
}

/// Body of `POST /v1/vms/{id}/shutdown` (optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
struct ShutdownBody {
    #[serde(default)]
    force: bool,
    #[serde(default, alias = "timeoutSeconds")]
    timeout_seconds: u32,
}

async fn shutdown(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Reply {
    let run = async {
        let who = caller.identity()?.clone();
        let b: ShutdownBody = body(&bytes)?;
        h::shutdown_vm(&svc, &peers, &who, &id, b.force, b.timeout_seconds).await
    };
    done(StatusCode::OK, run.await.map(wrap_vm))
}

/// Body of `POST /v1/vms/{id}/reboot` (optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RebootBody {
    #[serde(default)]
    force: bool,
}

async fn reboot(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Reply {
    let run = async {
        let who = caller.identity()?.clone();
        let b: RebootBody = body(&bytes)?;
        h::reboot_vm(&svc, &peers, &who, &id, b.force).await
    };
    done(StatusCode::OK, run.await.map(wrap_vm))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    tail_bytes: Option<u32>,
}

async fn console(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
    query: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let run = async {
        let who = caller.identity()?.clone();
        let Query(q) = query
            .map_err(|e| ConnectError::invalid_argument(format!("query: {}", e.body_text())))?;
        h::get_console(&svc, &peers, &who, &id, q.tail_bytes.unwrap_or(0)).await
    };
    done(StatusCode::OK, run.await)
}

#[derive(serde::Deserialize)]
struct UsageQuery {
    since: Option<String>,
}

async fn usage(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    Path(id): Path<String>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let run = async {
        let who = caller.identity()?.clone();
        let Query(q) = query
            .map_err(|e| ConnectError::invalid_argument(format!("query: {}", e.body_text())))?;
        h::get_usage(&svc, &peers, &who, &id, q.since.as_deref().unwrap_or("")).await
    };
    done(StatusCode::OK, run.await)
}

#[derive(serde::Deserialize)]
struct WindowQuery {
    start: Option<String>,
    end: Option<String>,
}

async fn customer_usage(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Extension(peers): Extension<Arc<Peers>>,
    query: Result<Query<WindowQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let run = async {
        let who = caller.identity()?.clone();
        let Query(q) = query
            .map_err(|e| ConnectError::invalid_argument(format!("query: {}", e.body_text())))?;
        h::list_customer_usage(
            &svc,
            &peers,
            &who,
            q.start.as_deref().unwrap_or(""),
            q.end.as_deref().unwrap_or(""),
        )
        .await
    };
    done(StatusCode::OK, run.await)
}

async fn fleet(State(svc): Svc, Extension(caller): Extension<Caller>) -> Reply {
    let run = async {
        // Names every host and its VM count: host:read only, as /v1/host.
        caller.customer()?;
        h::fleet(&svc).await
    };
    done(StatusCode::OK, run.await)
}

async fn host(State(svc): Svc, Extension(caller): Extension<Caller>) -> Reply {
    let run = async {
        // The answer sums every customer's use, so api::auth admits only callers holding
        // host:read (operator tokens, trusted services, dev tokens).
        caller.customer()?;
        h::host_capacity(&svc).await
    };
    done(StatusCode::OK, run.await)
}
