//! Domain rules: pure, no I/O, unit-tested.

pub mod association;
pub mod eligibility;
pub mod facts;
pub mod invitation;
pub mod mask;
#[cfg(test)]
mod props;
pub mod status;
pub mod validate;
pub mod values;
pub mod workdays;

pub use eligibility::{decide, Decision, EligibilityInput, ExistingClaim, Reason};
pub use facts::AccountFacts;
pub use status::Status;

/// Normalised email: trimmed and lower-cased.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Normalised mobile: E.164 with spaces, dashes, dots and brackets removed.
pub fn normalize_mobile(mobile: &str) -> String {
    mobile
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        assert_eq!(
            normalize_email("  Zhang.San@Example.COM "),
            "zhang.san@example.com"
        );
        assert_eq!(normalize_mobile(" +86 138-0000-0000 "), "+8613800000000");
    }
}
