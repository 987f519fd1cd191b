//! Routes only fleet peers call (`/internal/...`, the `fleet:peer` scope, which only a trusted
//! service's client certificate holds): a host's file of an asset, by its sha256, for a peer
//! that lacks it. The peer verifies what it gets against the shared catalog.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use connectrpc::ConnectError;

use super::auth::Caller;
use crate::service::VmService;

/// `GET /internal/v1/assets/{sha256}`: this host's file of that content, streamed; 404 if it
/// has none.
pub async fn asset(
    State(svc): State<Arc<VmService>>,
    Extension(caller): Extension<Caller>,
    Path(sha256): Path<String>,
) -> Response {
    if let Err(e) = caller.identity() {
        return e.into_response();
    }
    let hex = sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return ConnectError::invalid_argument("expected a sha256 in lower-case hex")
            .into_response();
    }
    match svc.local_asset(&sha256).await {
        Ok(Some((file, size))) => (
            [
                (
                    http::header::CONTENT_TYPE,
                    "application/octet-stream".to_string(),
                ),
                (http::header::CONTENT_LENGTH, size.to_string()),
            ],
            Body::from_stream(tokio_util::io::ReaderStream::new(file)),
        )
            .into_response(),
        Ok(None) => {
            ConnectError::not_found("this host has no file of that content").into_response()
        }
        Err(e) => super::error::to_connect(&e).into_response(),
    }
}
