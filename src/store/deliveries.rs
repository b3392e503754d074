//! Deliveries of notice emails, one row per job id: the lease that keeps a
//! notice from being sent twice.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// Claims the delivery of job `job_id` (new, or a released lease). `None`:
/// someone holds it or it is finished; see [`state`].
pub async fn claim<'e>(
    db: impl PgExecutor<'e>,
    job_id: &str,
    kind: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO email_deliveries (job_id, kind, state, sending_since) VALUES ($1, $2, 'sending', now())
         ON CONFLICT (job_id) DO UPDATE SET sending_since = now()
           WHERE email_deliveries.state = 'sending' AND email_deliveries.sending_since IS NULL
         RETURNING state",
    )
    .bind(job_id)
    .bind(kind)
    .fetch_optional(db)
    .await
}

/// The delivery's state and its lease.
pub async fn state<'e>(
    db: impl PgExecutor<'e>,
    job_id: &str,
) -> Result<(String, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as("SELECT state, sending_since FROM email_deliveries WHERE job_id = $1")
        .bind(job_id)
        .fetch_one(db)
        .await
}

/// Releases the lease after a transient failure.
pub async fn release<'e>(db: impl PgExecutor<'e>, job_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE email_deliveries SET sending_since = NULL WHERE job_id = $1")
        .bind(job_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Ends the delivery: `sent` or `failed` with its reason.
pub async fn finish<'e>(
    db: impl PgExecutor<'e>,
    job_id: &str,
    state: &str,
    failure: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE email_deliveries SET state = $2, failure = $3, sending_since = NULL,
            sent_at = CASE WHEN $2 = 'sent' THEN now() END WHERE job_id = $1",
    )
    .bind(job_id)
    .bind(state)
    .bind(failure)
    .execute(db)
    .await?;
    Ok(())
}
