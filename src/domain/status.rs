//! Pre-registration states.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Preregistered,
    Invited,
    Associated,
    AssociationFailed,
    Rejected,
    UnderReview,
    ReviewRejected,
    Expired,
    Deleted,
}

impl Status {
    pub const ALL: [Status; 10] = [
        Status::Queued,
        Status::Preregistered,
        Status::Invited,
        Status::Associated,
        Status::AssociationFailed,
        Status::Rejected,
        Status::UnderReview,
        Status::ReviewRejected,
        Status::Expired,
        Status::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Preregistered => "preregistered",
            Status::Invited => "invited",
            Status::Associated => "associated",
            Status::AssociationFailed => "association_failed",
            Status::Rejected => "rejected",
            Status::UnderReview => "under_review",
            Status::ReviewRejected => "review_rejected",
            Status::Expired => "expired",
            Status::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// States in which the customer is claimed by the partner: no other partner
    /// may pre-register it. Enforced by partial unique indexes in Postgres.
    pub fn holds_claim(self) -> bool {
        matches!(
            self,
            Status::Preregistered
                | Status::Invited
                | Status::AssociationFailed
                | Status::Associated
        )
    }

    /// States that count toward the partner's quota.
    pub fn counts_toward_quota(self) -> bool {
        matches!(
            self,
            Status::UnderReview
                | Status::Preregistered
                | Status::Invited
                | Status::AssociationFailed
        )
    }

    /// A partner may delete anything but a review in progress or an association.
    pub fn deletable(self) -> bool {
        !matches!(
            self,
            Status::UnderReview | Status::Associated | Status::Deleted
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_sets() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert!(Status::Associated.holds_claim());
        assert!(!Status::UnderReview.holds_claim());
        assert!(Status::UnderReview.counts_toward_quota());
        assert!(!Status::Associated.counts_toward_quota());
        assert!(!Status::UnderReview.deletable());
        assert!(!Status::Associated.deletable());
        assert!(Status::Rejected.deletable());
    }
}
