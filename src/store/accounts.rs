//! Account facts: newer facts replace older ones, whatever the arrival order.

use sqlx::PgExecutor;

use crate::domain::{normalize_email, normalize_mobile, AccountFacts};

/// Stores the facts unless newer ones are already there. Returns whether
/// they were stored.
pub async fn upsert<'e>(db: impl PgExecutor<'e>, f: &AccountFacts) -> Result<bool, sqlx::Error> {
    let updated_at = f.updated_at.unwrap_or_else(chrono::Utc::now);
    let facts = serde_json::to_value(f).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let r = sqlx::query(
        "INSERT INTO accounts (account_id, email_norm, mobile_norm, facts, updated_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (account_id) DO UPDATE SET
            email_norm = EXCLUDED.email_norm, mobile_norm = EXCLUDED.mobile_norm,
            facts = EXCLUDED.facts, updated_at = EXCLUDED.updated_at, received_at = now()
         WHERE accounts.updated_at < EXCLUDED.updated_at",
    )
    .bind(&f.account_id)
    .bind(f.email.as_deref().map(normalize_email))
    .bind(f.mobile.as_deref().map(normalize_mobile))
    .bind(facts)
    .bind(updated_at)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn get<'e>(
    db: impl PgExecutor<'e>,
    account_id: &str,
) -> Result<Option<AccountFacts>, sqlx::Error> {
    let v: Option<serde_json::Value> =
        sqlx::query_scalar("SELECT facts FROM accounts WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(db)
            .await?;
    Ok(v.and_then(|v| serde_json::from_value(v).ok()))
}
