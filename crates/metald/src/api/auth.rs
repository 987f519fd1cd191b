//! Bearer-token authentication. Dev mode only for now: `Bearer dev_customer_<id>` is customer
//! `<id>`. The result travels in request extensions so Connect and REST handlers share it.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use connectrpc::ConnectError;

use crate::domain::CustomerId;

/// What authentication concluded for one request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A known customer.
    Customer(CustomerId),
    /// No usable credentials; the message says what is expected.
    Rejected(String),
}

impl Caller {
    /// The customer, or Unauthenticated.
    pub fn customer(&self) -> Result<&CustomerId, ConnectError> {
        match self {
            Caller::Customer(c) => Ok(c),
            Caller::Rejected(msg) => Err(ConnectError::unauthenticated(msg.clone())),
        }
    }
}

const EXPECTED: &str =
    "expected header 'Authorization: Bearer dev_customer_<id>' (id: 1-64 of A-Z a-z 0-9 _ -)";

/// Decides who the caller is from the Authorization header.
pub fn authenticate(header: Option<&[u8]>) -> Caller {
    let Some(raw) = header else {
        return Caller::Rejected(format!("missing Authorization header; {EXPECTED}"));
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return Caller::Rejected(format!("Authorization header is not text; {EXPECTED}"));
    };
    let Some(token) = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
    else {
        return Caller::Rejected(format!("Authorization is not a Bearer token; {EXPECTED}"));
    };
    match token
        .trim()
        .strip_prefix("dev_customer_")
        .map(str::parse::<CustomerId>)
    {
        Some(Ok(c)) => Caller::Customer(c),
        Some(Err(e)) => Caller::Rejected(format!("bad token: {e}; {EXPECTED}")),
        None => Caller::Rejected(format!("unknown token kind; {EXPECTED}")),
    }
}

/// Middleware that records the [`Caller`] on every request. It never rejects by itself: each
/// protocol reports Unauthenticated in its own encoding (HTTP 401, Connect JSON, gRPC status).
pub async fn layer(mut req: Request, next: Next) -> Response {
    let caller = authenticate(
        req.headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    );
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(h: &str) -> Result<String, String> {
        match authenticate(Some(h.as_bytes())) {
            Caller::Customer(c) => Ok(c.to_string()),
            Caller::Rejected(m) => Err(m),
        }
    }

    #[test]
    fn dev_tokens_map_to_customers() {
        assert_eq!(customer("Bearer dev_customer_test").unwrap(), "test");
        assert_eq!(customer("Bearer dev_customer_a-1_B").unwrap(), "a-1_B");
    }

    #[test]
    fn bad_credentials_say_what_is_expected() {
        for h in [
            "",
            "Basic abc",
            "Bearer",
            "Bearer abc",
            "Bearer dev_customer_",
            "Bearer dev_customer_a/b",
        ] {
            let err = customer(h).unwrap_err();
            assert!(
                err.contains("expected header 'Authorization: Bearer dev_customer_<id>'"),
                "{h}: {err}"
            );
        }
        match authenticate(None) {
            Caller::Rejected(m) => assert!(m.starts_with("missing Authorization header")),
            Caller::Customer(_) => panic!("no header must not authenticate"),
        }
    }
}
