//! What every event has: a stable id, made from the claim that makes it happen once, and its time.

use sha2::{Digest, Sha256};

/// The id of the event `claim` names: the same wherever and however often it is made, so an
/// instance that fires an event another already fired makes the same one.
pub fn event_id(claim: &str) -> String {
    hashed_id("evt", claim)
}

/// `<prefix>_` and 24 hex digits of `claim`'s SHA-256: an id that `claim` alone decides.
pub fn hashed_id(prefix: &str, claim: &str) -> String {
    format!(
        "{prefix}_{}",
        &hex::encode(Sha256::digest(claim.as_bytes()))[..24]
    )
}

/// Epoch seconds as RFC 3339 (`2026-12-04T10:00:00Z`), as events write times.
pub fn rfc3339_secs(secs: i64) -> String {
    jiff::Timestamp::from_second(secs).map_or_else(|_| secs.to_string(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_times_rfc3339() {
        assert_eq!(event_id("a"), event_id("a"));
        assert_ne!(event_id("a"), event_id("b"));
        assert_eq!(event_id("a").len(), 28);
        assert_eq!(rfc3339_secs(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
