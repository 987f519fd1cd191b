//! Bearer JWTs verified locally against a JWKS, with the `jsonwebtoken` crate doing every
//! signature check. Only EdDSA, ES256 and RS256 are accepted: `none` and HMAC never, whatever
//! the header says (HMAC with a public key as the secret is the classic forgery).
//!
//! Keys come from a file and/or a URL. An unknown `kid` re-reads both, at most once per
//! [`REFRESH_EVERY`], so a rotated issuer key is picked up without a restart while a flood of
//! made-up `kid`s costs one fetch a minute.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::sync::Mutex;

use super::Scopes;
use crate::config::JwtSettings;
use crate::domain::CustomerId;

/// Longest token accepted; real ones are well under 2 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest JWKS document read, from the file or the URL.
pub const MAX_JWKS_BYTES: u64 = 1 << 20;
/// Least time between two refreshes caused by unknown `kid`s.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// Verified tokens remembered (a client reuses its token for many calls); the cache is
/// emptied when full, and whenever the keys change.
const CACHE_ENTRIES: usize = 10_000;
/// How long a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The customer, from the configured claim.
    pub customer: CustomerId,
    /// `sub`, if present.
    pub subject: Option<String>,
    /// From the `scope` claim.
    pub scopes: Scopes,
}

/// Why a token was refused: short, about the token, never about other customers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Longer than [`MAX_TOKEN_BYTES`].
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    /// Not three base64url parts with a JSON header.
    #[error("malformed token")]
    Malformed,
    /// `alg` is not one metald accepts.
    #[error("algorithm not allowed (allowed: EdDSA, ES256, RS256)")]
    Algorithm,
    /// No `kid`, or one no key has.
    #[error("unknown key")]
    UnknownKey,
    /// The key is for another algorithm than the header names.
    #[error("key and algorithm do not match")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("not yet valid")]
    NotYetValid,
    /// `iat` is in the future.
    #[error("issued in the future")]
    IssuedInFuture,
    /// `iss` is not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` does not include the configured audience.
    #[error("wrong audience")]
    WrongAudience,
    /// A required claim is missing.
    #[error("missing claim {0}")]
    MissingClaim(String),
    /// The customer claim is absent or not a customer id.
    #[error("no valid customer in claim {0}")]
    NoCustomer(String),
}

/// Errors loading a JWKS.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client for the URL could not be made (TLS roots).
    #[error("JWKS HTTP client")]
    Client(#[source] reqwest::Error),
    /// The document is larger than [`MAX_JWKS_BYTES`].
    #[error("{0}: JWKS larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge(String),
    /// The URL could not be fetched.
    #[error("fetch {url}")]
    Fetch {
        /// The URL.
        url: String,
        /// What failed.
        #[source]
        source: reqwest::Error,
    },
    /// The document is not a JWKS.
    #[error("{0}: not a JWKS document")]
    Parse(String, #[source] serde_json::Error),
    /// The document holds no usable key.
    #[error("{0}: no usable EdDSA, ES256 or RS256 key with a kid")]
    NoKeys(String),
}

/// Where keys come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    File,
    Url,
}

/// One verification key.
struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer JWTs.
pub struct JwtVerifier {
    settings: JwtSettings,
    keys: ArcSwap<HashMap<String, Arc<Key>>>,
    /// When unknown `kid`s last caused a refresh.
    last_refresh: Mutex<Option<Instant>>,
    http: reqwest::Client,
    /// Tokens already verified, by SHA-256 of the whole token: a signature check costs
    /// 50-250 µs, a lookup well under one. Times are re-checked on every hit.
    verified: std::sync::Mutex<HashMap<[u8; 32], Verified>>,
}

/// A verified token's claims and the times that bound its validity.
#[derive(Clone)]
struct Verified {
    claims: Claims,
    exp: u64,
    nbf: Option<u64>,
}

impl JwtVerifier {
    /// Loads the keys. A bad file is an error; an unreachable URL is logged, and the first
    /// unknown `kid` tries it again.
    pub async fn start(settings: JwtSettings) -> Result<Self, JwksError> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(JwksError::Client)?;
        let v = Self {
            settings,
            keys: ArcSwap::from_pointee(HashMap::new()),
            last_refresh: Mutex::new(None),
            http,
            verified: std::sync::Mutex::new(HashMap::new()),
        };
        let mut keys = HashMap::new();
        for (source, read) in v.read_sources().await {
            match read {
                Ok(k) => keys.extend(k),
                Err(e) if source == Source::File => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %crate::report::Chain(&e), "JWKS URL unavailable at start; retrying on the first unknown key")
                }
            }
        }
        tracing::info!(keys = keys.len(), "JWT keys loaded");
        v.keys.store(Arc::new(keys));
        Ok(v)
    }

    /// Checks `token` and returns what it says.
    pub async fn verify(&self, token: &str) -> Result<Claims, Refusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::TooLong);
        }
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        let leeway = self.settings.leeway.as_secs();
        if let Some(hit) = self.cached(&digest) {
            if now > hit.exp.saturating_add(leeway) {
                return Err(Refusal::Expired);
            }
            if hit.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
                return Err(Refusal::NotYetValid);
            }
            return Ok(hit.claims);
        }
        let (claims, exp, nbf) = self.check(token).await?;
        let mut cache = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(
            digest,
            Verified {
                claims: claims.clone(),
                exp,
                nbf,
            },
        );
        Ok(claims)
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Verified> {
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(digest)
            .cloned()
    }

    /// Verifies the signature and claims of a token not seen before; also returns its `exp`
    /// and `nbf`.
    async fn check(&self, token: &str) -> Result<(Claims, u64, Option<u64>), Refusal> {
        // Named before parsing: jsonwebtoken knows no `none`, and the reason should say so.
        if !matches!(header_alg(token)?.as_str(), "EdDSA" | "ES256" | "RS256") {
            return Err(Refusal::Algorithm);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        if !matches!(
            header.alg,
            Algorithm::EdDSA | Algorithm::ES256 | Algorithm::RS256
        ) {
            return Err(Refusal::Algorithm);
        }
        let kid = header.kid.ok_or(Refusal::UnknownKey)?;
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                self.refresh().await;
                self.key(&kid).ok_or(Refusal::UnknownKey)?
            }
        };
        if key.alg != header.alg {
            return Err(Refusal::KeyMismatch);
        }
        let mut validation = Validation::new(key.alg);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &validation,
        )
        .map_err(|e| match e.into_kind() {
            ErrorKind::InvalidSignature => Refusal::BadSignature,
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::ImmatureSignature => Refusal::NotYetValid,
            ErrorKind::InvalidIssuer => Refusal::WrongIssuer,
            ErrorKind::InvalidAudience => Refusal::WrongAudience,
            ErrorKind::MissingRequiredClaim(c) => Refusal::MissingClaim(c),
            ErrorKind::InvalidAlgorithm => Refusal::KeyMismatch,
            _ => Refusal::Malformed,
        })?;
        let claims = data.claims;
        // jsonwebtoken leaves `iat` alone; a token from the future is a clock or forgery issue.
        if let Some(iat) = claims.get("iat") {
            let iat = iat.as_u64().ok_or(Refusal::Malformed)?;
            let now = jsonwebtoken::get_current_timestamp();
            if iat > now.saturating_add(self.settings.leeway.as_secs()) {
                return Err(Refusal::IssuedInFuture);
            }
        }
        let claim = &self.settings.customer_claim;
        let customer = claims
            .get(claim)
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<CustomerId>().ok())
            .ok_or_else(|| Refusal::NoCustomer(claim.clone()))?;
        let scopes = match claims.get("scope") {
            Some(serde_json::Value::String(s)) => Scopes::parse(s.split_ascii_whitespace()),
            _ => Scopes::default(),
        };
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .ok_or(Refusal::Malformed)?;
        let nbf = claims.get("nbf").and_then(serde_json::Value::as_u64);
        let subject = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        Ok((
            Claims {
                customer,
                subject,
                scopes,
            },
            exp,
            nbf,
        ))
    }

    fn key(&self, kid: &str) -> Option<Arc<Key>> {
        self.keys.load().get(kid).cloned()
    }

    /// Re-reads the file and the URL, unless that was done less than [`REFRESH_EVERY`] ago.
    /// Concurrent callers wait for one refresh. Sources that fail keep their old keys out of
    /// the new set only if another source succeeded; if all fail the old set stays.
    async fn refresh(&self) {
        let mut last = self.last_refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let mut keys = HashMap::new();
        let mut loaded = false;
        for (source, read) in self.read_sources().await {
            match read {
                Ok(k) => {
                    keys.extend(k);
                    loaded = true;
                }
                Err(e) => {
                    tracing::error!(?source, error = %crate::report::Chain(&e), "JWKS refresh failed")
                }
            }
        }
        if loaded {
            tracing::info!(keys = keys.len(), "JWT keys refreshed after an unknown kid");
            self.keys.store(Arc::new(keys));
            // A token of a key that is gone must not outlive the key in the cache.
            self.verified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
    }

    /// Reads the JWKS file and fetches the JWKS URL, each where configured.
    async fn read_sources(&self) -> Vec<(Source, Result<HashMap<String, Arc<Key>>, JwksError>)> {
        let mut out = Vec::new();
        if let Some(path) = &self.settings.jwks_file {
            out.push((Source::File, read_file(path)));
        }
        if self.settings.jwks_url.is_some() {
            out.push((Source::Url, self.fetch().await));
        }
        out
    }

    /// Fetches the URL's JWKS, size- and time-capped.
    async fn fetch(&self) -> Result<HashMap<String, Arc<Key>>, JwksError> {
        let Some(uri) = &self.settings.jwks_url else {
            return Ok(HashMap::new());
        };
        let url = uri.to_string();
        let fetch = |source| JwksError::Fetch {
            url: url.clone(),
            source,
        };
        let mut resp = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(fetch)?;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(fetch)? {
            if body.len() as u64 + chunk.len() as u64 > MAX_JWKS_BYTES {
                return Err(JwksError::TooLarge(url));
            }
            body.extend_from_slice(&chunk);
        }
        parse(&url, &body)
    }
}

/// The `alg` a token's header names.
fn header_alg(token: &str) -> Result<String, Refusal> {
    use base64::Engine;
    let (head, _) = token.split_once('.').ok_or(Refusal::Malformed)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| Refusal::Malformed)?;
    let header: serde_json::Value =
        serde_json::from_slice(&json).map_err(|_| Refusal::Malformed)?;
    header["alg"]
        .as_str()
        .map(str::to_string)
        .ok_or(Refusal::Malformed)
}

fn read_file(path: &std::path::Path) -> Result<HashMap<String, Arc<Key>>, JwksError> {
    use std::io::Read;
    let err = |source| JwksError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut body = Vec::new();
    std::fs::File::open(path)
        .map_err(err)?
        .take(MAX_JWKS_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(err)?;
    let name = path.display().to_string();
    if body.len() as u64 > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge(name));
    }
    parse(&name, &body)
}

/// The usable keys of a JWKS document: with a `kid`, for signing, of an accepted algorithm.
fn parse(source: &str, body: &[u8]) -> Result<HashMap<String, Arc<Key>>, JwksError> {
    let set: JwkSet =
        serde_json::from_slice(body).map_err(|e| JwksError::Parse(source.to_string(), e))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let natural = match &jwk.algorithm {
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Some(Algorithm::EdDSA)
            }
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Some(Algorithm::ES256)
            }
            AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
            // HMAC secrets ("oct") and other curves are never verification keys here.
            _ => None,
        };
        let declared = jwk.common.key_algorithm;
        let alg = match (natural, declared) {
            (Some(a), None) => a,
            (Some(Algorithm::EdDSA), Some(KeyAlgorithm::EdDSA)) => Algorithm::EdDSA,
            (Some(Algorithm::ES256), Some(KeyAlgorithm::ES256)) => Algorithm::ES256,
            (Some(Algorithm::RS256), Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            _ => {
                tracing::warn!(kid, source, "JWKS key skipped: not EdDSA, ES256 or RS256");
                continue;
            }
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => {
                keys.insert(kid.clone(), Arc::new(Key { alg, key }));
            }
            Err(e) => tracing::warn!(kid, source, error = %e, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        return Err(JwksError::NoKeys(source.to_string()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Issuer, AUDIENCE, ISSUER};
    use base64::Engine;
    use serde_json::{json, Value};

    fn settings(file: Option<&std::path::Path>, url: Option<String>) -> JwtSettings {
        JwtSettings {
            jwks_file: file.map(std::path::Path::to_path_buf),
            jwks_url: url.map(|u| u.parse().unwrap()),
            issuer: ISSUER.to_string(),
            audience: AUDIENCE.to_string(),
            customer_claim: "customer_id".to_string(),
            leeway: Duration::from_secs(30),
        }
    }

    async fn with_file(issuer: &Issuer) -> (tempfile::TempDir, JwtVerifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, issuer.jwks().to_string()).unwrap();
        let v = JwtVerifier::start(settings(Some(&path), None))
            .await
            .unwrap();
        (dir, v)
    }

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[tokio::test]
    async fn tokens_of_each_allowed_algorithm_verify() {
        let issuer = Issuer::generate("k1");
        let (_dir, v) = with_file(&issuer).await;
        for kid in ["k1-ed", "k1-es", "k1-rs"] {
            let t = issuer.sign(kid, &Issuer::claims("acme", "vms:read vms:write"));
            let c = v.verify(&t).await.unwrap();
            assert_eq!(c.customer.to_string(), "acme");
            assert_eq!(c.subject.as_deref(), Some("user-of-acme"));
            assert!(c.scopes.allows(super::super::Scope::VmsWrite));
            assert!(!c.scopes.allows(super::super::Scope::HostRead));
        }
    }

    #[tokio::test]
    async fn every_forgery_and_bad_claim_is_refused_with_its_reason() {
        let issuer = Issuer::generate("k1");
        let (dir, v) = with_file(&issuer).await;
        let good = Issuer::claims("acme", "vms:read");
        let now = jsonwebtoken::get_current_timestamp();
        let with = |k: &str, val: Value| {
            let mut c = good.clone();
            c[k] = val;
            c
        };
        let without = |k: &str| {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove(k);
            c
        };
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT", "kid": "k1-ed"})),
            b64(&good)
        );
        // HS256 keyed with the public JWK's bytes: the forgery RS/HS confusion allows.
        let public = std::fs::read(dir.path().join("jwks.json")).unwrap();
        let mut hs_header = jsonwebtoken::Header::new(Algorithm::HS256);
        hs_header.kid = Some("k1-rs".into());
        let hs = jsonwebtoken::encode(
            &hs_header,
            &good,
            &jsonwebtoken::EncodingKey::from_secret(&public),
        )
        .unwrap();
        let signed = issuer.sign("k1-ed", &good);
        let mut parts: Vec<&str> = signed.split('.').collect();
        let tampered_payload = b64(&with("customer_id", json!("other")));
        parts[1] = &tampered_payload;
        let tampered = parts.join(".");
        // An ES256 header on a token signed by the Ed25519 key's kid.
        let mut mismatch_header = jsonwebtoken::Header::new(Algorithm::ES256);
        mismatch_header.kid = Some("k1-ed".into());
        let (_, _, es_key) = &issuer.keys[1];
        let mismatch = jsonwebtoken::encode(&mismatch_header, &good, es_key).unwrap();
        let cases: Vec<(&str, String, Refusal)> = vec![
            ("alg none", none, Refusal::Algorithm),
            ("HS256 with the public key", hs, Refusal::Algorithm),
            (
                "unknown kid",
                Issuer::generate("k9").sign("k9-ed", &good),
                Refusal::UnknownKey,
            ),
            (
                "expired",
                issuer.sign("k1-ed", &with("exp", json!(now - 120))),
                Refusal::Expired,
            ),
            (
                "nbf in the future",
                issuer.sign("k1-es", &with("nbf", json!(now + 600))),
                Refusal::NotYetValid,
            ),
            (
                "iat in the future",
                issuer.sign("k1-es", &with("iat", json!(now + 600))),
                Refusal::IssuedInFuture,
            ),
            (
                "wrong iss",
                issuer.sign("k1-rs", &with("iss", json!("https://evil.test"))),
                Refusal::WrongIssuer,
            ),
            (
                "wrong aud",
                issuer.sign("k1-rs", &with("aud", json!("someone-else"))),
                Refusal::WrongAudience,
            ),
            (
                "no aud",
                issuer.sign("k1-ed", &without("aud")),
                Refusal::MissingClaim("aud".into()),
            ),
            (
                "no customer",
                issuer.sign("k1-ed", &without("customer_id")),
                Refusal::NoCustomer("customer_id".into()),
            ),
            (
                "customer not an id",
                issuer.sign("k1-ed", &with("customer_id", json!("../x"))),
                Refusal::NoCustomer("customer_id".into()),
            ),
            ("tampered payload", tampered, Refusal::BadSignature),
            ("key of another algorithm", mismatch, Refusal::KeyMismatch),
            ("64 KiB token", "a".repeat(64 << 10), Refusal::TooLong),
            ("dev token", "dev_customer_acme".into(), Refusal::Malformed),
        ];
        for (what, token, want) in cases {
            assert_eq!(v.verify(&token).await, Err(want), "{what}");
        }
    }

    #[tokio::test]
    async fn a_rotated_file_key_is_seen_on_its_first_use_and_refreshes_are_rate_limited() {
        let old = Issuer::generate("old");
        let (dir, v) = with_file(&old).await;
        let old_token = old.sign("old-ed", &Issuer::claims("acme", ""));
        v.verify(&old_token).await.unwrap();
        let new = Issuer::generate("new");
        std::fs::write(dir.path().join("jwks.json"), new.jwks().to_string()).unwrap();
        let c = v
            .verify(&new.sign("new-es", &Issuer::claims("acme", "")))
            .await
            .unwrap();
        assert_eq!(c.customer.to_string(), "acme");
        assert_eq!(c.scopes, Scopes::default());
        // The rotation dropped the old keys.
        assert_eq!(
            v.verify(&old.sign("old-ed", &Issuer::claims("acme", "")))
                .await,
            Err(Refusal::UnknownKey)
        );
        // A second rotation within the minute is not fetched: one refresh per minute.
        let newer = Issuer::generate("newer");
        std::fs::write(dir.path().join("jwks.json"), newer.jwks().to_string()).unwrap();
        assert_eq!(
            v.verify(&newer.sign("newer-ed", &Issuer::claims("acme", "")))
                .await,
            Err(Refusal::UnknownKey)
        );
    }

    #[tokio::test]
    async fn a_remembered_token_still_expires() {
        let issuer = Issuer::generate("k");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, issuer.jwks().to_string()).unwrap();
        let mut s = settings(Some(&path), None);
        s.leeway = Duration::ZERO;
        let v = JwtVerifier::start(s).await.unwrap();
        let mut claims = Issuer::claims("acme", "vms:read");
        claims["exp"] = json!(jsonwebtoken::get_current_timestamp() + 1);
        let token = issuer.sign("k-es", &claims);
        v.verify(&token).await.unwrap();
        v.verify(&token).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(v.verify(&token).await, Err(Refusal::Expired));
    }

    #[tokio::test]
    async fn keys_come_from_a_url_and_rotate_there() {
        let jwks = Arc::new(std::sync::Mutex::new(Issuer::generate("a").jwks()));
        let first = Issuer::generate("a");
        *jwks.lock().unwrap() = first.jwks();
        let served = Arc::clone(&jwks);
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let body = served.lock().unwrap().to_string();
                async move { body }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let v = JwtVerifier::start(settings(None, Some(url))).await.unwrap();
        let claims = Issuer::claims("acme", "vms:read");
        v.verify(&first.sign("a-rs", &claims)).await.unwrap();
        let second = Issuer::generate("b");
        *jwks.lock().unwrap() = second.jwks();
        v.verify(&second.sign("b-ed", &claims)).await.unwrap();
    }

    #[test]
    fn a_jwks_without_usable_keys_is_an_error() {
        for doc in [
            json!({"keys": []}),
            json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}),
        ] {
            let err = parse("test", doc.to_string().as_bytes()).err().unwrap();
            assert!(matches!(err, JwksError::NoKeys(_)), "{err}");
        }
        assert!(matches!(
            parse("test", b"{").err().unwrap(),
            JwksError::Parse(..)
        ));
    }
}
