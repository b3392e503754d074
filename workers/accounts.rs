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

pub fn validate(f: &AccountFacts) -> Result<(), JobError> {
    let mut problems = Vec::new();
    if f.account_id.trim().is_empty() || f.account_id.len() > 128 {
        problems.push("account_id must be 1 to 128 characters");
    }
    if f.updated_at.is_none() {
        problems.push("updated_at is required (newer facts replace older ones)");
    }
    if f.site.as_deref().is_some_and(|s| s != "cn" && s != "intl") {
        problems.push("site must be cn or intl");
    }
    if f.country
        .as_deref()
        .is_some_and(|c| !crate::domain::validate::is_country(c))
    {
        problems.push("country must be ISO 3166-1 alpha-2");
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(JobError::fatal("invalid_payload", problems.join("; ")))
    }
}
