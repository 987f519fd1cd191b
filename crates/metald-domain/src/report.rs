//! How errors read in logs and answers: the error and each of its causes once, joined by ": ".
//! Error types here say only what they add (no message repeats its source), so that this chain
//! reads like a sentence.

use std::fmt;

/// Displays an error with its causes ("a: b: c"); for log fields: `error = %Chain(&e)`.
pub struct Chain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// The error and its causes in one line ("a: b: c").
pub fn chain(err: &dyn std::error::Error) -> String {
    Chain(err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("isolate vm-1")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("network")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn each_cause_appears_once() {
        let e = Outer(Inner(std::io::Error::other("no such device")));
        assert_eq!(chain(&e), "isolate vm-1: network: no such device");
    }
}
