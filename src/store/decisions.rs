//! The SQL of a batch of registration decisions (`flows::registration`):
//! every read for the whole batch is one `= ANY($1)` statement, rows are
//! locked in a fixed (sorted) order so two workers' batches never deadlock,
//! and the decisions are written (status, timeline, outbox events) by one
//! multi-row statement.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool, Postgres, Row, Transaction};
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

/// The `BEGIN` of a decision batch's transactions: every statement in them
/// looks rows up by key (at most a batch of keys), for which index scans and
/// nested loops are always the right plan. Without this, a table that is
/// empty or never analysed when a connection first runs a statement (a new
/// deployment; a server with autovacuum off) gets a sequential scan or a
/// scan of a whole partial index, and the connection keeps that generic plan
/// while the table grows: the decision of a batch of 25 took 7 ms at 20,000
/// rows, reading every claim (see `docs/benchmarks.md`, session 7).
/// JIT is off as well: a statement with no index to use (a trigger's look
/// at a one-row table) keeps its sequential scan, costed as disabled, and
/// that cost would buy it tens of milliseconds of JIT compilation.
const BEGIN_KEYED: &str = "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
                           SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; SET LOCAL jit = off";

/// Begins a transaction planned for lookups by key (see `BEGIN_KEYED`);
/// one round trip.
pub async fn begin_keyed(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with(BEGIN_KEYED).await
}

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

const LOOKUP_SQL: &str = "SELECT p.partner_id, p.status, w.id IS NOT NULL AS withdrawn
         FROM unnest($1::uuid[]) WITH ORDINALITY AS r(id, n)
         LEFT JOIN preregistrations p ON p.id = r.id
         LEFT JOIN withdrawn_commands w ON w.id = r.id
         ORDER BY r.n";

/// One round trip: what is known about each id (in the order given). Run in
/// a [`begin_keyed`] transaction.
pub async fn lookup<'e>(db: impl PgExecutor<'e>, ids: &[Uuid]) -> Result<Vec<Known>, sqlx::Error> {
    let rows = sqlx::query(LOOKUP_SQL).bind(ids).fetch_all(db).await?;
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

fn lock_rows_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!("SELECT {COLUMNS} FROM preregistrations WHERE id = ANY($1) ORDER BY id FOR UPDATE")
    })
}

/// Locks the rows of `ids` (sorted by id, the fixed order every batch uses)
/// and returns them by id.
pub async fn lock_rows(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Prereg>, sqlx::Error> {
    let sorted = sorted_unique(ids);
    let rows = sqlx::query_as::<_, Prereg>(lock_rows_sql())
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

fn context_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "SELECT
               (SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'partner_id', partner_id, 'status', status,
                         'expires_at', expires_at, 'email_norm', email_norm, 'mobile_norm', mobile_norm)), '[]')
                  FROM (SELECT id, partner_id, status, expires_at, email_norm, mobile_norm FROM preregistrations
                         WHERE email_norm = ANY($1) AND status IN {claims}
                        UNION
                        SELECT id, partner_id, status, expires_at, email_norm, mobile_norm FROM preregistrations
                         WHERE mobile_norm = ANY($2) AND status IN {claims}) c) AS claims,
               (SELECT coalesce(jsonb_agg(jsonb_build_object('email_norm', email_norm, 'mobile_norm', mobile_norm,
                         'facts', facts)), '[]')
                  FROM accounts
                 WHERE account_id IN (SELECT account_id FROM accounts WHERE email_norm = ANY($1)
                                      UNION
                                      SELECT account_id FROM accounts WHERE mobile_norm = ANY($2))) AS accounts,
               (SELECT coalesce(jsonb_agg(jsonb_build_array(partner_id, active)), '[]')
                  FROM partner_quota_usage WHERE partner_id = ANY($3)) AS quota",
            claims = sets::claims(),
        )
    })
}

/// One round trip: the claims, accounts and quota usage of a batch. Each
/// key list is looked up on its own index (a `UNION`, not an `OR` that only
/// a bitmap scan can serve).
pub async fn context(
    conn: &mut PgConnection,
    emails: &[String],
    mobiles: &[String],
    partners: &[Uuid],
) -> Result<Context, sqlx::Error> {
    let row = sqlx::query(context_sql())
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

const WRITE_SQL: &str = concat!(
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
    );

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
    let q = sqlx::query_scalar(WRITE_SQL);
    let ids: Option<Vec<i64>> = preregs::bind_changes(q, &changes)
        .bind(actor)
        .bind(&keys)
        .bind(&events)
        .bind(grace)
        .fetch_one(conn)
        .await?;
    Ok(ids.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    //! Plans, read from a real Postgres (`PREREG_TEST_PG`, default the local
    //! server) on a database of its own, fresh from the migrations.

    use serde_json::Value;
    use sqlx::{Connection, Executor};

    use super::*;

    /// The tables a decision batch reads by key.
    const KEYED: [&str; 5] = [
        "preregistrations",
        "accounts",
        "partner_quota_usage",
        "withdrawn_commands",
        "partners",
    ];

    /// Where a plan reads a keyed table other than by an index condition:
    /// a sequential scan, a bitmap scan, or an index scanned whole.
    fn scans(plan: &Value, out: &mut Vec<String>) {
        let relation = plan["Relation Name"].as_str().unwrap_or("");
        let node = plan["Node Type"].as_str().unwrap_or("");
        if KEYED.contains(&relation) {
            let keyed = matches!(node, "Index Scan" | "Index Only Scan")
                && plan.get("Index Cond").is_some();
            if !keyed && node != "ModifyTable" {
                out.push(format!("{node} on {relation}"));
            }
        }
        for child in plan["Plans"].as_array().into_iter().flatten() {
            scans(child, out);
        }
    }

    /// Each statement's generic plan (what a connection caches once it has
    /// run the statement a few times) inside a [`begin_keyed`] transaction,
    /// on tables that are empty and never analysed: the state in which the
    /// planner prefers to read whole tables.
    #[tokio::test]
    async fn a_decision_batchs_statements_are_planned_as_lookups_by_key_on_an_empty_table() {
        let server = std::env::var("PREREG_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!("prereg_plans_{}", Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(&format!("{server}/postgres"))
            .await
            .expect("postgres");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        let pool = PgPool::connect(&format!("{server}/{name}")).await.unwrap();
        crate::store::migrate(&pool).await.unwrap();

        let statements: [(&str, &str, &str); 4] = [
            ("lookup", "uuid[]", LOOKUP_SQL),
            ("lock_rows", "uuid[]", lock_rows_sql()),
            ("context", "text[], text[], uuid[]", context_sql()),
            (
                "write",
                "uuid[], text[], text[], text[], bool[], uuid[], timestamptz[], timestamptz[], \
                 text, text[], jsonb[], interval",
                WRITE_SQL,
            ),
        ];
        // A statement that must read a table whole (a trigger's look at a
        // one-row table) is costed as disabled: without JIT off, that cost
        // buys it tens of milliseconds of compilation.
        let mut tx = begin_keyed(&pool).await.unwrap();
        let jit: String = sqlx::query_scalar("SELECT current_setting('jit')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(jit, "off");
        tx.rollback().await.unwrap();

        let mut wrong: Vec<String> = Vec::new();
        for (what, types, sql) in statements {
            let mut tx = begin_keyed(&pool).await.unwrap();
            sqlx::raw_sql("SET LOCAL plan_cache_mode = force_generic_plan")
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::raw_sql(&format!("PREPARE s ({types}) AS {sql}"))
                .execute(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let nulls = vec!["NULL"; types.split(',').count()].join(", ");
            let (plan,): (Value,) =
                sqlx::query_as(&format!("EXPLAIN (FORMAT JSON) EXECUTE s ({nulls})"))
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
            let mut found = Vec::new();
            scans(&plan[0]["Plan"], &mut found);
            wrong.extend(found.into_iter().map(|f| format!("{what}: {f}")));
            sqlx::raw_sql("DEALLOCATE s")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.rollback().await.unwrap();
        }
        pool.close().await;
        admin
            .execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
            .await
            .unwrap();
        assert!(wrong.is_empty(), "not planned by key: {wrong:?}");
    }
}
