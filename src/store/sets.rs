//! The status sets of `src/domain/status.rs` as SQL lists. SQL in this
//! folder spells a set only through these, so a rule changes in one place.

use std::sync::OnceLock;

use crate::domain::status::{sql_list, ReviewState, Status, EXPORT_ACTIVE, LINK_OUTSTANDING};

fn cached(cell: &'static OnceLock<String>, build: impl FnOnce() -> String) -> &'static str {
    cell.get_or_init(build)
}

/// Claims that can expire: [`Status::expirable`].
pub fn expirable() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    cached(&S, || Status::sql_list(Status::expirable))
}

/// Claims that block another partner: [`Status::holds_claim`].
pub fn claims() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    cached(&S, || Status::sql_list(Status::holds_claim))
}

/// Pre-registrations counted toward the quota: [`Status::counts_toward_quota`].
pub fn quota() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    cached(&S, || Status::sql_list(Status::counts_toward_quota))
}

/// Reviews still waiting for a decision: [`ReviewState::undecided`].
pub fn reviews_undecided() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    cached(&S, || ReviewState::sql_list(ReviewState::undecided))
}

/// Reviews an operator decided: [`ReviewState::decided`].
pub fn reviews_decided() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    cached(&S, || ReviewState::sql_list(ReviewState::decided))
}

/// Invitation links still usable: [`LINK_OUTSTANDING`].
pub fn links_outstanding() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    cached(&S, || sql_list(LINK_OUTSTANDING))
}

/// Exports holding a slot of the daily limit: [`EXPORT_ACTIVE`].
pub fn exports_active() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    cached(&S, || sql_list(EXPORT_ACTIVE))
}
