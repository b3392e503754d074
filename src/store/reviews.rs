//! Manual reviews.

use crate::domain::status::ReviewState;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Review {
    pub id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    #[sqlx(try_from = "String")]
    pub state: ReviewState,
    pub justification: String,
    pub expected_new_spend: Option<f64>,
    pub contact_record: Option<String>,
    pub requested_at: DateTime<Utc>,
    pub opened_at: Option<DateTime<Utc>>,
    pub due_at: Option<DateTime<Utc>>,
    pub calendar_missing: bool,
    pub reminder_sent_at: Option<DateTime<Utc>>,
    pub overdue_at: Option<DateTime<Utc>>,
    pub escalated_at: Option<DateTime<Utc>>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decided_by: Option<String>,
    pub note: Option<String>,
    pub refusal_code: Option<String>,
}

const COLUMNS: &str = "id, preregistration_id, partner_id, state, justification, expected_new_spend, contact_record,
    requested_at, opened_at, due_at, calendar_missing, reminder_sent_at, overdue_at, escalated_at, decided_at, decided_by, note, refusal_code";

/// `SELECT` of every column of `reviews` rows matching `condition`.
fn select(condition: &str) -> String {
    format!("SELECT {COLUMNS} FROM reviews WHERE {condition}")
}

pub struct NewReview<'a> {
    pub id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    pub justification: &'a str,
    pub expected_new_spend: Option<f64>,
    pub contact_record: Option<&'a str>,
}

/// Inserts a `queued` review; a unique index allows one pending review per
/// pre-registration (a unique violation means one is already pending).
pub async fn insert_queued(conn: &mut PgConnection, r: &NewReview<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO reviews (id, preregistration_id, partner_id, state, justification, expected_new_spend, contact_record)
         VALUES ($1, $2, $3, 'queued', $4, $5, $6)",
    )
    .bind(r.id)
    .bind(r.preregistration_id)
    .bind(r.partner_id)
    .bind(r.justification)
    .bind(r.expected_new_spend)
    .bind(r.contact_record)
    .execute(conn)
    .await?;
    Ok(())
}

super::by_id!(Review);

/// The latest review of a pre-registration.
pub async fn latest_for<'e>(
    db: impl PgExecutor<'e>,
    prereg_id: Uuid,
) -> Result<Option<Review>, sqlx::Error> {
    super::row_by(
        db,
        select("preregistration_id = $1 ORDER BY requested_at DESC, id DESC LIMIT 1"),
        prereg_id,
    )
    .await
}

/// Opens review `id` at `opened_at`, the instant its deadline `due_at` was
/// computed from (never the database's own clock, which is the
/// transaction's start: the two would differ by the transaction's age).
pub async fn open(
    conn: &mut PgConnection,
    id: Uuid,
    opened_at: DateTime<Utc>,
    due_at: DateTime<Utc>,
    calendar_missing: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE reviews SET state = 'open', opened_at = $4, due_at = $2, calendar_missing = $3 WHERE id = $1")
        .bind(id)
        .bind(due_at)
        .bind(calendar_missing)
        .bind(opened_at)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn refuse(conn: &mut PgConnection, id: Uuid, code: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE reviews SET state = 'refused', refusal_code = $2, decided_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(code)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn decide(
    conn: &mut PgConnection,
    id: Uuid,
    state: &str,
    by: &str,
    note: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE reviews SET state = $2, decided_at = now(), decided_by = $3, note = $4 WHERE id = $1")
        .bind(id)
        .bind(state)
        .bind(by)
        .bind(note)
        .execute(conn)
        .await?;
    Ok(())
}

/// Operator list: `open` (includes overdue: still undecided), `overdue`, `decided`.
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    state: &str,
    limit: i64,
) -> Result<Vec<Review>, sqlx::Error> {
    let cond = match state {
        "overdue" => "state = 'overdue'".to_string(),
        "decided" => format!("state IN {}", super::sets::reviews_decided()),
        _ => format!("state IN {}", super::sets::reviews_undecided()),
    };
    super::rows_by(
        db,
        select(&format!(
            "{cond} ORDER BY due_at NULLS LAST, requested_at LIMIT $1"
        )),
        limit,
    )
    .await
}

/// A review that just became overdue.
#[derive(Debug, Clone, FromRow)]
pub struct Overdue {
    pub id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    pub due_at: Option<DateTime<Utc>>,
    pub overdue_at: Option<DateTime<Utc>>,
}

/// Marks up to `batch` open reviews past their deadline `overdue` (and
/// escalated), with their timeline entries, in one statement.
pub async fn mark_overdue(
    conn: &mut PgConnection,
    batch: i64,
    actor: &str,
) -> Result<Vec<Overdue>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
            SELECT id FROM reviews
            WHERE state = 'open' AND due_at <= now()
            ORDER BY due_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         ), marked AS (
            UPDATE reviews r SET state = 'overdue', overdue_at = now(), escalated_at = now()
            FROM due WHERE r.id = due.id AND r.state = 'open'
            RETURNING r.id, r.preregistration_id, r.partner_id, r.due_at, r.overdue_at
         ), timeline AS (
            INSERT INTO preregistration_events (preregistration_id, actor, change, from_status, to_status, reason, details)
            SELECT preregistration_id, $2, 'review_overdue', 'under_review', 'under_review', 'review_deadline_passed',
                   jsonb_build_object('review_id', id, 'due_at', due_at)
            FROM marked
         )
         SELECT id, preregistration_id, partner_id, due_at, overdue_at FROM marked",
    )
    .bind(batch)
    .bind(actor)
    .fetch_all(conn)
    .await
}

/// A review and its pre-registration.
#[derive(Debug, Clone, Copy, FromRow)]
pub struct ReviewRef {
    pub id: Uuid,
    pub preregistration_id: Uuid,
}

/// Marks up to `batch` open reviews due within `before_ms` as reminded (once).
pub async fn mark_reminders(
    conn: &mut PgConnection,
    batch: i64,
    before_ms: i64,
) -> Result<Vec<ReviewRef>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
            SELECT id FROM reviews
            WHERE state = 'open' AND reminder_sent_at IS NULL
              AND due_at > now() AND due_at <= now() + $2 * interval '1 millisecond'
            ORDER BY due_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         )
         UPDATE reviews r SET reminder_sent_at = now()
         FROM due WHERE r.id = due.id AND r.state = 'open' AND r.reminder_sent_at IS NULL
         RETURNING r.id, r.preregistration_id",
    )
    .bind(batch)
    .bind(before_ms)
    .fetch_all(conn)
    .await
}

pub async fn count_overdue<'e>(db: impl PgExecutor<'e>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM reviews WHERE state = 'overdue'")
        .fetch_one(db)
        .await
}

/// Undecided reviews whose deadline was computed without a calendar.
pub async fn count_calendar_missing<'e>(db: impl PgExecutor<'e>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM reviews WHERE state IN {} AND calendar_missing",
        super::sets::reviews_undecided()
    ))
    .fetch_one(db)
    .await
}

/// Open reviews whose deadline was computed without a calendar, with the
/// time they were opened.
pub async fn open_calendar_missing<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<(Uuid, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, opened_at FROM reviews WHERE state = 'open' AND calendar_missing AND opened_at IS NOT NULL",
    )
    .fetch_all(db)
    .await
}

/// Sets a new deadline of an open review still flagged `calendar_missing`.
pub async fn redate<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
    due_at: DateTime<Utc>,
    calendar_missing: bool,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE reviews SET due_at = $2, calendar_missing = $3
         WHERE id = $1 AND state = 'open' AND calendar_missing",
    )
    .bind(id)
    .bind(due_at)
    .bind(calendar_missing)
    .execute(db)
    .await?
    .rows_affected())
}

/// An operator approved a review of the pre-registration (which waives the
/// registration-time limit at association).
pub async fn approved_for<'e>(
    db: impl PgExecutor<'e>,
    prereg_id: Uuid,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM reviews WHERE preregistration_id = $1 AND state = 'approved')",
    )
    .bind(prereg_id)
    .fetch_one(db)
    .await
}
