//! Transactional outbox: events and jobs are written in the same transaction
//! as the change they describe, then published (with confirms) and deleted.
//! Rows staged a grace period ahead (the intake's and the API's jobs, the
//! decision batches' events) are published by the process that wrote them
//! right after its commit ([`publish_staged`] for events); every other row,
//! and a staged one its writer could not publish, goes through the relay,
//! which holds no transaction across the network (rows are leased),
//! publishes a batch with its confirms awaited together, deletes it in one
//! statement, and sleeps on `LISTEN/NOTIFY` when idle.

use std::{sync::Arc, time::Duration};

use sqlx::{postgres::PgListener, PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::{
    mq::CloudEvent,
    publisher::{Fate, Outgoing, Publisher},
    stages::{self, Stage},
};

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

/// Writes a command that this process publishes itself: the relay may
/// publish it only after `grace` (if this process crashed or never got the
/// confirm). Returns the outbox row's id.
pub async fn command_after(
    conn: &mut PgConnection,
    ev: &CloudEvent,
    grace: Duration,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO outbox (exchange, routing_key, message, publish_after) VALUES ('commands', $1, $2, now() + $3) RETURNING id",
    )
    .bind(&ev.ty)
    .bind(serde_json::to_value(ev).unwrap_or_default())
    .bind(grace)
    .fetch_one(conn)
    .await
}

/// Deletes published rows (one statement).
pub async fn delete(pool: &PgPool, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Deletes published rows inside a transaction.
pub async fn delete_in(conn: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes rows the relay never took (their job is withdrawn). Returns the
/// ids deleted.
pub async fn withdraw(conn: &mut PgConnection, ids: &[i64]) -> Result<Vec<i64>, sqlx::Error> {
    // A withdrawn pre-registration is recorded: should a copy of its job
    // still reach the broker (held back by an alarm, then released), the
    // worker skips it instead of recreating what was undone.
    sqlx::query_scalar(
        "WITH gone AS (DELETE FROM outbox WHERE id = ANY($1) AND attempts = 0 RETURNING id, routing_key, message),
              recorded AS (INSERT INTO withdrawn_commands (id)
                           SELECT (message->'data'->>'id')::uuid FROM gone
                           WHERE routing_key = 'preregistration.requested'
                           ON CONFLICT DO NOTHING)
         SELECT id FROM gone",
    )
        .bind(ids)
        .fetch_all(conn)
        .await
}

/// Publishes events this process staged in the outbox a grace period ahead
/// (`ids[i]` holds `events[i]`), with their confirms awaited together, and
/// deletes the confirmed rows in one statement. A row not confirmed is due
/// for the relay soon (a copy the broker did take is harmless: an event's id
/// is stable); a row of a process that crashed first is due after the grace
/// period. Returns how many were confirmed.
pub async fn publish_staged(
    pool: &PgPool,
    publisher: &Publisher,
    ids: &[i64],
    events: &[CloudEvent],
) -> Result<usize, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let broker = publisher.broker();
    let msgs: Vec<Outgoing> = events.iter().map(|e| Outgoing::event(broker, e)).collect();
    let fates = publisher.publish_all(&msgs).await;
    let (done, failed) = settle(pool, ids, &fates).await?;
    if failed > 0 {
        tracing::warn!(
            failed,
            "events not confirmed by the broker; the outbox relay publishes them"
        );
    }
    Ok(done)
}

/// Settles published rows (`ids[i]` was published with fate `fates[i]`):
/// the confirmed ones are deleted in one statement, the others are due again
/// soon (`RETRY_AFTER`, not at the end of a lease or a grace period).
/// Returns how many were confirmed and how many not.
async fn settle(pool: &PgPool, ids: &[i64], fates: &[Fate]) -> Result<(usize, usize), sqlx::Error> {
    let mut done: Vec<i64> = Vec::with_capacity(ids.len());
    let mut failed: Vec<i64> = Vec::new();
    for (id, fate) in ids.iter().zip(fates) {
        if fate.is_confirmed() {
            done.push(*id);
        } else {
            failed.push(*id);
        }
    }
    if !done.is_empty() {
        delete(pool, &done).await?;
    }
    if !failed.is_empty() {
        if let Err(e) =
            sqlx::query("UPDATE outbox SET publish_after = now() + $2 WHERE id = ANY($1)")
                .bind(&failed)
                .bind(RETRY_AFTER)
                .execute(pool)
                .await
        {
            // Still due: after the lease or grace period that holds them.
            tracing::warn!(error = %e, rows = failed.len(), "could not make unpublished outbox rows due again soon");
        }
    }
    Ok((done.len(), failed.len()))
}

/// Publishes one batch of due rows, without holding a transaction across the
/// network: the rows are leased first (one short statement moves their
/// `publish_after` a lease ahead, `SKIP LOCKED`, so relays on several nodes
/// never take the same row), then published together with their confirms
/// awaited together, then the confirmed ones are deleted in one statement.
/// A row whose publish failed (or whose relay died) is due again when its
/// lease ends. Returns how many rows were leased.
pub async fn relay_once(
    pool: &PgPool,
    publisher: &Publisher,
    batch: i64,
    lease: Duration,
) -> anyhow::Result<usize> {
    let mut rows = sqlx::query(
        "UPDATE outbox SET publish_after = now() + $2, attempts = attempts + 1
         WHERE id IN (SELECT id FROM outbox WHERE publish_after <= now()
                      ORDER BY publish_after, id LIMIT $1 FOR UPDATE SKIP LOCKED)
         RETURNING id, exchange, message, EXTRACT(EPOCH FROM now() - created_at)::float8 AS lag",
    )
    .bind(batch)
    .bind(lease)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    rows.sort_by_key(|r| r.get::<i64, _>("id"));
    let broker = publisher.broker();
    let mut ids: Vec<i64> = Vec::with_capacity(rows.len());
    let mut msgs: Vec<Outgoing> = Vec::with_capacity(rows.len());
    let mut unreadable: Vec<i64> = Vec::new();
    for r in &rows {
        stages::observe(Stage::RelayLag, r.get("lag"));
        let id: i64 = r.get("id");
        let message: serde_json::Value = r.get("message");
        match serde_json::from_value::<CloudEvent>(message) {
            Ok(ev) => {
                ids.push(id);
                msgs.push(if r.get::<&str, _>("exchange") == "commands" {
                    Outgoing::command(broker, &ev)
                } else {
                    Outgoing::event(broker, &ev)
                });
            }
            Err(e) => {
                // Written by this code, so never expected; kept rather than
                // lost, and retried after the lease.
                tracing::error!(outbox_id = id, error = %e, "unreadable outbox row");
                unreadable.push(id);
            }
        }
    }
    let fates = publisher.publish_all(&msgs).await;
    let (done, failed) = settle(pool, &ids, &fates).await?;
    if let Some(f) = fates.iter().find(|f| !f.is_confirmed()) {
        if done == 0 {
            anyhow::bail!("outbox relay: {failed} messages not published: {f:?}");
        }
        tracing::warn!(failed, fate = ?f, "some outbox messages were not published; they are due again soon");
    }
    Ok(rows.len())
}

/// Republishes one batch of `queued` pre-registrations whose job may have
/// been lost (see [`super::intake::lease_stale_queued`]): leased in one
/// statement, published together with their confirms awaited together; a
/// row whose publish failed is due again soon. Returns how many were leased.
pub async fn republish_stale_once(
    pool: &PgPool,
    publisher: &Publisher,
    batch: i64,
    min_wait: Duration,
) -> anyhow::Result<usize> {
    let rows = super::intake::lease_stale_queued(pool, batch, min_wait).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let broker = publisher.broker();
    let msgs: Vec<Outgoing> = rows
        .iter()
        .map(|r| {
            stages::observe(Stage::RelayLag, r.age);
            Outgoing::command(broker, &r.job())
        })
        .collect();
    let fates = publisher.publish_all(&msgs).await;
    metrics::counter!("prereg_republished_total")
        .increment(fates.iter().filter(|f| f.is_confirmed()).count() as u64);
    let failed: Vec<uuid::Uuid> = rows
        .iter()
        .zip(&fates)
        .filter(|(_, f)| !f.is_confirmed())
        .map(|(r, _)| r.cmd.id)
        .collect();
    if !failed.is_empty() {
        let _ = super::intake::retry_stale(pool, &failed, RETRY_AFTER).await;
        if failed.len() == rows.len() {
            anyhow::bail!("republisher: {} queued jobs not published", failed.len());
        }
        tracing::warn!(
            failed = failed.len(),
            "some queued jobs were not republished; they are due again soon"
        );
    }
    tracing::info!(
        republished = rows.len() - failed.len(),
        "republished the jobs of pre-registrations still queued after the grace period"
    );
    Ok(rows.len())
}

/// Runs the relay until cancelled: again at once while there is work; when
/// idle, it sleeps until woken by `LISTEN/NOTIFY` (a row due now was
/// written) or until the next row's `publish_after` (rows leased or kept
/// back for a grace period), at most `interval`... and polls every
/// `interval` only if it cannot listen.
pub async fn run_relay(
    pool: PgPool,
    publisher: Arc<Publisher>,
    interval: Duration,
    lease: Duration,
    cancel: CancellationToken,
) {
    const BATCH: i64 = 500;
    // The longest sleep when idle and nothing is scheduled: a safety net for
    // a missed notification.
    let idle_cap = Duration::from_secs(5).max(interval);
    let mut listener = match PgListener::connect_with(&pool).await {
        Ok(mut l) => match l.listen(CHANNEL).await {
            Ok(()) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay cannot LISTEN; polling instead");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "outbox relay cannot LISTEN; polling instead");
            None
        }
    };
    let mut idle = false;
    // While Postgres or RabbitMQ stays down, retry with back-off (2 s up to
    // 5 s) and say so once per failure streak, not every round.
    let mut failures: u32 = 0;
    let mut last_stale = tokio::time::Instant::now();
    loop {
        if cancel.is_cancelled() {
            break;
        }
        // Stale `queued` rows are looked for at most every
        // `STALE_CHECK` while events keep the relay busy (they are due a
        // grace period after their insert, so this costs no timeliness).
        let result = match relay_once(&pool, &publisher, BATCH, lease).await {
            Ok(n) if n == 0 || last_stale.elapsed() >= STALE_CHECK => {
                last_stale = tokio::time::Instant::now();
                republish_stale_once(&pool, &publisher, BATCH, lease)
                    .await
                    .map(|m| n + m)
            }
            other => other,
        };
        if result.is_ok() && failures > 0 {
            tracing::info!(failures, "outbox relay working again");
            failures = 0;
        }
        let wait = match result {
            Ok(n) if n > 0 => {
                if idle {
                    idle = set_idle(&pool, false).await.map_or(idle, |_| false);
                }
                continue;
            }
            Ok(_) if listener.is_none() => interval,
            Ok(_) if !idle => {
                // Announce the sleep, then look once more: a row committed
                // before the announcement was seen by that look, one after it
                // sends a notification.
                idle = set_idle(&pool, true).await.is_ok();
                Duration::ZERO
            }
            Ok(_) => next_due(&pool).await.unwrap_or(idle_cap).min(idle_cap),
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
        if wait.is_zero() {
            continue;
        }
        let mut drop_listener = false;
        match listener.as_mut() {
            Some(l) => {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = tokio::time::timeout(wait, l.recv()) => {
                        if let Ok(Err(e)) = r {
                            // Pool closed (shutdown) or connection lost: poll from now on.
                            tracing::warn!(error = %e, "outbox relay lost its LISTEN connection; polling");
                            drop_listener = true;
                        }
                    }
                }
            }
            None => {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        if drop_listener {
            listener = None;
            if idle {
                idle = set_idle(&pool, false).await.is_err();
            }
        }
    }
    if idle {
        let _ = set_idle(&pool, false).await;
    }
}

/// How often a busy relay also looks for stale `queued` rows.
const STALE_CHECK: Duration = Duration::from_millis(500);

/// When a row whose publish failed is due again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The notification channel of due outbox rows (see the migration
/// `outbox_relay`).
pub const CHANNEL: &str = "prereg_outbox";

async fn set_idle(pool: &PgPool, idle: bool) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox_relay_state SET idle = $1 WHERE idle <> $1")
        .bind(idle)
        .execute(pool)
        .await?;
    Ok(())
}

/// How long until the next outbox row or stale `queued` row is due (none:
/// `None`).
async fn next_due(pool: &PgPool) -> Option<Duration> {
    let outbox: Option<f64> = sqlx::query_scalar(
        "SELECT GREATEST(EXTRACT(EPOCH FROM min(publish_after) - now()), 0)::float8 FROM outbox",
    )
    .fetch_one(pool)
    .await
    .ok()?;
    let queued = super::intake::next_stale(pool).await.ok()?;
    let secs = match (outbox, queued) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    secs.map(|s| Duration::from_secs_f64(s) + Duration::from_millis(5))
}
