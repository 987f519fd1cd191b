//! The client this host calls its fleet peers with (forwarded calls, asset fetches): HTTP/2
//! or 1.1 over rustls on ring, presenting the host's own certificate and trusting only the
//! fleet's CA, rebuilt when the certificate files change.

use std::sync::Mutex;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::TlsSettings;
use crate::file_stamp::FileStamp;
use crate::listener::tls::{peer_client_config, stamps_of};

/// HTTP/2 (or 1.1) over rustls with this host's client certificate, sending `B` bodies.
pub type PeerHttp<B> = Client<hyper_rustls::HttpsConnector<HttpConnector>, B>;

/// Why this host cannot call its peers.
#[derive(Debug, thiserror::Error)]
pub enum PeerClientError {
    /// No certificate to present.
    #[error("this host has no TLS certificate to call its fleet peers with (UNKEY_METALD_TLS_*)")]
    NoTls,
    /// The certificate files do not make a client configuration.
    #[error("cannot build the client that calls fleet peers")]
    Tls(#[source] crate::listener::tls::TlsError),
}

/// The client this host calls its fleet peers with: its own certificate as the client
/// certificate, the client CA as the roots. Rebuilt when the certificate files change (SPIRE
/// rotates them); forwarding and asset fetches share how it is made.
pub struct PeerClient<B> {
    tls: Option<TlsSettings>,
    cached: Mutex<Option<Stamped<B>>>,
}

/// A client with the certificate files' stamps it was built from.
type Stamped<B> = (Vec<Option<FileStamp>>, PeerHttp<B>);

impl<B> PeerClient<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A client with the host's TLS files (none: every call is refused).
    pub fn new(tls: Option<TlsSettings>) -> Self {
        Self {
            tls,
            cached: Mutex::new(None),
        }
    }

    /// The client for the current certificate files.
    pub fn get(&self) -> Result<PeerHttp<B>, PeerClientError> {
        let tls = self.tls.as_ref().ok_or(PeerClientError::NoTls)?;
        let stamps = stamps_of(tls);
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, client)) = cached.as_ref() {
            if *seen == stamps {
                return Ok(client.clone());
            }
        }
        let config = peer_client_config(tls).map_err(PeerClientError::Tls)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        *cached = Some((stamps, client.clone()));
        Ok(client)
    }
}
