//! The SQL of a batch of registration decisions (`flows::registration`):
//! every read for the whole batch is one `= ANY($1)` statement, rows are
//! locked in a fixed (sorted) order so two workers' batches never deadlock,
//! and the decisions are written (status, timeline, outbox events) by one
//! multi-row statement.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use super::{
    partners::Partner,
    preregs::{self, Prereg, COLUMNS},
    sets,
};
use crate::{
    domain::{AccountFacts, ExistingClaim, Status},
    mq::CloudEvent,
};

/// `ids` sorted, each once: the fixed order in which rows are locked.
fn sorted_unique(ids: &[Uuid]) -> Vec<Uuid> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
}

/// What is stored about a requested id before any lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// A row, with its partner and whether it still waits for a decision.
    Stored { partner_id: Uuid, queued: bool },
    /// No row: the intake undid the request (its job must be skipped).
    Withdrawn,
    /// No row and not withdrawn: an upstream system's command.
    Missing,
}

/// One round trip: what is known about each id (in the order given).
pub async fn lookup<'e>(db: impl PgExecutor<'e>, ids: &[Uuid]) -> Result<Vec<Known>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT p.partner_id, p.status, w.id IS NOT NULL AS withdrawn
         FROM unnest($1::uuid[]) WITH ORDINALITY AS r(id, n)
         LEFT JOIN preregistrations p ON p.id = r.id
         LEFT JOIN withdrawn_commands w ON w.id = r.id
         ORDER BY r.n",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| match r.get::<Option<Uuid>, _>("partner_id") {
            Some(partner_id) => Known::Stored {
                partner_id,
                queued: r.get::<Option<&str>, _>("status") == Some(Status::Queued.as_str()),
            },
            None if r.get::<bool, _>("withdrawn") => Known::Withdrawn,
            None => Known::Missing,
        })
        .collect())
}

/// Locks the rows of `ids` (sorted by id, the fixed order every batch uses)
/// and returns them by id.
pub async fn lock_rows(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Prereg>, sqlx::Error> {
    let sorted = sorted_unique(ids);
    let rows = sqlx::query_as::<_, Prereg>(&format!(
        "SELECT {COLUMNS} FROM preregistrations WHERE id = ANY($1) ORDER BY id FOR UPDATE"
    ))
    .bind(&sorted)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|p| (p.id, p)).collect())
}

/// Locks the partners of a batch in id order (the quota is counted under
/// this lock) and returns them by id.
///
/// `FOR NO KEY UPDATE`, not `FOR UPDATE`: it serialises deciders (and
/// reviews, which take `FOR UPDATE`) on a partner's quota just the same, but
/// does not conflict with the `KEY SHARE` lock that the intake's inserts
/// take on the partner through the foreign key. With `FOR UPDATE` a batch
/// holding many partners stalled the intake, and the intake's batches
/// (holding `KEY SHARE` on many partners) deadlocked with it.
pub async fn lock_partners(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Partner>, sqlx::Error> {
    let sorted = sorted_unique(ids);
    let rows = sqlx::query_as::<_, Partner>(
        "SELECT id, name, country, contact_email, contact_mobile, billing_mode, customer_development, referral, locale,
                created_at, updated_at
         FROM partners WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(&sorted)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|p| (p.id, p)).collect())
}

/// Locks the quota counters of `partners` in id order. A decision batch
/// calls it before its first write: the triggers that keep the counters
/// (see the `partner_quota_usage` migration) would otherwise take them
/// statement by statement, in an order a concurrent sweep could cross.
pub async fn lock_quota(conn: &mut PgConnection, partners: &[Uuid]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT 1 FROM partner_quota_usage WHERE partner_id = ANY($1) ORDER BY partner_id FOR UPDATE",
    )
    .bind(sorted_unique(partners))
    .execute(conn)
    .await?;
    Ok(())
}

/// A claim on a customer, with the customer's keys.
#[derive(Debug, Clone)]
pub struct KeyedClaim {
    pub email_norm: String,
    pub mobile_norm: String,
    pub claim: ExistingClaim,
}

/// Account facts with the customer keys they are stored under.
#[derive(Debug, Clone)]
pub struct KeyedAccount {
    pub email_norm: Option<String>,
    pub mobile_norm: Option<String>,
    pub facts: AccountFacts,
}

/// Everything a batch's decisions read, besides the rows and partners.
#[derive(Debug, Default)]
pub struct Context {
    /// Claims held on any of the batch's emails or mobiles.
    pub claims: Vec<KeyedClaim>,
    /// Accounts known for any of the batch's emails or mobiles.
    pub accounts: Vec<KeyedAccount>,
    /// Per partner of the batch: its customers pending review or holding a
    /// claim (absent: none).
    pub quota: HashMap<Uuid, i64>,
}

/// One round trip: the claims, accounts and quota usage of a batch.
pub async fn context(
    conn: &mut PgConnection,
    emails: &[String],
    mobiles: &[String],
    partners: &[Uuid],
) -> Result<Context, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT
           (SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'partner_id', partner_id, 'status', status,
                     'expires_at', expires_at, 'email_norm', email_norm, 'mobile_norm', mobile_norm)), '[]')
              FROM preregistrations
             WHERE (email_norm = ANY($1) AND status IN {claims})
                OR (mobile_norm = ANY($2) AND status IN {claims})) AS claims,
           (SELECT coalesce(jsonb_agg(jsonb_build_object('email_norm', email_norm, 'mobile_norm', mobile_norm,
                     'facts', facts)), '[]')
              FROM accounts WHERE email_norm = ANY($1) OR mobile_norm = ANY($2)) AS accounts,
           (SELECT coalesce(jsonb_agg(jsonb_build_array(partner_id, active)), '[]')
              FROM partner_quota_usage WHERE partner_id = ANY($3)) AS quota",
        claims = sets::claims(),
    ))
    .bind(emails)
    .bind(mobiles)
    .bind(partners)
    .fetch_one(conn)
    .await?;
    let decode = |e: serde_json::Error| sqlx::Error::Decode(Box::new(e));

    #[derive(serde::Deserialize)]
    struct ClaimRow {
        id: Uuid,
        partner_id: Uuid,
        status: String,
        expires_at: Option<DateTime<Utc>>,
        email_norm: String,
        mobile_norm: String,
    }
    #[derive(serde::Deserialize)]
    struct AccountRow {
        email_norm: Option<String>,
        mobile_norm: Option<String>,
        facts: serde_json::Value,
    }
    let claims: Vec<ClaimRow> = serde_json::from_value(row.get("claims")).map_err(decode)?;
    let accounts: Vec<AccountRow> = serde_json::from_value(row.get("accounts")).map_err(decode)?;
    let quota: Vec<(Uuid, i64)> = serde_json::from_value(row.get("quota")).map_err(decode)?;
    Ok(Context {
        claims: claims
            .into_iter()
            .map(|c| KeyedClaim {
                email_norm: c.email_norm,
                mobile_norm: c.mobile_norm,
                claim: ExistingClaim {
                    id: c.id,
                    partner_id: c.partner_id,
                    status: Status::parse(&c.status).unwrap_or(Status::Preregistered),
                    expires_at: c.expires_at,
                },
            })
            .collect(),
        // Facts that no longer parse are ignored.
        accounts: accounts
            .into_iter()
            .filter_map(|a| {
                Some(KeyedAccount {
                    facts: serde_json::from_value(a.facts).ok()?,
                    email_norm: a.email_norm,
                    mobile_norm: a.mobile_norm,
                })
            })
            .collect(),
        quota: quota.into_iter().collect(),
    })
}

/// One decided pre-registration of a batch.
pub struct Decided<'a> {
    /// Its status columns, as [`preregs::apply`] writes one change.
    pub change: preregs::Change<'a>,
    /// The `preregistration.accepted|rejected` event, written to the outbox.
    pub event: &'a CloudEvent,
}

/// One round trip: every decision's status columns (the statement of
/// [`preregs::apply`]), its `decided` timeline entry (by `actor`) and its
/// event in the outbox, in the order given. The events are due for the relay
/// only `grace` after the commit: the deciding process publishes them itself
/// (`store::outbox::publish_staged`) and the relay steps in only if it
/// could not. Returns the events' outbox ids, in the order given.
pub async fn write(
    conn: &mut PgConnection,
    actor: &str,
    decided: &[Decided<'_>],
    grace: std::time::Duration,
) -> Result<Vec<i64>, sqlx::Error> {
    if decided.is_empty() {
        return Ok(Vec::new());
    }
    let changes: Vec<preregs::Change<'_>> = decided.iter().map(|d| d.change).collect();
    let keys: Vec<&str> = decided.iter().map(|d| d.event.ty.as_str()).collect();
    let events: Vec<serde_json::Value> = decided
        .iter()
        .map(|d| serde_json::to_value(d.event).unwrap_or_default())
        .collect();
    let q = sqlx::query_scalar(concat!(
        "WITH d AS (",
        preregs::changes_sql!(),
        "), e AS (
             SELECT * FROM unnest($10::text[], $11::jsonb[]) WITH ORDINALITY AS t(routing_key, message, n)
         ),
         updated AS (",
        preregs::apply_sql!(),
        " RETURNING p.id),
         timeline AS (
             INSERT INTO preregistration_events (preregistration_id, actor, change, from_status, to_status, reason)
             SELECT id, $9, 'decided', 'queued', status, reason_code FROM d ORDER BY n
         ),
         events AS (
             INSERT INTO outbox (exchange, routing_key, message, publish_after)
             SELECT 'events', routing_key, message, now() + $12 FROM e ORDER BY n
             RETURNING id
         )
         SELECT array_agg(id ORDER BY id) FROM events"
    ));
    let ids: Option<Vec<i64>> = preregs::bind_changes(q, &changes)
        .bind(actor)
        .bind(&keys)
        .bind(&events)
        .bind(grace)
        .fetch_one(conn)
        .await?;
    Ok(ids.unwrap_or_default())
}
