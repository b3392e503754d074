//! Pre-registrations: the claims, their decisions and their listing.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgConnection, PgExecutor, Row};
use uuid::Uuid;

use crate::domain::{ExistingClaim, Status};

/// A new pre-registration row (not a wire format: the message is
/// [`crate::jobs::PreregistrationRequested`]; read back from a `queued` row
/// by the republisher).
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct NewPrereg {
    pub id: Uuid,
    pub partner_id: Uuid,
    pub full_name: String,
    pub email: String,
    pub mobile: String,
    pub send_invitation: bool,
    pub association_type: Option<String>,
    pub locale: Option<String>,
    pub tags: Vec<String>,
    pub remarks: Option<String>,
    pub account_manager_id: Option<Uuid>,
}

impl From<&crate::jobs::PreregistrationRequested> for NewPrereg {
    fn from(j: &crate::jobs::PreregistrationRequested) -> Self {
        NewPrereg {
            id: j.id,
            partner_id: j.partner_id,
            full_name: j.full_name.clone(),
            email: j.email.as_str().to_string(),
            mobile: j.mobile.as_str().to_string(),
            send_invitation: j.send_invitation,
            association_type: j.association_type.as_deref().map(str::to_string),
            locale: j.locale.as_deref().map(str::to_string),
            tags: j.tags.clone(),
            remarks: j.remarks.clone(),
            account_manager_id: j.account_manager_id,
        }
    }
}

impl From<&NewPrereg> for crate::jobs::PreregistrationRequested {
    fn from(p: &NewPrereg) -> Self {
        crate::jobs::PreregistrationRequested {
            id: p.id,
            partner_id: p.partner_id,
            full_name: p.full_name.clone(),
            email: p.email.clone().into(),
            mobile: p.mobile.clone().into(),
            send_invitation: p.send_invitation,
            association_type: p.association_type.clone().map(Into::into),
            locale: p.locale.clone().map(Into::into),
            tags: p.tags.clone(),
            remarks: p.remarks.clone(),
            account_manager_id: p.account_manager_id,
        }
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct Prereg {
    pub id: Uuid,
    pub partner_id: Uuid,
    pub full_name: String,
    pub email: String,
    pub mobile: String,
    pub email_norm: String,
    pub mobile_norm: String,
    #[sqlx(try_from = "String")]
    pub status: Status,
    pub reason_code: Option<String>,
    pub reason_message: Option<String>,
    pub manual_review_eligible: bool,
    pub existing_id: Option<Uuid>,
    pub send_invitation: bool,
    pub association_type: Option<String>,
    pub locale: Option<String>,
    pub tags: Vec<String>,
    pub remarks: Option<String>,
    pub account_manager_id: Option<Uuid>,
    pub request_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub preregistered_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl Prereg {
    pub fn status(&self) -> Status {
        self.status
    }
}

pub(crate) const COLUMNS: &str = "id, partner_id, full_name, email, mobile, email_norm, mobile_norm, status, reason_code, reason_message,
    manual_review_eligible, existing_id, send_invitation, association_type, locale, tags, remarks, account_manager_id,
    request_id, created_at, decided_at, preregistered_at, expires_at, updated_at";

/// `SELECT` of every column of `preregistrations` rows matching `condition`.
fn select(condition: &str) -> String {
    format!("SELECT {COLUMNS} FROM preregistrations WHERE {condition}")
}

/// Inserts the `queued` row unless it exists. Returns whether it was inserted.
pub async fn insert_queued(
    conn: &mut PgConnection,
    p: &NewPrereg,
    request_id: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO preregistrations (id, partner_id, full_name, email, mobile, email_norm, mobile_norm, status,
             send_invitation, association_type, locale, tags, remarks, account_manager_id, request_id, search_text)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $9, $10, $11, $12, $13, $14,
             lower(concat_ws(' ', $3, $4, $12, array_to_string($11, ' '),
                 (SELECT name FROM account_managers WHERE id = $13))))
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(p.id)
    .bind(p.partner_id)
    .bind(&p.full_name)
    .bind(&p.email)
    .bind(&p.mobile)
    .bind(crate::domain::normalize_email(&p.email))
    .bind(crate::domain::normalize_mobile(&p.mobile))
    .bind(p.send_invitation)
    .bind(p.association_type.as_deref())
    .bind(p.locale.as_deref())
    .bind(&p.tags)
    .bind(p.remarks.as_deref())
    .bind(p.account_manager_id)
    .bind(request_id)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

super::by_id!(Prereg);

/// Claims held on a customer identified by its normalised email or mobile.
pub async fn claims_on(
    conn: &mut PgConnection,
    email_norm: &str,
    mobile_norm: &str,
) -> Result<Vec<ExistingClaim>, sqlx::Error> {
    let claims = super::sets::claims();
    let rows = sqlx::query(&format!(
        "SELECT id, partner_id, status, expires_at FROM preregistrations
         WHERE (email_norm = $1 AND status IN {claims}) OR (mobile_norm = $2 AND status IN {claims})"
    ))
    .bind(email_norm)
    .bind(mobile_norm)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ExistingClaim {
            id: r.get("id"),
            partner_id: r.get("partner_id"),
            status: Status::parse(r.get::<&str, _>("status")).unwrap_or(Status::Preregistered),
            expires_at: r.get("expires_at"),
        })
        .collect())
}

/// The partner's pre-registrations under review or holding a claim, as the
/// database keeps count of them (`partner_quota_usage`).
pub async fn count_quota(conn: &mut PgConnection, partner_id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce((SELECT active FROM partner_quota_usage WHERE partner_id = $1), 0)",
    )
    .bind(partner_id)
    .fetch_one(conn)
    .await
}

/// A status change with its side columns.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub id: Uuid,
    pub status: Status,
    pub reason: Option<(&'a str, &'a str)>,
    pub manual_review_eligible: bool,
    pub existing_id: Option<Uuid>,
    pub preregistered_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// The rows `d` of [`Change`]s bound by [`bind_changes`] (`$1`..`$8`),
/// numbered `n` in the order given.
macro_rules! changes_sql {
    () => {
        "SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bool[], $6::uuid[],
                             $7::timestamptz[], $8::timestamptz[])
             WITH ORDINALITY AS t(id, status, reason_code, reason_message, reviewable, existing_id,
                                  preregistered_at, expires_at, n)"
    };
}

/// The one statement that writes a decision's status columns from the rows
/// `d` of [`changes_sql`]: [`apply`] runs it for one change, and
/// `decisions::write` for a batch (with the timeline and the outbox).
macro_rules! apply_sql {
    () => {
        "UPDATE preregistrations p SET status = d.status, reason_code = d.reason_code,
             reason_message = d.reason_message, manual_review_eligible = d.reviewable,
             existing_id = d.existing_id,
             preregistered_at = COALESCE(d.preregistered_at, p.preregistered_at),
             expires_at = COALESCE(d.expires_at, p.expires_at),
             decided_at = COALESCE(p.decided_at, now()), updated_at = now()
         FROM d WHERE p.id = d.id"
    };
}
pub(crate) use {apply_sql, changes_sql};

type ScalarQuery<'q, O> =
    sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>;

/// Binds `changes` column by column as `$1`..`$8` of [`changes_sql`].
pub(crate) fn bind_changes<'q, O>(
    q: ScalarQuery<'q, O>,
    changes: &[Change<'q>],
) -> ScalarQuery<'q, O> {
    fn column<'q, T>(changes: &[Change<'q>], f: impl Fn(&Change<'q>) -> T) -> Vec<T> {
        changes.iter().map(f).collect()
    }
    q.bind(column(changes, |c| c.id))
        .bind(column(changes, |c| c.status.as_str()))
        .bind(column(changes, |c| c.reason.map(|r| r.0)))
        .bind(column(changes, |c| c.reason.map(|r| r.1)))
        .bind(column(changes, |c| c.manual_review_eligible))
        .bind(column(changes, |c| c.existing_id))
        .bind(column(changes, |c| c.preregistered_at))
        .bind(column(changes, |c| c.expires_at))
}

/// Applies one status change (the batch's statement with a batch of one).
pub async fn apply(conn: &mut PgConnection, c: &Change<'_>) -> Result<(), sqlx::Error> {
    let q = sqlx::query_scalar(concat!(
        "WITH d AS (",
        changes_sql!(),
        "), updated AS (",
        apply_sql!(),
        " RETURNING p.id) SELECT count(*) FROM updated"
    ));
    let _updated: i64 = bind_changes(q, std::slice::from_ref(c))
        .fetch_one(conn)
        .await?;
    Ok(())
}

/// The claim was invited (email link activated or offline link handed out).
pub async fn mark_invited(
    conn: &mut PgConnection,
    id: Uuid,
    method: &str,
    link_expires_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE preregistrations SET status = 'invited', invited_at = COALESCE(invited_at, now()), last_method = $2,
            link_expires_at = $3, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(method)
    .bind(link_expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Remembers the account that associated (searchable as customer
/// information). The search text is rebuilt, never appended to, so it does
/// not grow with each call.
pub async fn set_account(
    conn: &mut PgConnection,
    id: Uuid,
    account_id: &str,
    display_name: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE preregistrations SET account_id = $2,
            search_text = lower(concat_ws(' ', full_name, email, remarks, array_to_string(tags, ' '),
                (SELECT name FROM account_managers WHERE id = account_manager_id), $2, $3::text))
         WHERE id = $1",
    )
    .bind(id)
    .bind(account_id)
    .bind(display_name)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets only the status (deletion, expiry, review).
pub async fn set_status(
    conn: &mut PgConnection,
    id: Uuid,
    status: Status,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE preregistrations SET status = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(status.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub status: Option<Status>,
    pub q: Option<String>,
    pub cursor: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// The partner's pre-registrations, newest first, keyset-paginated.
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    partner_id: Uuid,
    f: &ListFilter,
) -> Result<Vec<Prereg>, sqlx::Error> {
    let pattern =
        f.q.as_ref()
            .map(|q| format!("%{}%", escape_like(&q.to_lowercase())));
    sqlx::query_as::<_, Prereg>(&format!(
        "SELECT {COLUMNS} FROM preregistrations
         WHERE partner_id = $1
           AND ($2::text IS NULL OR status = $2)
           AND ($3::text IS NULL OR lower(full_name) LIKE $3 OR email_norm LIKE $3 OR mobile_norm LIKE $3
                OR lower(coalesce(remarks, '')) LIKE $3 OR EXISTS (SELECT 1 FROM unnest(tags) t WHERE lower(t) LIKE $3))
           AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5))
         ORDER BY created_at DESC, id DESC
         LIMIT $6"
    ))
    .bind(partner_id)
    .bind(f.status.map(|s| s.as_str()))
    .bind(pattern)
    .bind(f.cursor.map(|c| c.0))
    .bind(f.cursor.map(|c| c.1).unwrap_or_default())
    .bind(f.limit)
    .fetch_all(db)
    .await
}

pub fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct TimelineRow {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub change: String,
    pub from_status: Option<String>,
    pub to_status: Option<String>,
    pub reason: Option<String>,
    pub details: Option<serde_json::Value>,
}

pub async fn timeline<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
) -> Result<Vec<TimelineRow>, sqlx::Error> {
    sqlx::query_as::<_, TimelineRow>(
        "SELECT at, actor, change, from_status, to_status, reason, details FROM preregistration_events
         WHERE preregistration_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(db)
    .await
}

/// The statement that expires one batch of claims and writes, in the same
/// statement, their timeline entries and their `preregistration.expired`
/// events to the outbox (`$1` batch size, `$2` actor, `$3` CloudEvents
/// source): one round trip per batch. The event is the one
/// `flows::claims::expired_event` builds. The rows are locked by the `due`
/// scan, so their `ctid` stays theirs until the update (a TID scan instead of
/// a second index lookup per row). Returns the ids it expired. Public for the
/// benchmark's query plan.
pub fn expire_claims_sql() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let expirable = super::sets::expirable();
        format!(
            "
WITH due AS (
    SELECT ctid AS tid, id, status FROM preregistrations
    WHERE status IN {expirable} AND expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), expired AS (
    UPDATE preregistrations p SET status = 'expired', updated_at = now()
    FROM due
    WHERE p.ctid = due.tid AND p.status IN {expirable}
    RETURNING p.id, p.partner_id, due.status AS from_status, p.expires_at
), timeline AS (
    INSERT INTO preregistration_events (preregistration_id, actor, change, from_status, to_status, reason)
    SELECT id, $2, 'expired', from_status, 'expired', 'claim_validity_passed' FROM expired
), events AS (
    INSERT INTO outbox (exchange, routing_key, message)
    SELECT 'events', 'preregistration.expired', jsonb_build_object(
        'specversion', '1.0', 'id', 'preregistration.expired:' || id, 'source', $3::text,
        'type', 'preregistration.expired', 'time', now(), 'subject', id::text,
        'datacontenttype', 'application/json',
        'data', jsonb_build_object('preregistration_id', id, 'partner_id', partner_id, 'status', 'expired',
                                   'previous_status', from_status, 'expires_at', expires_at))
    FROM expired
)
SELECT id FROM expired"
        )
    });
    SQL.as_str()
}

/// Expires up to `batch` due claims (see [`expire_claims_sql`]).
pub async fn expire_due_claims(
    conn: &mut PgConnection,
    batch: i64,
    actor: &str,
    source: &str,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(expire_claims_sql())
        .bind(batch)
        .bind(actor)
        .bind(source)
        .fetch_all(conn)
        .await
}

/// Expires one claim if it can still expire. Returns its partner and expiry.
pub async fn expire_one(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<(Uuid, Option<DateTime<Utc>>)>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE preregistrations SET status = 'expired', updated_at = now()
         WHERE id = $1 AND status IN {}
         RETURNING partner_id, expires_at",
        super::sets::expirable()
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// A claim whose partner is to be reminded of its expiry.
#[derive(Debug, Clone, FromRow)]
pub struct ExpiryReminder {
    pub id: Uuid,
    pub partner_id: Uuid,
    pub expires_at: Option<DateTime<Utc>>,
    pub contact_email: Option<String>,
}

/// Marks up to `batch` claims expiring within `before_ms` as reminded (once
/// each) and returns them with their partner's contact email.
pub async fn mark_expiry_reminders(
    conn: &mut PgConnection,
    batch: i64,
    before_ms: i64,
) -> Result<Vec<ExpiryReminder>, sqlx::Error> {
    sqlx::query_as(&format!(
        "WITH due AS (
            SELECT id FROM preregistrations
            WHERE status IN {} AND expiry_reminder_sent_at IS NULL
              AND expires_at > now() AND expires_at <= now() + $2 * interval '1 millisecond'
            ORDER BY expires_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         )
         UPDATE preregistrations p SET expiry_reminder_sent_at = now()
         FROM due WHERE p.id = due.id AND p.expiry_reminder_sent_at IS NULL
         RETURNING p.id, p.partner_id, p.expires_at,
                   (SELECT contact_email FROM partners WHERE partners.id = p.partner_id) AS contact_email",
        super::sets::expirable()
    ))
    .bind(batch)
    .bind(before_ms)
    .fetch_all(conn)
    .await
}
