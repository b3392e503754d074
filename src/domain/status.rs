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

    /// States of a claim that can still expire (all claims but `associated`).
    pub fn expirable(self) -> bool {
        self.holds_claim() && self != Status::Associated
    }

    /// States in which a partner may invite the customer (the same live,
    /// unassociated claims that can expire).
    pub fn invitable(self) -> bool {
        self.expirable()
    }

    /// The states for which `pred` holds, in declaration order.
    pub fn matching(pred: fn(Status) -> bool) -> Vec<Status> {
        Status::ALL.into_iter().filter(|s| pred(*s)).collect()
    }

    /// `pred`'s states as an SQL list, `('a', 'b')`: the one way SQL spells a
    /// status set, so the database and the domain cannot disagree.
    pub fn sql_list(pred: fn(Status) -> bool) -> String {
        sql_list(Status::matching(pred).iter().map(|s| s.as_str()))
    }
}

/// `('a', 'b', …)` from names that are our own constants (never user input).
pub fn sql_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = names.into_iter().map(|n| format!("'{n}'")).collect();
    format!("({})", quoted.join(", "))
}

/// States of a review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewState {
    Queued,
    Open,
    Overdue,
    Approved,
    Rejected,
    Refused,
}

impl ReviewState {
    pub const ALL: [ReviewState; 6] = [
        ReviewState::Queued,
        ReviewState::Open,
        ReviewState::Overdue,
        ReviewState::Approved,
        ReviewState::Rejected,
        ReviewState::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReviewState::Queued => "queued",
            ReviewState::Open => "open",
            ReviewState::Overdue => "overdue",
            ReviewState::Approved => "approved",
            ReviewState::Rejected => "rejected",
            ReviewState::Refused => "refused",
        }
    }

    pub fn parse(s: &str) -> Option<ReviewState> {
        ReviewState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Opened and not yet decided: an operator may decide it.
    pub fn undecided(self) -> bool {
        matches!(self, ReviewState::Open | ReviewState::Overdue)
    }

    /// Decided by an operator.
    pub fn decided(self) -> bool {
        matches!(self, ReviewState::Approved | ReviewState::Rejected)
    }

    pub fn sql_list(pred: fn(ReviewState) -> bool) -> String {
        sql_list(
            ReviewState::ALL
                .into_iter()
                .filter(|s| pred(*s))
                .map(ReviewState::as_str),
        )
    }
}

/// A stored review state (`store::reviews::Review` reads its column through this).
impl TryFrom<String> for ReviewState {
    type Error = String;
    fn try_from(s: String) -> Result<ReviewState, String> {
        ReviewState::parse(&s).ok_or_else(|| format!("unknown review state {s:?}"))
    }
}

/// States of an invitation link that can still be used (and so can expire
/// or be superseded).
pub const LINK_OUTSTANDING: [&str; 2] = ["queued", "sent"];

/// States of an export that still hold a slot of the partner's daily limit.
pub const EXPORT_ACTIVE: [&str; 2] = ["pending", "running"];

/// A stored status (`store::preregs::Prereg` reads its column through this).
impl TryFrom<String> for Status {
    type Error = String;
    fn try_from(s: String) -> Result<Status, String> {
        Status::parse(&s).ok_or_else(|| format!("unknown pre-registration status {s:?}"))
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

    #[test]
    fn expirable_and_invitable_are_the_unassociated_claims() {
        assert_eq!(
            Status::matching(Status::expirable),
            vec![
                Status::Preregistered,
                Status::Invited,
                Status::AssociationFailed
            ]
        );
        assert_eq!(
            Status::sql_list(Status::expirable),
            "('preregistered', 'invited', 'association_failed')"
        );
        for s in Status::ALL {
            // Only a claim can expire, and an association never does.
            assert_eq!(s.expirable(), s.holds_claim() && s != Status::Associated);
            assert_eq!(s.invitable(), s.expirable());
            // Every expirable claim counts toward the quota.
            assert!(!s.expirable() || s.counts_toward_quota());
        }
    }

    #[test]
    fn sql_lists_are_built_from_the_predicates() {
        let lists = [
            (
                Status::sql_list(Status::holds_claim),
                "('preregistered', 'invited', 'associated', 'association_failed')",
            ),
            (
                Status::sql_list(Status::counts_toward_quota),
                "('preregistered', 'invited', 'association_failed', 'under_review')",
            ),
            (sql_list(LINK_OUTSTANDING), "('queued', 'sent')"),
            (
                ReviewState::sql_list(ReviewState::undecided),
                "('open', 'overdue')",
            ),
            (
                ReviewState::sql_list(ReviewState::decided),
                "('approved', 'rejected')",
            ),
        ];
        for (built, expected) in lists {
            assert_eq!(built, expected);
        }
    }

    #[test]
    fn review_states() {
        for s in ReviewState::ALL {
            assert_eq!(ReviewState::parse(s.as_str()), Some(s));
            assert!(!(s.undecided() && s.decided()));
        }
        assert!(ReviewState::Overdue.undecided());
        assert!(!ReviewState::Queued.undecided());
        assert!(!ReviewState::Refused.decided());
    }
}
