//! The intake's group commit: one statement per table for a whole batch of
//! pre-registration requests (`src/intake.rs` decides what goes in).

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use super::preregs::NewPrereg;
use crate::{
    jobs::{Job, PreregistrationRequested},
    mq::CloudEvent,
};

/// The `preregistration.requested` job of a stored request: its id is the
/// pre-registration's (so a copy is recognised), correlated with the HTTP
/// request that asked for it.
pub fn job(cmd: &NewPrereg, request_id: Option<&str>) -> CloudEvent {
    let payload = serde_json::to_value(PreregistrationRequested::from(cmd))
        .expect("a job of strings, booleans and ids always serialises");
    CloudEvent::with_id(cmd.id.to_string(), PreregistrationRequested::TYPE, payload)
        .subject(cmd.id)
        .correlation(request_id.map(str::to_string))
}

/// One queued pre-registration of a batch: the row, who asked, the request id.
pub struct Queued<'a> {
    pub row: &'a NewPrereg,
    pub actor: &'a str,
    pub request_id: &'a str,
}

/// Inserts the batch's `queued` rows and their `requested` timeline entries.
/// Each row is due for republishing after `grace` (see
/// [`lease_stale_queued`]) unless a worker has decided it by then.
pub async fn insert_queued(
    tx: &mut PgConnection,
    reqs: &[Queued<'_>],
    grace: Duration,
) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = reqs.iter().map(|r| r.row.id).collect();
    let partners: Vec<Uuid> = reqs.iter().map(|r| r.row.partner_id).collect();
    let names: Vec<&str> = reqs.iter().map(|r| r.row.full_name.as_str()).collect();
    let emails: Vec<&str> = reqs.iter().map(|r| r.row.email.as_str()).collect();
    let mobiles: Vec<&str> = reqs.iter().map(|r| r.row.mobile.as_str()).collect();
    let email_norms: Vec<String> = reqs
        .iter()
        .map(|r| crate::domain::normalize_email(&r.row.email))
        .collect();
    let mobile_norms: Vec<String> = reqs
        .iter()
        .map(|r| crate::domain::normalize_mobile(&r.row.mobile))
        .collect();
    let send: Vec<bool> = reqs.iter().map(|r| r.row.send_invitation).collect();
    let kinds: Vec<Option<&str>> = reqs
        .iter()
        .map(|r| r.row.association_type.as_deref())
        .collect();
    let locales: Vec<Option<&str>> = reqs.iter().map(|r| r.row.locale.as_deref()).collect();
    // Tags differ in length per row: passed as JSON arrays.
    let tags: Vec<Value> = reqs.iter().map(|r| json!(r.row.tags)).collect();
    let remarks: Vec<Option<&str>> = reqs.iter().map(|r| r.row.remarks.as_deref()).collect();
    let managers: Vec<Option<Uuid>> = reqs.iter().map(|r| r.row.account_manager_id).collect();
    let rids: Vec<&str> = reqs.iter().map(|r| r.request_id).collect();
    let actors: Vec<&str> = reqs.iter().map(|r| r.actor).collect();
    // One round trip: the rows, their timeline entries (the foreign key is
    // checked at the end of the statement, when the rows exist) and the
    // transaction's relaxed commit (the confirmed job carries the whole
    // request and a worker recreates a row lost in a crash; a job whose
    // confirm never came makes the intake commit synchronously before it
    // answers, see `src/intake.rs`).
    sqlx::query(
        "WITH u AS (
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::bool[], $9::text[], $10::text[], $11::jsonb[], $12::text[], $13::uuid[], $14::text[], $16::text[])
                  WITH ORDINALITY AS u(id, partner_id, full_name, email, mobile, email_norm, mobile_norm,
                     send, kind, locale, tags_json, remarks, am, rid, actor, n)),
              relaxed AS (SELECT set_config('synchronous_commit', 'off', true) AS setting),
              rows AS (
                 INSERT INTO preregistrations (id, partner_id, full_name, email, mobile, email_norm, mobile_norm, status,
                     send_invitation, association_type, locale, tags, remarks, account_manager_id, request_id, republish_at, search_text)
                 SELECT u.id, u.partner_id, u.full_name, u.email, u.mobile, u.email_norm, u.mobile_norm, 'queued',
                     u.send, u.kind, u.locale, t.tags, u.remarks, u.am, u.rid, now() + $15,
                     lower(concat_ws(' ', u.full_name, u.email, u.remarks, array_to_string(t.tags, ' '),
                         (SELECT name FROM account_managers WHERE id = u.am)))
                 FROM u CROSS JOIN relaxed
                 CROSS JOIN LATERAL (SELECT ARRAY(SELECT jsonb_array_elements_text(u.tags_json)) AS tags) t
                 ORDER BY u.n
                 RETURNING id)
         INSERT INTO preregistration_events (preregistration_id, actor, change, from_status, to_status)
         SELECT u.id, u.actor, 'requested', NULL, 'queued' FROM u JOIN rows USING (id) ORDER BY u.n",
    )
    .bind(&ids)
    .bind(&partners)
    .bind(&names)
    .bind(&emails)
    .bind(&mobiles)
    .bind(&email_norms)
    .bind(&mobile_norms)
    .bind(&send)
    .bind(&kinds)
    .bind(&locales)
    .bind(&tags)
    .bind(&remarks)
    .bind(&managers)
    .bind(&rids)
    .bind(grace)
    .bind(&actors)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The keys of a batch with their first answers (202), column by column.
pub struct KeyClaims<'a> {
    pub principals: Vec<&'a str>,
    pub keys: Vec<&'a str>,
    pub hashes: Vec<Vec<u8>>,
    pub bodies: Vec<Value>,
    pub locations: Vec<Option<&'a str>>,
}

/// Claims the keys (in the given order). Returns the `(principal, key)`
/// pairs this batch claimed; the others are held by earlier requests.
pub async fn claim_keys(
    tx: &mut PgConnection,
    c: &KeyClaims<'_>,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO idempotency_keys (principal, key, request_hash, status, body, location)
         SELECT p, k, h, 202, b, l
         FROM unnest($1::text[], $2::text[], $3::bytea[], $4::jsonb[], $5::text[]) WITH ORDINALITY AS t(p, k, h, b, l, n)
         ORDER BY n
         ON CONFLICT (principal, key) DO NOTHING
         RETURNING principal, key",
    )
    .bind(&c.principals)
    .bind(&c.keys)
    .bind(&c.hashes)
    .bind(&c.bodies)
    .bind(&c.locations)
    .fetch_all(tx)
    .await
}

/// A stored key with its first answer.
#[derive(Debug, Clone, FromRow)]
pub struct StoredKey {
    pub principal: String,
    pub key: String,
    pub request_hash: Vec<u8>,
    pub status: i16,
    pub body: Value,
    pub location: Option<String>,
}

/// The stored keys among `(principals[i], keys[i])`.
pub async fn stored_keys(
    tx: &mut PgConnection,
    principals: &[&str],
    keys: &[&str],
) -> Result<Vec<StoredKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT principal, key, request_hash, status, body, location FROM idempotency_keys
         WHERE (principal, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    )
    .bind(principals)
    .bind(keys)
    .fetch_all(tx)
    .await
}

/// Forgets the keys `(principals[i], keys[i])` (their commands were withdrawn).
pub async fn forget_keys(
    tx: &mut PgConnection,
    principals: &[&str],
    keys: &[&str],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE (principal, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    )
    .bind(principals)
    .bind(keys)
    .execute(tx)
    .await?;
    Ok(())
}

/// Withdraws pre-registrations whose job the broker certainly refused:
/// deletes the rows no worker and no republisher has touched, and records
/// them, so that a copy of the job that still reaches the broker (held back
/// by an alarm, then released) is skipped instead of recreating what was
/// undone. Returns the ids withdrawn.
pub async fn withdraw_queued(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH gone AS (DELETE FROM preregistrations
                       WHERE id = ANY($1) AND status = 'queued' AND republishes = 0
                       RETURNING id),
              recorded AS (INSERT INTO withdrawn_commands (id) SELECT id FROM gone ON CONFLICT DO NOTHING)
         SELECT id FROM gone",
    )
    .bind(ids)
    .fetch_all(tx)
    .await
}

/// Makes the batch's rows whose job may not have reached the broker durable
/// (the caller commits synchronously, which also flushes the batch's own
/// asynchronous commit) and keeps them due for republishing after `grace`.
pub async fn keep_queued(
    tx: &mut PgConnection,
    ids: &[Uuid],
    grace: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE preregistrations SET republish_at = now() + $2 WHERE id = ANY($1) AND status = 'queued'",
    )
    .bind(ids)
    .bind(grace)
    .execute(tx)
    .await?;
    Ok(())
}

/// A `queued` row due for republishing, with what its job carries.
#[derive(Debug, FromRow)]
pub struct StaleQueued {
    #[sqlx(flatten)]
    pub cmd: NewPrereg,
    pub request_id: Option<String>,
    /// Seconds since the row was written.
    pub age: f64,
}

impl StaleQueued {
    pub fn job(&self) -> CloudEvent {
        job(&self.cmd, self.request_id.as_deref())
    }
}

/// Leases up to `limit` rows still `queued` past their `republish_at` (the
/// intake died before its job was confirmed, or the confirm never came) for
/// republishing: one statement moves each row's `republish_at` ahead by the
/// row's age (at least `min_wait`), so a row is republished at ages of about
/// 1, 2, 4, 8… grace periods and never in a loop, and `SKIP LOCKED` keeps
/// two relays off the same rows. No transaction is held across the publish.
pub async fn lease_stale_queued(
    pool: &PgPool,
    limit: i64,
    min_wait: Duration,
) -> Result<Vec<StaleQueued>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE preregistrations p
         SET republish_at = now() + GREATEST($2, now() - p.created_at), republishes = p.republishes + 1
         WHERE p.id IN (SELECT id FROM preregistrations
                        WHERE status = 'queued' AND republish_at <= now()
                        ORDER BY republish_at LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING p.id, p.partner_id, p.full_name, p.email, p.mobile, p.send_invitation, p.association_type,
                   p.locale, p.tags, p.remarks, p.account_manager_id, p.request_id,
                   EXTRACT(EPOCH FROM now() - p.created_at)::float8 AS age",
    )
    .bind(limit)
    .bind(min_wait)
    .fetch_all(pool)
    .await
}

/// Rows whose republish failed: due again after `after`.
pub async fn retry_stale(pool: &PgPool, ids: &[Uuid], after: Duration) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE preregistrations SET republish_at = now() + $2 WHERE id = ANY($1) AND status = 'queued'",
    )
    .bind(ids)
    .bind(after)
    .execute(pool)
    .await?;
    Ok(())
}

/// How long until the next `queued` row is due for republishing.
pub async fn next_stale(pool: &PgPool) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT GREATEST(EXTRACT(EPOCH FROM min(republish_at) - now()), 0)::float8
         FROM preregistrations WHERE status = 'queued' AND republish_at IS NOT NULL",
    )
    .fetch_one(pool)
    .await
}
