//! Transactional outbox: events are written in the same transaction as the
//! change they describe, then published (with confirms) and deleted by a relay.

use std::{sync::Arc, time::Duration};

use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::mq::{Broker, CloudEvent};

pub async fn event(conn: &mut PgConnection, ev: &CloudEvent) -> Result<(), sqlx::Error> {
    push(conn, "events", ev).await
}

pub async fn command(conn: &mut PgConnection, ev: &CloudEvent) -> Result<(), sqlx::Error> {
    push(conn, "commands", ev).await
}

/// Writes many events in one statement (sweeps touch thousands of rows per
/// transaction).
pub async fn events(conn: &mut PgConnection, evs: &[CloudEvent]) -> Result<(), sqlx::Error> {
    push_many(conn, "events", evs).await
}

/// Writes many commands in one statement.
pub async fn commands(conn: &mut PgConnection, evs: &[CloudEvent]) -> Result<(), sqlx::Error> {
    push_many(conn, "commands", evs).await
}

async fn push_many(
    conn: &mut PgConnection,
    exchange: &str,
    evs: &[CloudEvent],
) -> Result<(), sqlx::Error> {
    if evs.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = evs.iter().map(|e| e.ty.as_str()).collect();
    let messages: Vec<serde_json::Value> = evs
        .iter()
        .map(|e| serde_json::to_value(e).unwrap_or_default())
        .collect();
    sqlx::query(
        "INSERT INTO outbox (exchange, routing_key, message)
         SELECT $1, k, m FROM unnest($2::text[], $3::jsonb[]) WITH ORDINALITY AS t(k, m, n) ORDER BY n",
    )
    .bind(exchange)
    .bind(&keys)
    .bind(&messages)
    .execute(conn)
    .await?;
    Ok(())
}

async fn push(conn: &mut PgConnection, exchange: &str, ev: &CloudEvent) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (exchange, routing_key, message) VALUES ($1, $2, $3)")
        .bind(exchange)
        .bind(&ev.ty)
        .bind(serde_json::to_value(ev).unwrap_or_default())
        .execute(conn)
        .await?;
    Ok(())
}

/// Publishes one batch. Rows are locked (`SKIP LOCKED`), so relays on several
/// nodes never publish the same row at once; a row is deleted only after the
/// broker confirmed it. Returns how many were published.
pub async fn relay_once(pool: &PgPool, broker: &Broker, batch: i64) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT id, exchange, routing_key, message FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut done: Vec<i64> = Vec::with_capacity(rows.len());
    let publishes = rows.iter().map(|r| async move {
        let id: i64 = r.get("id");
        let exchange: &str = r.get("exchange");
        let message: serde_json::Value = r.get("message");
        let ev: CloudEvent = serde_json::from_value(message)?;
        // Our own jobs travel on the internal exchange (not the commands
        // exchange shared with upstream systems).
        let x = if exchange == "commands" {
            broker.names.internal()
        } else {
            broker.names.events()
        };
        broker.publish(&x, &ev.ty, &ev, Default::default()).await?;
        anyhow::Ok(id)
    });
    let mut first_err = None;
    for r in futures::future::join_all(publishes).await {
        match r {
            Ok(id) => done.push(id),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(&done)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    match first_err {
        Some(e) if done.is_empty() => Err(e),
        Some(e) => {
            tracing::warn!(error = %e, "some outbox messages were not published; they stay for the next round");
            Ok(done.len())
        }
        None => Ok(done.len()),
    }
}

/// Runs the relay until cancelled: immediately again after a full batch,
/// otherwise every `interval`.
pub async fn run_relay(
    pool: PgPool,
    broker: Arc<Broker>,
    interval: Duration,
    cancel: CancellationToken,
) {
    const BATCH: i64 = 500;
    // While Postgres or RabbitMQ stays down, retry with back-off (2 s up to
    // 5 s) and say so once per failure streak, not every round.
    let mut failures: u32 = 0;
    loop {
        let wait = match relay_once(&pool, &broker, BATCH).await {
            Ok(n) => {
                if failures > 0 {
                    tracing::info!(failures, "outbox relay working again");
                }
                failures = 0;
                if n as i64 == BATCH {
                    Duration::ZERO
                } else {
                    interval
                }
            }
            Err(e) => {
                failures += 1;
                let backoff = interval
                    .max(Duration::from_secs(1))
                    .saturating_mul(1 << failures.min(5))
                    .min(Duration::from_secs(5));
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, retry_in = ?backoff, "outbox relay failed; will retry");
                } else {
                    tracing::debug!(error = %e, failures, "outbox relay failed again");
                }
                backoff
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
