//! Invitations (email and offline) and association attempts.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, FromRow)]
pub struct Invitation {
    pub id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    pub association_type: String,
    pub method: String,
    pub locale: String,
    pub status: String,
    pub nonce: Vec<u8>,
    pub code_hash: Option<Vec<u8>>,
    pub link_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub sending_since: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub failure: Option<String>,
    pub used_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, preregistration_id, partner_id, association_type, method, locale, status, nonce, code_hash,
    link_expires_at, created_at, activated_at, sending_since, sent_at, attempts, failure, used_at";

/// `SELECT` of every column of `invitations` rows matching `condition`.
fn select(condition: &str) -> String {
    format!("SELECT {COLUMNS} FROM invitations WHERE {condition}")
}

pub struct NewInvitation<'a> {
    pub id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    pub association_type: &'a str,
    pub method: &'a str,
    pub locale: &'a str,
    pub status: &'a str,
    pub nonce: &'a [u8],
    pub token_hash: &'a [u8],
    pub code_hash: Option<&'a [u8]>,
    pub link_expires_at: Option<DateTime<Utc>>,
    pub request_id: Option<&'a str>,
}

pub async fn insert(conn: &mut PgConnection, n: &NewInvitation<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO invitations (id, preregistration_id, partner_id, association_type, method, locale, status, nonce,
             token_hash, code_hash, link_expires_at, request_id, activated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, CASE WHEN $5 = 'offline' THEN now() END)",
    )
    .bind(n.id)
    .bind(n.preregistration_id)
    .bind(n.partner_id)
    .bind(n.association_type)
    .bind(n.method)
    .bind(n.locale)
    .bind(n.status)
    .bind(n.nonce)
    .bind(n.token_hash)
    .bind(n.code_hash)
    .bind(n.link_expires_at)
    .bind(n.request_id)
    .execute(conn)
    .await?;
    Ok(())
}

super::by_id!(Invitation);

pub async fn by_token_hash_for_update(
    conn: &mut PgConnection,
    hash: &[u8],
) -> Result<Option<Invitation>, sqlx::Error> {
    super::row_by(conn, select("token_hash = $1 FOR UPDATE"), hash).await
}

pub async fn by_code_hash_for_update(
    conn: &mut PgConnection,
    hash: &[u8],
) -> Result<Option<Invitation>, sqlx::Error> {
    super::row_by(conn, select("code_hash = $1 FOR UPDATE"), hash).await
}

/// Every invitation of a pre-registration, newest first.
pub async fn for_prereg<'e>(
    db: impl PgExecutor<'e>,
    prereg_id: Uuid,
) -> Result<Vec<Invitation>, sqlx::Error> {
    super::rows_by(
        db,
        select("preregistration_id = $1 ORDER BY created_at DESC, id DESC"),
        prereg_id,
    )
    .await
}

/// Links of a pre-registration other than `keep` stop working. Returns the
/// superseded ids.
pub async fn supersede_others(
    conn: &mut PgConnection,
    prereg_id: Uuid,
    keep: Uuid,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "UPDATE invitations SET status = 'superseded', sending_since = NULL
         WHERE preregistration_id = $1 AND id <> $2 AND status IN {} AND activated_at IS NOT NULL
         RETURNING id",
        super::sets::links_outstanding()
    ))
    .bind(prereg_id)
    .bind(keep)
    .fetch_all(conn)
    .await
}

/// Ends every live link of a pre-registration (deletion, expiry).
pub async fn end_all(
    conn: &mut PgConnection,
    prereg_id: Uuid,
    status: &str,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(&format!(
        "UPDATE invitations SET status = $2, sending_since = NULL WHERE preregistration_id = $1 AND status IN {}",
        super::sets::links_outstanding()
    ))
    .bind(prereg_id)
    .bind(status)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

pub async fn set_status(
    conn: &mut PgConnection,
    id: Uuid,
    status: &str,
    failure: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE invitations SET status = $2, failure = COALESCE($3, failure), sending_since = NULL,
            sent_at = CASE WHEN $2 = 'sent' THEN now() ELSE sent_at END,
            used_at = CASE WHEN $2 = 'accepted' THEN now() ELSE used_at END
         WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(failure)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Attempt {
    pub id: Uuid,
    pub account_id: String,
    pub invitation_id: Option<Uuid>,
    pub status: String,
    pub cause_code: Option<String>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub token_hash: Option<Vec<u8>>,
    #[serde(skip)]
    pub code_hash: Option<Vec<u8>>,
}

pub async fn insert_attempt(
    conn: &mut PgConnection,
    id: Uuid,
    account_id: &str,
    token_hash: Option<&[u8]>,
    code_hash: Option<&[u8]>,
    submitted_by: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO association_attempts (id, account_id, token_hash, code_hash, status, submitted_by) VALUES ($1, $2, $3, $4, 'queued', $5)",
    )
    .bind(id)
    .bind(account_id)
    .bind(token_hash)
    .bind(code_hash)
    .bind(submitted_by)
    .execute(conn)
    .await?;
    Ok(())
}

/// Attempts of `submitted_by` within the last `window` that did not succeed
/// (failed, or still queued and so possibly failing).
pub async fn unsuccessful_attempts_by<'e>(
    db: impl PgExecutor<'e>,
    submitted_by: &str,
    window: std::time::Duration,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM association_attempts
         WHERE submitted_by = $1 AND status <> 'succeeded'
           AND created_at > now() - make_interval(secs => $2)",
    )
    .bind(submitted_by)
    .bind(window.as_secs_f64())
    .fetch_one(db)
    .await
}

/// The invitation a link token or an offline code (hashes) belongs to, and
/// its failed attempts within the last `window`.
pub async fn failed_attempts_on<'e>(
    db: impl PgExecutor<'e>,
    token_hash: Option<&[u8]>,
    code_hash: Option<&[u8]>,
    window: std::time::Duration,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM association_attempts a
         WHERE a.status = 'failed' AND a.decided_at > now() - make_interval(secs => $3)
           AND a.invitation_id = (SELECT i.id FROM invitations i
                WHERE ($1::bytea IS NOT NULL AND i.token_hash = $1)
                   OR ($2::bytea IS NOT NULL AND i.code_hash = $2)
                LIMIT 1)",
    )
    .bind(token_hash)
    .bind(code_hash)
    .bind(window.as_secs_f64())
    .fetch_one(db)
    .await
}

const ATTEMPT_COLUMNS: &str = "id, account_id, invitation_id, status, cause_code, created_at, decided_at, token_hash, code_hash";

pub async fn get_attempt<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
) -> Result<Option<Attempt>, sqlx::Error> {
    super::row_by(
        db,
        format!("SELECT {ATTEMPT_COLUMNS} FROM association_attempts WHERE id = $1"),
        id,
    )
    .await
}

pub async fn get_attempt_for_update(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<Attempt>, sqlx::Error> {
    super::row_by(
        conn,
        format!("SELECT {ATTEMPT_COLUMNS} FROM association_attempts WHERE id = $1 FOR UPDATE"),
        id,
    )
    .await
}

pub async fn decide_attempt(
    conn: &mut PgConnection,
    id: Uuid,
    invitation_id: Option<Uuid>,
    cause: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE association_attempts SET status = CASE WHEN $3::text IS NULL THEN 'succeeded' ELSE 'failed' END,
            cause_code = $3, invitation_id = COALESCE($2, invitation_id), decided_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(invitation_id)
    .bind(cause)
    .execute(conn)
    .await?;
    Ok(())
}

/// What the landing page of a link needs to know.
#[derive(Debug, Clone, FromRow)]
pub struct LinkRow {
    pub status: String,
    pub locale: String,
    pub link_expires_at: Option<DateTime<Utc>>,
    pub activated: bool,
    /// The claim can still be associated (expirable and not past its expiry).
    pub claim_live: bool,
}

pub async fn link_by_token_hash<'e>(
    db: impl PgExecutor<'e>,
    token_hash: &[u8],
) -> Result<Option<LinkRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT i.status, i.locale, i.link_expires_at, i.activated_at IS NOT NULL AS activated,
                (p.status IN {} AND (p.expires_at IS NULL OR p.expires_at > now())) AS claim_live
           FROM invitations i JOIN preregistrations p ON p.id = i.preregistration_id
          WHERE i.token_hash = $1",
        super::sets::expirable()
    ))
    .bind(token_hash)
    .fetch_optional(db)
    .await
}

/// An invitation and its pre-registration.
#[derive(Debug, Clone, Copy, FromRow)]
pub struct LinkRef {
    pub id: Uuid,
    pub preregistration_id: Uuid,
}

/// Expires the outstanding links of the given (expired) claims.
pub async fn expire_for_claims(
    conn: &mut PgConnection,
    claims: &[Uuid],
) -> Result<Vec<LinkRef>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE invitations SET status = 'expired'
         WHERE preregistration_id = ANY($1) AND status IN {}
         RETURNING id, preregistration_id",
        super::sets::links_outstanding()
    ))
    .bind(claims)
    .fetch_all(conn)
    .await
}

/// Expires up to `batch` outstanding links past their own expiry.
pub async fn expire_due_links(
    conn: &mut PgConnection,
    batch: i64,
) -> Result<Vec<LinkRef>, sqlx::Error> {
    let outstanding = super::sets::links_outstanding();
    sqlx::query_as(&format!(
        "WITH due AS (
            SELECT id FROM invitations
            WHERE status IN {outstanding} AND link_expires_at <= now()
            ORDER BY link_expires_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         )
         UPDATE invitations i SET status = 'expired' FROM due
         WHERE i.id = due.id AND i.status IN {outstanding}
         RETURNING i.id, i.preregistration_id"
    ))
    .bind(batch)
    .fetch_all(conn)
    .await
}

/// An offline link is handed out at once: sent now.
pub async fn sent_now(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE invitations SET sent_at = now() WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

// Batched statements of the email worker: one batch of deliveries is leased
// in one transaction and its results recorded in another, each a handful
// of statements whatever the batch size.

/// Locks the invitations `ids` (in id order, so two workers' batches never
/// deadlock on them) and returns those that exist.
pub async fn lock_many(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<Invitation>, sqlx::Error> {
    super::rows_by(conn, select("id = ANY($1) ORDER BY id FOR UPDATE"), ids).await
}

/// Locks the pre-registrations `ids` (in id order) and returns those that
/// exist.
pub async fn lock_claims(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<super::preregs::Prereg>, sqlx::Error> {
    super::rows_by(
        conn,
        format!(
            "SELECT {} FROM preregistrations WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            super::preregs::COLUMNS
        ),
        ids,
    )
    .await
}

/// One invitation of a batch with its pre-registration and creation time,
/// as [`newer_activated_many`] reads it.
pub struct Candidate {
    pub id: Uuid,
    pub preregistration_id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// The ids of those of `c` (each of another pre-registration) that a newer
/// invitation of their pre-registration, already activated, supersedes.
pub async fn newer_activated_many(
    conn: &mut PgConnection,
    c: &[Candidate],
) -> Result<Vec<Uuid>, sqlx::Error> {
    if c.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = c.iter().map(|c| c.id).collect();
    let preregs: Vec<Uuid> = c.iter().map(|c| c.preregistration_id).collect();
    let created: Vec<DateTime<Utc>> = c.iter().map(|c| c.created_at).collect();
    sqlx::query_scalar(
        "SELECT c.id FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) AS c(id, prereg, created)
         WHERE EXISTS (SELECT 1 FROM invitations o WHERE o.preregistration_id = c.prereg AND o.id <> c.id
                         AND o.activated_at IS NOT NULL AND o.created_at > c.created)",
    )
    .bind(&ids)
    .bind(&preregs)
    .bind(&created)
    .fetch_all(conn)
    .await
}

/// An invitation going out for the first time: its claim becomes `invited`.
pub struct FirstSend<'a> {
    pub invitation_id: Uuid,
    pub preregistration_id: Uuid,
    /// The claim's status before (for its timeline entry).
    pub from_status: &'a str,
    pub link_expires_at: Option<DateTime<Utc>>,
    pub association_type: &'a str,
}

/// Takes the delivery leases of `lease` in one statement; for the invitations
/// of `first` (each of another pre-registration) also what
/// [`supersede_others`], `preregs::mark_invited` (`email`) and the `invited`
/// timeline entry (by `actor`) do one at a time. Returns the superseded ids.
pub async fn begin_sending_many(
    conn: &mut PgConnection,
    actor: &str,
    first: &[FirstSend<'_>],
    lease: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    let inv: Vec<Uuid> = first.iter().map(|f| f.invitation_id).collect();
    let prereg: Vec<Uuid> = first.iter().map(|f| f.preregistration_id).collect();
    let from: Vec<&str> = first.iter().map(|f| f.from_status).collect();
    let expires: Vec<Option<DateTime<Utc>>> = first.iter().map(|f| f.link_expires_at).collect();
    let types: Vec<&str> = first.iter().map(|f| f.association_type).collect();
    // Each sub-statement updates other rows (the superseded invitations
    // belong to `first`'s claims and are not `first`'s own; a leased one
    // of such a claim is that claim's `first`), as one statement must.
    sqlx::query_scalar(&format!(
        "WITH f AS (
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::text[])
                 WITH ORDINALITY AS t(inv, prereg, from_status, link_expires_at, association_type, n)
         ),
         sup AS (
             UPDATE invitations o SET status = 'superseded', sending_since = NULL FROM f
             WHERE o.preregistration_id = f.prereg AND o.id <> f.inv AND o.status IN {}
               AND o.activated_at IS NOT NULL
             RETURNING o.id
         ),
         invited AS (
             UPDATE preregistrations p SET status = 'invited', invited_at = COALESCE(p.invited_at, now()),
                 last_method = 'email', link_expires_at = f.link_expires_at, updated_at = now()
             FROM f WHERE p.id = f.prereg
         ),
         timeline AS (
             INSERT INTO preregistration_events (preregistration_id, actor, change, from_status, to_status, details)
             SELECT prereg, $7, 'invited', from_status, 'invited',
                    jsonb_build_object('invitation_id', inv, 'association_type', association_type)
             FROM f ORDER BY n
         ),
         leased AS (
             UPDATE invitations SET activated_at = COALESCE(activated_at, now()), sending_since = now(),
                 attempts = attempts + 1
             WHERE id = ANY($6)
         )
         SELECT id FROM sup",
        super::sets::links_outstanding()
    ))
    .bind(&inv)
    .bind(&prereg)
    .bind(&from)
    .bind(&expires)
    .bind(&types)
    .bind(lease)
    .bind(actor)
    .fetch_all(conn)
    .await
}

/// Ends many invitations at once: each gets its status and failure reason
/// (kept when `None`), and loses its lease.
pub async fn end_many(
    conn: &mut PgConnection,
    ended: &[(Uuid, &str, Option<&str>)],
) -> Result<(), sqlx::Error> {
    if ended.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = ended.iter().map(|e| e.0).collect();
    let statuses: Vec<&str> = ended.iter().map(|e| e.1).collect();
    let failures: Vec<Option<&str>> = ended.iter().map(|e| e.2).collect();
    sqlx::query(
        "UPDATE invitations i SET status = e.status, failure = COALESCE(e.failure, i.failure), sending_since = NULL
         FROM unnest($1::uuid[], $2::text[], $3::text[]) AS e(id, status, failure)
         WHERE i.id = e.id",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&failures)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks many live (`queued`) invitations failed, each with its reason.
/// Returns those that were still live, with their pre-registration.
pub async fn fail_many(
    conn: &mut PgConnection,
    failed: &[(Uuid, &str)],
) -> Result<Vec<LinkRef>, sqlx::Error> {
    if failed.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = failed.iter().map(|f| f.0).collect();
    let reasons: Vec<&str> = failed.iter().map(|f| f.1).collect();
    sqlx::query_as(
        "UPDATE invitations i SET status = 'failed', failure = f.reason, sending_since = NULL
         FROM unnest($1::uuid[], $2::text[]) AS f(id, reason)
         WHERE i.id = f.id AND i.status = 'queued'
         RETURNING i.id, i.preregistration_id",
    )
    .bind(&ids)
    .bind(&reasons)
    .fetch_all(conn)
    .await
}

/// The mail server accepted these invitations' emails.
pub async fn mark_sent_many(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE invitations SET status = CASE WHEN status = 'queued' THEN 'sent' ELSE status END, sent_at = now(), sending_since = NULL, failure = NULL WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Releases the delivery leases; `uncount` takes the attempt back (it
/// never reached the mail server).
pub async fn release_many(
    conn: &mut PgConnection,
    ids: &[Uuid],
    uncount: bool,
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let sql = if uncount {
        "UPDATE invitations SET sending_since = NULL, attempts = greatest(attempts - 1, 0) WHERE id = ANY($1)"
    } else {
        "UPDATE invitations SET sending_since = NULL WHERE id = ANY($1)"
    };
    sqlx::query(sql).bind(ids).execute(conn).await?;
    Ok(())
}
