//! TLS for the API port (rustls with the ring provider): the server certificate, and with a
//! client CA, required and verified client certificates. The files are watched and reloaded
//! when they change (SPIRE rotates short-lived SVIDs on disk): new connections get the new
//! configuration, open ones keep the session they have.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsSettings;
use crate::file_stamp::FileStamp;

/// How often the files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Config(#[from] rustls::Error),
    /// The client CA set could not make a verifier.
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The server's TLS configuration, swapped whole when its files change.
pub struct ReloadingTls {
    current: ArcSwap<ServerConfig>,
    settings: TlsSettings,
}

impl ReloadingTls {
    /// Loads the files; errors name the file.
    pub fn load(settings: TlsSettings) -> Result<Arc<Self>, TlsError> {
        let config = build(&settings)?;
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(config),
            settings,
        }))
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// Checks the files every second and reloads them when one changed. A bad new set is
    /// logged and the old configuration kept; it is tried again when a file changes again.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let mut seen = self.stamps();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                let now = me.stamps();
                if now == seen {
                    continue;
                }
                seen = now;
                match build(&me.settings) {
                    Ok(c) => {
                        me.current.store(Arc::new(c));
                        tracing::info!(cert = %me.settings.cert_file.display(), "TLS certificate files reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %crate::report::Chain(&e), "TLS files changed but do not load; keeping the previous ones")
                    }
                }
            }
        })
    }

    /// Each file's [`FileStamp`] (`None` while one is missing).
    fn stamps(&self) -> Vec<Option<FileStamp>> {
        stamps_of(&self.settings)
    }
}

fn pem_err(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The whole server configuration from the files.
fn build(s: &TlsSettings) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&s.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&s.key_file).map_err(|e| pem_err(&s.key_file, e))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &s.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| pem_err(ca, e))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The configuration this host calls its fleet peers with: its own certificate as the client
/// certificate, and the client CA (the fleet's) as the only roots a peer's server certificate
/// may chain to.
pub fn peer_client_config(s: &TlsSettings) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = s.client_ca_file.as_ref().ok_or_else(|| {
        pem_err(
            &s.cert_file,
            "fleet peers are called with mTLS: UNKEY_METALD_TLS_CLIENT_CA_FILE is needed",
        )
    })?;
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| pem_err(ca, e))?;
    }
    let chain = certs(&s.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&s.key_file).map_err(|e| pem_err(&s.key_file, e))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    // ALPN is the connector's to set (it offers what it speaks).
    Ok(config)
}

/// A client configuration that trusts only the CA certificates in `ca` (the database's).
pub fn client_trusting(ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| pem_err(ca, e))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The files' stamps, to tell when a configuration built from them is stale.
pub fn stamps_of(s: &TlsSettings) -> Vec<Option<FileStamp>> {
    [
        Some(&s.cert_file),
        Some(&s.key_file),
        s.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| FileStamp::of(p).ok())
    .collect()
}

/// The SPIFFE ID of a DER certificate: its one `spiffe://` URI SAN (the SPIFFE X.509-SVID
/// rule; a certificate with several is not an SVID).
pub fn spiffe_id_of(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let id = ids.next()?;
    if ids.next().is_some() {
        return None;
    }
    crate::api::auth::spiffe_id(id).map(str::to_string)
}
