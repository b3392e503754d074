//! The intake's group commit: one statement per table for a whole batch of
//! pre-registration requests (`src/intake.rs` decides what goes in).

use serde_json::{json, Value};
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use super::preregs::NewPrereg;

/// One queued pre-registration of a batch: the row, who asked, the request id.
pub struct Queued<'a> {
    pub row: &'a NewPrereg,
    pub actor: &'a str,
    pub request_id: &'a str,
}

/// Inserts the batch's `queued` rows and their `requested` timeline entries.
pub async fn insert_queued(tx: &mut PgConnection, reqs: &[Queued<'_>]) -> Result<(), sqlx::Error> {
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
    sqlx::query(
        "INSERT INTO preregistrations (id, partner_id, full_name, email, mobile, email_norm, mobile_norm, status,
             send_invitation, association_type, locale, tags, remarks, account_manager_id, request_id, search_text)
         SELECT u.id, u.partner_id, u.full_name, u.email, u.mobile, u.email_norm, u.mobile_norm, 'queued',
             u.send, u.kind, u.locale, t.tags, u.remarks, u.am, u.rid,
             lower(concat_ws(' ', u.full_name, u.email, u.remarks, array_to_string(t.tags, ' '),
                 (SELECT name FROM account_managers WHERE id = u.am)))
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::bool[], $9::text[], $10::text[], $11::jsonb[], $12::text[], $13::uuid[], $14::text[])
              WITH ORDINALITY AS u(id, partner_id, full_name, email, mobile, email_norm, mobile_norm,
                     send, kind, locale, tags_json, remarks, am, rid, n)
         CROSS JOIN LATERAL (SELECT ARRAY(SELECT jsonb_array_elements_text(u.tags_json)) AS tags) t
         ORDER BY u.n",
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
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO preregistration_events (preregistration_id, actor, change, from_status, to_status)
         SELECT id, actor, 'requested', NULL, 'queued'
         FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS u(id, actor, n) ORDER BY n",
    )
    .bind(&ids)
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

/// Writes the batch's `preregistration.requested` jobs to the outbox, due
/// after `grace`. Returns `(outbox id, job id)` per row.
pub async fn outbox_jobs(
    tx: &mut PgConnection,
    messages: &[Value],
    grace: std::time::Duration,
) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO outbox (exchange, routing_key, message, publish_after)
         SELECT 'commands', 'preregistration.requested', m, now() + $2
         FROM unnest($1::jsonb[]) WITH ORDINALITY AS t(m, n) ORDER BY n
         RETURNING id, message->>'id' AS job_id",
    )
    .bind(messages)
    .bind(grace)
    .fetch_all(tx)
    .await
}

/// Deletes withdrawn pre-registrations that no worker has touched.
pub async fn delete_queued(tx: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM preregistrations WHERE id = ANY($1) AND status = 'queued'")
        .bind(ids)
        .execute(tx)
        .await?;
    Ok(())
}
