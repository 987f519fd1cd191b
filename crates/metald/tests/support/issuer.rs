//! A JWT issuer made by the test: fresh Ed25519, P-256 and RSA keys, the JWKS that publishes
//! them, and tokens they sign. Shared by the unit tests (`crate::testing`) and the e2e tests.
#![allow(dead_code, clippy::unwrap_used)]

/// A JWT issuer made by the test: an Ed25519, a P-256 and an RSA key, each with a `kid`, and
/// the JWKS document that publishes them.
pub struct Issuer {
    pub keys: Vec<(String, jsonwebtoken::Algorithm, jsonwebtoken::EncodingKey)>,
    /// The public JWKs, in the order of `keys`.
    jwks: Vec<serde_json::Value>,
}

/// The issuer and audience [`Issuer`] tokens carry.
pub const ISSUER: &str = "https://issuer.test";
/// See [`ISSUER`].
pub const AUDIENCE: &str = "metald";

impl Issuer {
    /// Fresh keys named `<prefix>-ed`, `<prefix>-es` and `<prefix>-rs`.
    pub fn generate(prefix: &str) -> Self {
        use jsonwebtoken::{Algorithm, EncodingKey};
        use rsa::pkcs8::EncodePrivateKey;
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let es = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rs = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let rs_pem = rs.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let mut issuer = Self {
            jwks: Vec::new(),
            keys: vec![
                (
                    format!("{prefix}-ed"),
                    Algorithm::EdDSA,
                    EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap(),
                ),
                (
                    format!("{prefix}-es"),
                    Algorithm::ES256,
                    EncodingKey::from_ec_pem(es.serialize_pem().as_bytes()).unwrap(),
                ),
                (
                    format!("{prefix}-rs"),
                    Algorithm::RS256,
                    EncodingKey::from_rsa_pem(rs_pem.as_bytes()).unwrap(),
                ),
            ],
        };
        use base64::Engine;
        // jsonwebtoken cannot make an Ed25519 JWK (unimplemented!), so that one is by hand.
        let ed_jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA",
            "kid": format!("{prefix}-ed"),
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ed.public_key_raw())});
        issuer.jwks = issuer
            .keys
            .iter()
            .map(|(kid, alg, key)| {
                if *alg == Algorithm::EdDSA {
                    return ed_jwk.clone();
                }
                let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(key, *alg).unwrap();
                jwk.common.key_id = Some(kid.clone());
                serde_json::to_value(jwk).unwrap()
            })
            .collect();
        issuer
    }

    /// The public keys as a JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.jwks })
    }

    /// A token signed by key `kid` with `claims`.
    pub fn sign(&self, kid: &str, claims: &serde_json::Value) -> String {
        let (_, alg, key) = self.keys.iter().find(|(k, _, _)| k == kid).unwrap();
        let mut header = jsonwebtoken::Header::new(*alg);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    /// Claims for `customer` with `scope`, valid for an hour.
    pub fn claims(customer: &str, scope: &str) -> serde_json::Value {
        let now = jsonwebtoken::get_current_timestamp();
        serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": format!("user-of-{customer}"),
            "customer_id": customer, "scope": scope,
            "iat": now, "nbf": now, "exp": now + 3600,
        })
    }
}
