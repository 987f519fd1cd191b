//! Dev tokens: `Bearer dev_customer_<id>` is customer `<id>`, for loopback development only
//! (configuration refuses any other address in this mode).

use crate::domain::CustomerId;

/// What a dev-mode caller must send, appended to every dev-mode refusal.
pub const EXPECTED: &str =
    "expected header 'Authorization: Bearer dev_customer_<id>' (id: 1-64 of A-Z a-z 0-9 _ -)";

/// The customer a dev bearer token names, or why the token is not one.
pub fn customer(token: Option<&str>) -> Result<CustomerId, String> {
    let Some(token) = token else {
        return Err(format!("missing Authorization bearer token; {EXPECTED}"));
    };
    match token
        .strip_prefix("dev_customer_")
        .map(str::parse::<CustomerId>)
    {
        Some(Ok(c)) => Ok(c),
        Some(Err(e)) => Err(format!("bad token: {e}; {EXPECTED}")),
        None => Err(format!("unknown token kind; {EXPECTED}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_tokens_map_to_customers() {
        assert_eq!(
            customer(Some("dev_customer_test")).unwrap().to_string(),
            "test"
        );
        assert_eq!(
            customer(Some("dev_customer_a-1_B")).unwrap().to_string(),
            "a-1_B"
        );
    }

    #[test]
    fn bad_tokens_say_what_is_expected() {
        for t in [
            None,
            Some(""),
            Some("abc"),
            Some("dev_customer_"),
            Some("dev_customer_a/b"),
        ] {
            let err = customer(t).unwrap_err();
            assert!(
                err.contains("expected header 'Authorization: Bearer dev_customer_<id>'"),
                "{t:?}: {err}"
            );
        }
    }
}
