//! Checks run by the fuzz targets in `fuzz/` and, on the seed corpus, by `make test` (not an API
//! for metald's own code). Each one takes arbitrary bytes, must not panic on any of them, and
//! asserts what the code it calls promises; a failed assertion is a finding.

use crate::domain::{is_token, BackendKind, CustomerId, VmId};
use crate::state::VmState;

/// Longest error message an id parser may return: caller text is echoed back truncated to 80
/// characters, plus the parser's own explanation.
const MAX_ID_ERROR_CHARS: usize = 160;

/// `VmId`, `CustomerId`, `VmState` and `BackendKind` parsing of `data` (as lossy UTF-8): what is
/// accepted is the canonical spelling and prints back unchanged; what is refused is said in a
/// bounded message.
pub fn ids(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;

    match s.parse::<VmId>() {
        Ok(id) => {
            // One VM has exactly one name: vm-<lowercase hyphenated uuid>, printed unchanged.
            assert_eq!(id.as_str(), s);
            assert_eq!(id.to_string(), s);
            let uuid = s.strip_prefix("vm-").unwrap_or_default();
            assert_eq!(uuid.len(), 36, "{s:?}");
            assert!(
                uuid.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-'),
                "{s:?}"
            );
        }
        Err(e) => assert_bounded(&e.to_string()),
    }

    match s.parse::<CustomerId>() {
        Ok(id) => {
            assert_eq!(id.as_str(), s);
            assert_eq!(id.to_string(), s);
            assert!(is_token(s, 64), "{s:?}");
        }
        Err(e) => {
            assert!(!is_token(s, 64), "{s:?} refused");
            assert_bounded(&e.to_string());
        }
    }

    // Storage names: a parsed name is the one the value prints as.
    if let Some(state) = VmState::parse(s) {
        assert_eq!(state.as_str(), s);
        assert_eq!(VmState::parse(&state.to_string()), Some(state));
    }
    if let Some(kind) = BackendKind::parse(s) {
        assert_eq!(kind.as_str(), s);
    }
}

fn assert_bounded(message: &str) {
    assert!(
        message.chars().count() <= MAX_ID_ERROR_CHARS,
        "error message of {} characters: {message:?}",
        message.chars().count()
    );
}
