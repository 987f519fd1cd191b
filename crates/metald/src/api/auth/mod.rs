//! Who is calling, and what they may do. The auth layer decides once per request and records a
//! [`Caller`] in the request's extensions, so Connect, gRPC and REST share one decision and each
//! reports a refusal in its own encoding.
//!
//! Credentials, by `UNKEY_METALD_AUTH_MODE`:
//! - `dev`: `Bearer dev_customer_<id>` (loopback only; see [`dev`]);
//! - `jwt`: a bearer JWT verified against a JWKS (see [`jwt`]);
//! - `mtls`: no bearer tokens; only trusted services.
//!
//! In every mode, a client whose certificate's SPIFFE ID is listed as trusted may act for the
//! customer named in the `metald-customer` header (the control-plane pattern).

pub mod dev;
pub mod jwt;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use connectrpc::ConnectError;
use http::{HeaderMap, Method};

use crate::config::{AuthMode, AuthSettings};
use crate::domain::CustomerId;

/// Header a trusted service names the customer it acts for in.
pub const CUSTOMER_HEADER: &str = "metald-customer";

/// Header a fleet peer names itself in when it forwards a call to the VM's host; honoured
/// with [`CUSTOMER_HEADER`] only. A forwarded call is never forwarded again.
pub const FORWARDED_HEADER: &str = "metald-forwarded-by";

/// What a call needs the caller to be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Get, List, console and usage of the caller's own VMs.
    VmsRead,
    /// Everything that changes a VM.
    VmsWrite,
    /// The host's capacity (operators and the control plane).
    HostRead,
    /// What only fleet peers ask for (`/internal/...`: an asset's file). No token grants it:
    /// only a trusted service's client certificate.
    FleetPeer,
}

/// Path prefix of the routes only fleet peers may call.
pub const INTERNAL_PREFIX: &str = "/internal/";

impl Scope {
    /// The scope's name in a token's `scope` claim.
    pub fn name(self) -> &'static str {
        match self {
            Scope::VmsRead => "vms:read",
            Scope::VmsWrite => "vms:write",
            Scope::HostRead => "host:read",
            Scope::FleetPeer => "fleet:peer",
        }
    }
}

/// The scopes a caller holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes {
    read: bool,
    write: bool,
    host: bool,
    peer: bool,
}

impl Scopes {
    /// Every scope a token can grant: dev tokens.
    pub const ALL: Scopes = Scopes {
        read: true,
        write: true,
        host: true,
        peer: false,
    };

    /// Every scope: trusted services (fleet peers among them).
    pub const TRUSTED: Scopes = Scopes {
        read: true,
        write: true,
        host: true,
        peer: true,
    };

    /// The scopes named in a space-separated `scope` claim; unknown names are ignored.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut s = Scopes::default();
        for n in names {
            match n {
                "vms:read" => s.read = true,
                "vms:write" => s.write = true,
                "host:read" => s.host = true,
                _ => {}
            }
        }
        s
    }

    /// Whether `scope` is held.
    pub fn allows(self, scope: Scope) -> bool {
        match scope {
            Scope::VmsRead => self.read,
            Scope::VmsWrite => self.write,
            Scope::HostRead => self.host,
            Scope::FleetPeer => self.peer,
        }
    }
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The customer every call runs as.
    pub customer: CustomerId,
    /// The token's `sub`, if a JWT was presented.
    pub subject: Option<String>,
    /// The client certificate's SPIFFE ID, if any.
    pub service: Option<Arc<str>>,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// Holds `host:read`: may see host details (VMM pids, namespace files, interfaces).
    pub operator: bool,
    /// A fleet peer forwarded the call (trusted services only): it runs here or nowhere.
    pub forwarded: bool,
}

/// What authentication concluded for one request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A verified customer holding the scope the call needs.
    Verified(Arc<Identity>),
    /// No usable credentials (401); the reason is short and about the caller's own request.
    Rejected(String),
    /// Verified, but without the scope the call needs (403).
    Forbidden(String),
    /// Over the customer's request rate (429); the message carries the retry hint.
    Throttled(String),
}

impl Caller {
    /// The verified identity, or the refusal in Connect terms.
    pub fn identity(&self) -> Result<&Arc<Identity>, ConnectError> {
        match self {
            Caller::Verified(id) => Ok(id),
            Caller::Rejected(msg) => Err(ConnectError::unauthenticated(msg.clone())),
            Caller::Forbidden(msg) => Err(ConnectError::permission_denied(msg.clone())),
            Caller::Throttled(msg) => Err(ConnectError::resource_exhausted(msg.clone())),
        }
    }

    /// The customer, or the refusal.
    pub fn customer(&self) -> Result<&CustomerId, ConnectError> {
        self.identity().map(|id| &id.customer)
    }
}

/// The connection a request arrived on, recorded by the listener.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The SPIFFE ID of a verified client certificate.
    pub service: Option<Arc<str>>,
}

/// The SPIFFE ID `uri` if it is one (`spiffe://<trust domain>/<path>`, lower-case domain).
pub fn spiffe_id(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    let path_ok = path.is_empty()
        || path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
    (domain_ok && path_ok && uri.len() <= 2048).then_some(uri)
}

/// The scope a request needs, from its route.
pub fn required_scope(method: &Method, path: &str) -> Scope {
    if let Some(rpc) = path.strip_prefix("/metald.v1.VmService/") {
        return match rpc {
            "GetVmInfo" | "ListVms" | "GetVmConsole" | "GetVmUsage" | "ListCustomerUsage" => {
                Scope::VmsRead
            }
            "GetHostCapacity" | "GetFleet" => Scope::HostRead,
            _ => Scope::VmsWrite,
        };
    }
    if path.starts_with(INTERNAL_PREFIX) {
        Scope::FleetPeer
    } else if path == "/v1/host" || path == "/v1/fleet" {
        Scope::HostRead
    } else if method == Method::GET || method == Method::HEAD {
        Scope::VmsRead
    } else {
        Scope::VmsWrite
    }
}

/// Errors setting authentication up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The JWT keys could not be loaded.
    #[error("JWT keys")]
    Jwks(#[from] jwt::JwksError),
}

/// Checks credentials according to the configured mode.
pub struct Authenticator {
    mode: Mode,
    trusted: HashSet<String>,
    services_need_token: bool,
}

enum Mode {
    Dev,
    Jwt(Box<jwt::JwtVerifier>),
    Mtls,
}

impl Authenticator {
    /// Builds the authenticator; in `jwt` mode this loads the JWKS (file, then URL).
    pub async fn new(settings: &AuthSettings) -> Result<Self, AuthError> {
        let mode = match &settings.mode {
            AuthMode::Dev => Mode::Dev,
            AuthMode::Jwt(j) => Mode::Jwt(Box::new(jwt::JwtVerifier::start(j.clone()).await?)),
            AuthMode::Mtls => Mode::Mtls,
        };
        Ok(Self {
            mode,
            trusted: settings.trusted_services.iter().cloned().collect(),
            services_need_token: settings.services_need_token,
        })
    }

    /// Dev tokens, no trusted services, without the async set-up (tests).
    #[cfg(test)]
    pub(crate) fn dev() -> Self {
        Self {
            mode: Mode::Dev,
            trusted: HashSet::new(),
            services_need_token: false,
        }
    }

    /// Dev tokens, and `service` as the one trusted service (tests).
    #[cfg(test)]
    pub(crate) fn dev_trusting(service: &str) -> Self {
        Self {
            trusted: [service.to_string()].into(),
            ..Self::dev()
        }
    }

    /// Whether this is the loopback-only dev mode.
    pub fn is_dev(&self) -> bool {
        matches!(self.mode, Mode::Dev)
    }

    /// Who the request is from, and the scopes they hold; `Err` is the 401 reason.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<&Peer>,
    ) -> Result<(Identity, Scopes), String> {
        let token = match bearer(headers) {
            Ok(t) => t,
            Err(why) if matches!(self.mode, Mode::Dev) => {
                return Err(format!("{why}; {}", dev::EXPECTED))
            }
            Err(why) => return Err(why),
        };
        let service = peer.and_then(|p| p.service.clone());
        let acting_for = match headers.get(CUSTOMER_HEADER) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<CustomerId>().ok())
                    .ok_or_else(|| format!("{CUSTOMER_HEADER}: not a customer id"))?,
            ),
        };
        let acting_for_checked = acting_for.is_some();
        let (customer, subject, scopes) = match acting_for {
            Some(customer) => {
                let trusted = service.as_deref().is_some_and(|s| self.trusted.contains(s));
                if !trusted {
                    return Err(format!(
                        "{CUSTOMER_HEADER} is honoured only from a trusted service's client certificate"
                    ));
                }
                match &self.mode {
                    Mode::Jwt(verifier) if self.services_need_token => {
                        let claims = verify(verifier, token).await?;
                        if claims.customer != customer {
                            return Err(format!(
                                "the token is for another customer than {CUSTOMER_HEADER}"
                            ));
                        }
                        (customer, claims.subject, claims.scopes)
                    }
                    _ => (customer, None, Scopes::TRUSTED),
                }
            }
            None => match &self.mode {
                Mode::Dev => (dev::customer(token)?, None, Scopes::ALL),
                Mode::Jwt(verifier) => {
                    let claims = verify(verifier, token).await?;
                    (claims.customer, claims.subject, claims.scopes)
                }
                Mode::Mtls => {
                    return Err(format!(
                        "this server accepts trusted services' client certificates with a {CUSTOMER_HEADER} header only"
                    ))
                }
            },
        };
        // Only a trusted service may say it forwards: acting_for was checked against the list.
        let forwarded = acting_for_checked && headers.contains_key(FORWARDED_HEADER);
        Ok((
            Identity {
                customer,
                subject,
                service,
                peer: peer.map(|p| p.addr),
                operator: scopes.allows(Scope::HostRead),
                forwarded,
            },
            scopes,
        ))
    }
}

/// Verifies a bearer JWT; the error is the 401 reason.
async fn verify(verifier: &jwt::JwtVerifier, token: Option<&str>) -> Result<jwt::Claims, String> {
    let token = token.ok_or("missing Authorization bearer token")?;
    verifier.verify(token).await.map_err(|e| e.to_string())
}

/// The bearer token, if an Authorization header is present; `Err` when it is not a bearer token.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, String> {
    let Some(raw) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = raw
        .to_str()
        .map_err(|_| "Authorization header is not text".to_string())?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| "Authorization is not a Bearer token".to_string())?;
    Ok(Some(token.trim()))
}

/// Middleware that records the [`Caller`] on every request. It never rejects by itself: each
/// protocol reports the refusal in its own encoding (HTTP 401/403, Connect JSON, gRPC status).
pub async fn layer(
    State(auth): State<Arc<Authenticator>>,
    mut req: Request,
    next: Next,
) -> Response {
    let needed = required_scope(req.method(), req.uri().path());
    let peer = req.extensions().get::<Peer>().cloned();
    let caller = match auth.authenticate(req.headers(), peer.as_ref()).await {
        Ok((identity, scopes)) if scopes.allows(needed) => {
            tracing::Span::current()
                .record("customer", tracing::field::display(&identity.customer));
            Caller::Verified(Arc::new(identity))
        }
        Ok(_) => Caller::Forbidden(format!("the credentials lack the {} scope", needed.name())),
        Err(why) => Caller::Rejected(why),
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_scope_of_what_they_do() {
        let cases = [
            (
                Method::POST,
                "/metald.v1.VmService/GetVmInfo",
                Scope::VmsRead,
            ),
            (
                Method::POST,
                "/metald.v1.VmService/ListCustomerUsage",
                Scope::VmsRead,
            ),
            (Method::POST, "/metald.v1.VmService/BootVm", Scope::VmsWrite),
            (
                Method::POST,
                "/metald.v1.VmService/NoSuchRpc",
                Scope::VmsWrite,
            ),
            (
                Method::POST,
                "/metald.v1.VmService/GetHostCapacity",
                Scope::HostRead,
            ),
            (Method::GET, "/v1/vms/x/console", Scope::VmsRead),
            (Method::GET, "/v1/host", Scope::HostRead),
            (Method::GET, "/v1/fleet", Scope::HostRead),
            (
                Method::POST,
                "/metald.v1.VmService/GetFleet",
                Scope::HostRead,
            ),
            (Method::POST, "/v1/vms", Scope::VmsWrite),
            (Method::DELETE, "/v1/vms/x", Scope::VmsWrite),
            (Method::GET, "/internal/v1/assets/ab", Scope::FleetPeer),
            (Method::GET, "/internal/anything", Scope::FleetPeer),
        ];
        for (m, p, s) in cases {
            assert_eq!(required_scope(&m, p), s, "{m} {p}");
        }
    }

    #[test]
    fn scopes_come_from_names() {
        let s = Scopes::parse("vms:read openid".split(' '));
        assert!(s.allows(Scope::VmsRead));
        assert!(!s.allows(Scope::VmsWrite));
        assert!(!s.allows(Scope::HostRead));
        assert!(Scopes::ALL.allows(Scope::HostRead));
        // No token is a fleet peer, whatever its claim says.
        assert!(!Scopes::ALL.allows(Scope::FleetPeer));
        assert!(!Scopes::parse(["fleet:peer"]).allows(Scope::FleetPeer));
        assert!(Scopes::TRUSTED.allows(Scope::FleetPeer));
    }

    #[test]
    fn spiffe_ids_are_checked() {
        assert!(spiffe_id("spiffe://example.org/ns/cp/sa/ctl").is_some());
        assert!(spiffe_id("spiffe://example.org").is_some());
        for bad in [
            "https://example.org/x",
            "spiffe://",
            "spiffe://Example.org/x",
            "spiffe://example.org/a//b",
            "spiffe://example.org/../x",
            "spiffe://example.org/x?y",
        ] {
            assert!(spiffe_id(bad).is_none(), "{bad}");
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn trusting(mode: Mode, service: &str) -> Authenticator {
        Authenticator {
            mode,
            trusted: [service.to_string()].into(),
            services_need_token: false,
        }
    }

    fn peer(service: Option<&str>) -> Peer {
        Peer {
            addr: "127.0.0.1:9".parse().unwrap(),
            service: service.map(Arc::from),
        }
    }

    #[tokio::test]
    async fn a_trusted_service_acts_for_the_named_customer() {
        let ctl = "spiffe://example.org/control-plane";
        let auth = trusting(Mode::Mtls, ctl);
        let h = headers(&[(CUSTOMER_HEADER, "acme")]);
        let (id, scopes) = auth.authenticate(&h, Some(&peer(Some(ctl)))).await.unwrap();
        assert_eq!(id.customer.to_string(), "acme");
        assert_eq!(id.service.as_deref(), Some(ctl));
        assert_eq!(scopes, Scopes::TRUSTED);

        let other = peer(Some("spiffe://example.org/intruder"));
        let err = auth.authenticate(&h, Some(&other)).await.unwrap_err();
        assert!(err.contains("trusted service"), "{err}");
        let err = auth.authenticate(&h, None).await.unwrap_err();
        assert!(err.contains("trusted service"), "{err}");
        // mtls mode takes no bearer tokens at all.
        let dev = headers(&[("authorization", "Bearer dev_customer_acme")]);
        assert!(auth
            .authenticate(&dev, Some(&peer(Some(ctl))))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn dev_mode_still_honours_trusted_services_and_dev_tokens() {
        let ctl = "spiffe://example.org/control-plane";
        let auth = trusting(Mode::Dev, ctl);
        let dev = headers(&[("authorization", "Bearer dev_customer_b")]);
        let (id, _) = auth.authenticate(&dev, None).await.unwrap();
        assert_eq!(id.customer.to_string(), "b");
        let bad = headers(&[(CUSTOMER_HEADER, "no/such")]);
        let err = auth
            .authenticate(&bad, Some(&peer(Some(ctl))))
            .await
            .unwrap_err();
        assert!(err.contains("not a customer id"), "{err}");
        let basic = headers(&[("authorization", "Basic abc")]);
        let err = auth.authenticate(&basic, None).await.unwrap_err();
        assert!(
            err.starts_with("Authorization is not a Bearer token; expected header"),
            "{err}"
        );
    }
}
