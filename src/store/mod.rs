//! Postgres store (sqlx, runtime-checked queries).

pub mod accounts;
pub mod calendar;
pub mod dashboard;
pub mod decisions;
pub mod deliveries;
pub mod history;
pub mod idempotency;
pub mod intake;
pub mod invitations;
pub mod keys;
pub mod outbox;
pub mod partners;
pub mod preregs;
pub mod reviews;
pub mod sets;
pub mod undo;

use std::time::Duration;

use serde_json::Value;
use sqlx::{postgres::PgPoolOptions, PgConnection, PgPool};
use uuid::Uuid;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A lazily connecting pool: the process starts even while Postgres is down
/// and reconnects on its own.
pub fn connect(url: &str, max: u32) -> Result<PgPool, sqlx::Error> {
    connect_with(url, max, Duration::from_secs(5), Duration::ZERO)
}

/// Like [`connect`], with the pool's acquire timeout and the connections'
/// `statement_timeout` (zero: none). The timeout travels as a startup
/// parameter, so it costs no round trip; a transaction may still lift it
/// with `SET LOCAL statement_timeout`.
pub fn connect_with(
    url: &str,
    max: u32,
    acquire_timeout: Duration,
    statement_timeout: Duration,
) -> Result<PgPool, sqlx::Error> {
    let mut opts: sqlx::postgres::PgConnectOptions = url.parse()?;
    if !statement_timeout.is_zero() {
        opts = opts.options([(
            "statement_timeout",
            format!("{}ms", statement_timeout.as_millis()),
        )]);
    }
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .min_connections(1)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(true)
        .connect_lazy_with(opts))
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Postgres SQLSTATE of an error, if it came from the server.
pub fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
        _ => None,
    }
}

pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    sqlstate(e).as_deref() == Some("23505")
}

/// Serialization failures and deadlocks: run the transaction again.
pub fn is_transient(e: &sqlx::Error) -> bool {
    matches!(
        sqlstate(e).as_deref(),
        Some("40001" | "40P01" | "55P03" | "57P01")
    ) || matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    )
}

/// One entry of a pre-registration's timeline.
pub struct TimelineEntry<'a> {
    pub preregistration_id: Uuid,
    pub actor: &'a str,
    pub change: &'a str,
    pub from_status: Option<&'a str>,
    pub to_status: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub details: Option<Value>,
}

pub async fn record(conn: &mut PgConnection, t: TimelineEntry<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO preregistration_events (preregistration_id, actor, change, from_status, to_status, reason, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(t.preregistration_id)
    .bind(t.actor)
    .bind(t.change)
    .bind(t.from_status)
    .bind(t.to_status)
    .bind(t.reason)
    .bind(t.details)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn audit(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    target: Option<&str>,
    details: Option<Value>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO audit_log (actor, action, target, details) VALUES ($1, $2, $3, $4)")
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(details)
        .execute(conn)
        .await?;
    Ok(())
}

/// The transaction's commit does not wait for the WAL flush: for work whose
/// loss in a crash only means doing it again with the same ids.
pub async fn relaxed_commit(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(conn)
        .await?;
    Ok(())
}

/// Postgres answers a trivial query (health checks).
pub async fn ping<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
}

/// `get` (the row with an id) and `get_for_update` (the same, locked until
/// the transaction ends) of a table whose module builds its statements with
/// `select(condition)`.
macro_rules! by_id {
    ($row:ty) => {
        /// The row with `id`, if any.
        pub async fn get<'e>(
            db: impl sqlx::PgExecutor<'e>,
            id: uuid::Uuid,
        ) -> Result<Option<$row>, sqlx::Error> {
            super::row_by(db, select("id = $1"), id).await
        }

        /// The row with `id`, locked until the transaction ends.
        pub async fn get_for_update(
            conn: &mut sqlx::PgConnection,
            id: uuid::Uuid,
        ) -> Result<Option<$row>, sqlx::Error> {
            super::row_by(conn, select("id = $1 FOR UPDATE"), id).await
        }
    };
}
pub(crate) use by_id;

/// A row type `row_by`/`rows_by` can map a result row into.
pub(crate) trait Row:
    for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin
{
}
impl<T> Row for T where T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin {}

/// A value `row_by`/`rows_by` can bind as `$1`.
pub(crate) trait Key:
    for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send
{
}
impl<K> Key for K where
    K: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send
{
}

/// The row `sql` (a statement with one parameter, `$1 = key`) returns, if any.
pub(crate) async fn row_by<'e, T: Row, K: Key>(
    db: impl sqlx::PgExecutor<'e>,
    sql: String,
    key: K,
) -> Result<Option<T>, sqlx::Error> {
    sqlx::query_as::<_, T>(&sql)
        .bind(key)
        .fetch_optional(db)
        .await
}

/// The rows `sql` (a statement with one parameter, `$1 = key`) returns.
pub(crate) async fn rows_by<'e, T: Row, K: Key>(
    db: impl sqlx::PgExecutor<'e>,
    sql: String,
    key: K,
) -> Result<Vec<T>, sqlx::Error> {
    sqlx::query_as::<_, T>(&sql).bind(key).fetch_all(db).await
}
