//! Where this host gets an image file it lacks: the operator's directory
//! (`UNKEY_METALD_ASSET_SOURCE`), then the fleet's UP peers, each asked in turn over mTLS
//! (`GET /internal/v1/assets/{sha256}`) with the client that forwards calls. The store caps and
//! verifies what they send ([`crate::assets::AssetStore::ensure_local`]).

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use hyper::body::Incoming;
use tokio::runtime::Handle;

use crate::api::auth::{CUSTOMER_HEADER, FORWARDED_HEADER};
use crate::assets::{AssetError, AssetSource, DirSource, Fetched};
use crate::config::{FleetSettings, TlsSettings};
use crate::fleet::{HostId, HostRecord, HostStatus};
use crate::membership::Membership;
use crate::peer_client::{PeerClient, PeerHttp};
use crate::report::Chain;
use crate::store::AssetRecord;

/// Path of a peer's asset route, before the sha256.
pub const ASSETS_PATH: &str = "/internal/v1/assets/";

/// The customer a peer names when it asks for an asset: the route serves no customer's data
/// by customer, but a trusted service must name one to be recognised as such.
pub const PEER_CUSTOMER: &str = "metald-fleet";

/// Why a peer did not send an asset.
#[derive(Debug, thiserror::Error)]
pub enum PeerFetchError {
    /// The peer's URL does not parse.
    #[error("host {host} advertises a URL that does not parse")]
    Url {
        /// The peer.
        host: HostId,
    },
    /// The request could not be made or answered.
    #[error("host {host} cannot be reached")]
    Transport {
        /// The peer.
        host: HostId,
        /// What failed.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The peer answered with an error.
    #[error("host {host} answered {status}")]
    Status {
        /// The peer.
        host: HostId,
        /// Its HTTP status.
        status: http::StatusCode,
    },
}

/// The sources of `settings`, in the order they are tried: the directory, then (in a fleet
/// with a shared database) the peers.
pub fn sources(
    settings: &FleetSettings,
    tls: Option<TlsSettings>,
    membership: Arc<Membership>,
) -> Vec<Arc<dyn AssetSource>> {
    let mut sources: Vec<Arc<dyn AssetSource>> = Vec::new();
    if let Some(dir) = &settings.asset_source {
        sources.push(Arc::new(DirSource::new(dir.clone())));
    }
    if settings.database_url.is_some() {
        sources.push(Arc::new(PeerAssets::new(
            membership,
            PeerClient::new(tls),
            Handle::current(),
        )));
    }
    sources
}

/// The fleet's UP peers, asked one after the other.
pub struct PeerAssets {
    membership: Arc<Membership>,
    http: PeerClient<Body>,
    runtime: Handle,
}

impl PeerAssets {
    /// Peers of the host `membership` is for, called with `http` on `runtime`.
    /// [`AssetSource::open`] blocks on `runtime`: call it from a blocking thread.
    pub fn new(membership: Arc<Membership>, http: PeerClient<Body>, runtime: Handle) -> Self {
        Self {
            membership,
            http,
            runtime,
        }
    }

    fn source_error(&self, e: impl std::error::Error + Send + Sync + 'static) -> AssetError {
        AssetError::Source {
            from: self.name(),
            source: Box::new(e),
        }
    }
}

impl AssetSource for PeerAssets {
    fn name(&self) -> String {
        "fleet peers".into()
    }

    fn open(&self, record: &AssetRecord, deadline: Instant) -> Result<Option<Fetched>, AssetError> {
        let me = self.membership.host_id();
        let peers: Vec<HostRecord> = self
            .membership
            .hosts()
            .map_err(|e| self.source_error(e))?
            .into_iter()
            .filter(|h| h.status == HostStatus::Up && h.registration.id != me)
            .collect();
        if peers.is_empty() {
            return Ok(None);
        }
        let client = self.http.get().map_err(|e| self.source_error(e))?;
        let until = tokio::time::Instant::from_std(deadline);
        let mut failed = None;
        for peer in &peers {
            let host = peer.registration.id.clone();
            let asked = self.runtime.block_on(tokio::time::timeout_at(
                until,
                ask(&client, peer, &me, &record.sha256),
            ));
            match asked {
                Ok(Ok(Some(body))) => {
                    tracing::info!(image_id = %record.id, %host, "fetching an image from a peer");
                    return Ok(Some(Fetched {
                        from: format!("peer {host}"),
                        content: Box::new(BodyReader {
                            body,
                            runtime: self.runtime.clone(),
                            until,
                            pending: Bytes::new(),
                        }),
                    }));
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(image_id = %record.id, error = %Chain(&e), "a peer did not send an image");
                    failed.get_or_insert(e);
                }
                Err(_elapsed) => {
                    return Err(AssetError::TimedOut {
                        id: record.id.clone(),
                        from: format!("peer {host}"),
                    })
                }
            }
        }
        match failed {
            Some(e) => Err(self.source_error(e)),
            None => Ok(None),
        }
    }
}

/// Asks `peer` for the content `sha256`: its body if it has it, `None` if it has not.
async fn ask(
    client: &PeerHttp<Body>,
    peer: &HostRecord,
    me: &HostId,
    sha256: &str,
) -> Result<Option<Incoming>, PeerFetchError> {
    let host = peer.registration.id.clone();
    let url = format!(
        "{}{ASSETS_PATH}{sha256}",
        peer.registration.advertise_url.trim_end_matches('/')
    );
    let req = http::Request::get(url)
        .header(CUSTOMER_HEADER, PEER_CUSTOMER)
        .header(FORWARDED_HEADER, me.as_str())
        .body(Body::empty())
        .map_err(|_| PeerFetchError::Url { host: host.clone() })?;
    let resp = client
        .request(req)
        .await
        .map_err(|source| PeerFetchError::Transport {
            host: host.clone(),
            source,
        })?;
    match resp.status() {
        http::StatusCode::OK => Ok(Some(resp.into_body())),
        http::StatusCode::NOT_FOUND => Ok(None),
        status => Err(PeerFetchError::Status { host, status }),
    }
}

/// A peer's answer read as a [`Read`], each frame awaited on the runtime until the deadline.
struct BodyReader {
    body: Incoming,
    runtime: Handle,
    until: tokio::time::Instant,
    pending: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use hyper::body::Body as _;
        while self.pending.is_empty() {
            let body = &mut self.body;
            let next = self.runtime.block_on(tokio::time::timeout_at(
                self.until,
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut *body).poll_frame(cx)),
            ));
            match next {
                Err(_elapsed) => return Err(io::ErrorKind::TimedOut.into()),
                Ok(None) => return Ok(0),
                Ok(Some(Err(e))) => return Err(io::Error::other(e)),
                // Trailers carry no content.
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending = data;
                    }
                }
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending.split_to(n));
        Ok(n)
    }
}
