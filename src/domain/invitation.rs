//! Invitation rules: when a link stops working.

use chrono::{DateTime, Duration, Utc};

/// The fallback validity of an invitation link if the configured one does
/// not fit a `chrono::Duration`.
const DEFAULT_VALIDITY_DAYS: i64 = 7;

/// A link expires after the invitation validity, and never after the claim it
/// belongs to (`claim_expires`, when the claim has an expiry).
pub fn link_expires_at(
    now: DateTime<Utc>,
    validity: std::time::Duration,
    claim_expires: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    let validity = Duration::from_std(validity).unwrap_or(Duration::days(DEFAULT_VALIDITY_DAYS));
    let own = now
        .checked_add_signed(validity)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    claim_expires.map_or(own, |c| own.min(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> DateTime<Utc> {
        "2026-03-02T08:00:00Z".parse().unwrap()
    }

    #[test]
    fn own_validity_or_the_claim_whichever_is_first() {
        let week = std::time::Duration::from_secs(7 * 86_400);
        assert_eq!(link_expires_at(t0(), week, None), t0() + Duration::days(7));
        let soon = t0() + Duration::days(2);
        assert_eq!(link_expires_at(t0(), week, Some(soon)), soon);
        let late = t0() + Duration::days(30);
        assert_eq!(
            link_expires_at(t0(), week, Some(late)),
            t0() + Duration::days(7)
        );
    }

    proptest! {
        #[test]
        fn never_after_the_claim_nor_the_validity(secs in 0u64..10_000_000, claim in -1_000_000i64..10_000_000) {
            let claim_at = t0() + Duration::seconds(claim);
            let at = link_expires_at(t0(), std::time::Duration::from_secs(secs), Some(claim_at));
            prop_assert!(at <= claim_at);
            prop_assert!(at <= t0() + Duration::seconds(secs as i64));
            prop_assert!(at == claim_at || at == t0() + Duration::seconds(secs as i64));
        }
    }
}
