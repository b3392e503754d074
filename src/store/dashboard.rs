//! The operator dashboard: its sessions and the reads of its overview page.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

/// A live session, as the dashboard needs it.
#[derive(Debug, Clone, FromRow)]
pub struct SessionRow {
    pub key_id: Option<Uuid>,
    pub csrf: String,
    pub tz: Option<String>,
}

/// The live session with this id hash, touched (its idle expiry moves on);
/// `None` once idle longer than `idle_secs`, past its expiry, or its key revoked.
pub async fn touch_session<'e>(
    db: impl PgExecutor<'e>,
    id_hash: &[u8],
    idle_secs: f64,
) -> Result<Option<SessionRow>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE dashboard_sessions s SET last_seen_at = now()
          WHERE id_hash = $1 AND expires_at > now()
            AND last_seen_at > now() - make_interval(secs => $2)
            AND (key_id IS NULL OR EXISTS (SELECT 1 FROM api_keys k
                                            WHERE k.id = s.key_id AND k.revoked_at IS NULL))
        RETURNING key_id, csrf, tz",
    )
    .bind(id_hash)
    .bind(idle_secs)
    .fetch_optional(db)
    .await
}

pub async fn create_session<'e>(
    db: impl PgExecutor<'e>,
    id_hash: &[u8],
    key_id: Option<Uuid>,
    csrf: &str,
    lifetime_secs: f64,
    tz: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dashboard_sessions (id_hash, key_id, csrf, expires_at, tz)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5)",
    )
    .bind(id_hash)
    .bind(key_id)
    .bind(csrf)
    .bind(lifetime_secs)
    .bind(tz)
    .execute(db)
    .await?;
    Ok(())
}

/// Sessions past their absolute expiry are of no use to anyone.
pub async fn delete_expired_sessions<'e>(db: impl PgExecutor<'e>) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at < now()")
        .execute(db)
        .await?;
    Ok(())
}

pub async fn delete_session<'e>(
    db: impl PgExecutor<'e>,
    id_hash: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM dashboard_sessions WHERE id_hash = $1")
        .bind(id_hash)
        .execute(db)
        .await?;
    Ok(())
}

/// An undecided review with its partner's name.
#[derive(Debug, Clone, FromRow)]
pub struct ReviewLine {
    pub id: Uuid,
    pub state: String,
    pub requested_at: DateTime<Utc>,
    pub due_at: Option<DateTime<Utc>>,
    pub calendar_missing: bool,
    pub partner: String,
}

/// Undecided reviews, soonest due first (at most 100).
pub async fn undecided_reviews<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<ReviewLine>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT r.id, r.state, r.requested_at, r.due_at, r.calendar_missing, p.name AS partner
           FROM reviews r JOIN partners p ON p.id = r.partner_id
          WHERE r.state IN {}
          ORDER BY r.due_at NULLS LAST, r.requested_at LIMIT 100",
        super::sets::reviews_undecided()
    ))
    .fetch_all(db)
    .await
}

/// A claim about to expire, with its partner's name.
#[derive(Debug, Clone, FromRow)]
pub struct ClaimLine {
    pub id: Uuid,
    pub full_name: String,
    pub email: String,
    pub status: String,
    pub expires_at: DateTime<Utc>,
    pub partner: String,
}

fn expiring_from() -> String {
    format!(
        "FROM preregistrations c JOIN partners p ON p.id = c.partner_id
          WHERE c.status IN {}
            AND c.expires_at > now() AND c.expires_at <= now() + interval '48 hours'",
        super::sets::expirable()
    )
}

/// How many claims expire within 48 hours.
pub async fn expiring_claims_count<'e>(db: impl PgExecutor<'e>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT count(*) {}", expiring_from()))
        .fetch_one(db)
        .await
}

/// The first 50 claims expiring within 48 hours, soonest first.
pub async fn expiring_claims<'e>(db: impl PgExecutor<'e>) -> Result<Vec<ClaimLine>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT c.id, c.full_name, c.email, c.status, c.expires_at, p.name AS partner {}
          ORDER BY c.expires_at LIMIT 50",
        expiring_from()
    ))
    .fetch_all(db)
    .await
}

/// Every scheduled run's last success and statistics.
pub async fn sweep_runs<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<(String, DateTime<Utc>, Option<Value>)>, sqlx::Error> {
    sqlx::query_as("SELECT name, last_success_at, last_stats FROM sweep_runs ORDER BY name")
        .fetch_all(db)
        .await
}

/// Invitations per status.
pub async fn invitations_by_status<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT status, count(*) FROM invitations GROUP BY status ORDER BY status")
        .fetch_all(db)
        .await
}
