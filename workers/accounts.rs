//! `account.upserted`: facts about a customer account from the account system.

use crate::{context::Ctx, domain::AccountFacts, store};

use super::{JobError, Outcome};

pub async fn handle(ctx: &Ctx, facts: AccountFacts) -> Result<Outcome, JobError> {
    validate(&facts)?;
    if store::accounts::upsert(&ctx.db, &facts).await? {
        Ok(Outcome::Done)
    } else {
        Ok(Outcome::Skipped("older_than_stored"))
    }
}

/// [`crate::domain::facts::check`], as a job error.
pub fn validate(f: &AccountFacts) -> Result<(), JobError> {
    crate::domain::facts::check(f).map_err(|problems| JobError::fatal("invalid_payload", problems))
}
