//! The status sets of `src/domain/status.rs` as SQL lists. SQL in this
//! folder spells a set only through these, so a rule changes in one place.

use std::sync::OnceLock;

use crate::domain::status::{sql_list, ReviewState, Status, EXPORT_ACTIVE, LINK_OUTSTANDING};

/// Each set's SQL list, built once on first use.
macro_rules! sets {
    ($($(#[$doc:meta])* $name:ident => $build:expr;)*) => {
        $(
            $(#[$doc])*
            pub fn $name() -> &'static str {
                static S: OnceLock<String> = OnceLock::new();
                S.get_or_init(|| $build)
            }
        )*
    };
}

sets! {
    /// Claims that can expire: [`Status::expirable`].
    expirable => Status::sql_list(Status::expirable);
    /// Claims that block another partner: [`Status::holds_claim`].
    claims => Status::sql_list(Status::holds_claim);
    /// Reviews still waiting for a decision: [`ReviewState::undecided`].
    reviews_undecided => ReviewState::sql_list(ReviewState::undecided);
    /// Reviews an operator decided: [`ReviewState::decided`].
    reviews_decided => ReviewState::sql_list(ReviewState::decided);
    /// Invitation links still usable: [`LINK_OUTSTANDING`].
    links_outstanding => sql_list(LINK_OUTSTANDING);
    /// Exports holding a slot of the daily limit: [`EXPORT_ACTIVE`].
    exports_active => sql_list(EXPORT_ACTIVE);
}
