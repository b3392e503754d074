//! The worker runtime shared by every job kind: one consumer per queue with
//! prefetch and bounded concurrency, a per-job timeout, ack only after the
//! handler's effects are committed, delayed retry through TTL queues, dead
//! letters with their reason in headers, reconnection with backoff, and a
//! drain of in-flight work on shutdown.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::{AMQPValue, FieldTable},
};
use rand::Rng;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{dispatch, exhausted, JobError, Outcome};
use crate::{
    context::Ctx,
    mq::{
        broker::{header_str, header_u32},
        topology::DELAY_TIER,
        CloudEvent, Queue,
    },
};

pub const H_RETRIES: &str = "x-retry-count";
pub const H_REASON: &str = "x-prereg-reason";
pub const H_ERROR: &str = "x-prereg-error";
pub const H_QUEUE: &str = "x-prereg-queue";
pub const H_FAILED_AT: &str = "x-prereg-failed-at";
pub const H_REPLAY_RUN: &str = "x-prereg-replay-run";

/// Consumes `queues` until `cancel` fires, then drains in-flight jobs.
pub async fn run(ctx: Arc<Ctx>, queues: Vec<Queue>, cancel: CancellationToken) {
    let mut set = JoinSet::new();
    for q in queues {
        set.spawn(consume_forever(ctx.clone(), q, cancel.clone()));
    }
    while set.join_next().await.is_some() {}
}

async fn consume_forever(ctx: Arc<Ctx>, q: Queue, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let started = Instant::now();
        match session(&ctx, q, &cancel).await {
            Ok(()) => return,
            Err(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(200);
                }
                tracing::warn!(queue = q.short(), error = %e, ?backoff, "consumer stopped; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One consumer session on one channel. `Ok` when cancelled and drained.
async fn session(ctx: &Arc<Ctx>, q: Queue, cancel: &CancellationToken) -> anyhow::Result<()> {
    let (generation, ch) = ctx.broker.channel().await?;
    let concurrency = ctx.cfg.worker_concurrency;
    ch.basic_qos(
        concurrency.min(u16::MAX as usize) as u16,
        BasicQosOptions::default(),
    )
    .await?;
    let tag = format!("{}-{}", q.short(), uuid::Uuid::new_v4().simple());
    let mut consumer = ch
        .basic_consume(
            &ctx.broker.names.queue(q),
            &tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = q.short(), concurrency, "consuming");
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let result = loop {
        tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            next = consumer.next() => match next {
                None => break Err(anyhow::anyhow!("consumer stream ended")),
                Some(Err(e)) => break Err(e.into()),
                Some(Ok(delivery)) => {
                    let permit = sem.clone().acquire_owned().await?;
                    let ctx = ctx.clone();
                    tasks.spawn(async move {
                        process(&ctx, q, delivery).await;
                        drop(permit);
                    });
                }
            }
        }
    };
    // Stop taking work; what was prefetched but not started goes back to the
    // queue when the channel closes.
    let _ = ch.basic_cancel(&tag, BasicCancelOptions::default()).await;
    let in_flight = tasks.len();
    if in_flight > 0 {
        tracing::info!(queue = q.short(), in_flight, "draining in-flight jobs");
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(ctx.cfg.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            queue = q.short(),
            "grace period over; unfinished jobs go back to the queue"
        );
        tasks.abort_all();
    }
    let _ = ch.close(200, "consumer done").await;
    if result.is_err() {
        ctx.broker.reset(generation).await;
    }
    result
}

async fn process(ctx: &Ctx, q: Queue, delivery: Delivery) {
    let started = Instant::now();
    let headers = delivery.properties.headers().clone();
    let retries = header_u32(&headers, H_RETRIES).unwrap_or(0);
    let ev = match CloudEvent::parse(&delivery.data) {
        Ok(ev) => ev,
        Err(reason) => {
            let reason = crate::domain::mask::text(&reason);
            tracing::warn!(queue = q.short(), %reason, "poison message");
            dead_letter(ctx, q, &delivery, "unparseable", &reason, retries).await;
            record(q, "dead_lettered", started);
            return;
        }
    };
    // In a FIFO queue the message taken now was the oldest waiting: its age
    // is the queue's oldest-message age at this moment.
    let waited = (Utc::now() - ev.time).num_milliseconds().max(0) as f64 / 1000.0;
    metrics::gauge!("prereg_queue_oldest_message_age_seconds", "queue" => q.short()).set(waited);
    let span = tracing::info_span!("job", queue = q.short(), job_id = %ev.id, job_type = %ev.ty,
        correlation_id = ev.correlationid.as_deref().unwrap_or(""), attempt = retries.saturating_add(1));
    async {
        let result = match tokio::time::timeout(ctx.cfg.job_timeout, dispatch(ctx, &ev)).await {
            Ok(r) => r,
            Err(_) => Err(JobError::Retryable(format!(
                "timed out after {:?}",
                ctx.cfg.job_timeout
            ))),
        };
        // Parser errors and replies may quote personal data (SPEC §8).
        let label = match result.map_err(JobError::masked) {
            Ok(outcome) => {
                if let Outcome::Skipped(why) = outcome {
                    tracing::debug!(why, "job skipped");
                }
                ack(&delivery).await;
                outcome.label()
            }
            Err(JobError::Fatal { code, message }) => {
                tracing::warn!(code, %message, "job failed for good; dead-lettering");
                dead_letter(ctx, q, &delivery, code, &message, retries).await;
                "dead_lettered"
            }
            Err(JobError::Retryable(message))
                if retries.saturating_add(1) >= ctx.cfg.max_attempts =>
            {
                tracing::warn!(%message, "retries exhausted; dead-lettering");
                exhausted(ctx, &ev, &message).await;
                dead_letter(ctx, q, &delivery, "retries_exhausted", &message, retries).await;
                "dead_lettered"
            }
            Err(JobError::Retryable(message)) => {
                tracing::info!(%message, "job will be retried");
                retry_later(ctx, q, &delivery, retries.saturating_add(1)).await;
                "retried"
            }
        };
        record(q, label, started);
    }
    .instrument(span)
    .await;
}

fn record(q: Queue, outcome: &'static str, started: Instant) {
    metrics::counter!("prereg_jobs_total", "queue" => q.short(), "outcome" => outcome).increment(1);
    metrics::histogram!("prereg_job_duration_seconds", "queue" => q.short())
        .record(started.elapsed().as_secs_f64());
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The channel is gone: the broker redelivers; handlers are idempotent.
        tracing::warn!(error = %e, "ack failed; message will be redelivered");
    }
}

/// Hands the message back to the queue (the broker was not reachable for a
/// retry or dead letter). The quorum queue's delivery limit bounds this.
async fn requeue(delivery: &Delivery) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await;
}

fn copy_headers(delivery: &Delivery) -> FieldTable {
    delivery.properties.headers().clone().unwrap_or_default()
}

async fn retry_later(ctx: &Ctx, q: Queue, delivery: &Delivery, retry: u32) {
    let names = &ctx.broker.names;
    let (tier, delay) = names.retry_tier(retry);
    // Jitter: between 80 % and 100 % of the tier's delay (never above it, so
    // a message does not wait behind a longer one).
    let ms = delay.as_millis() as u64;
    let jittered = rand::thread_rng().gen_range((ms * 4 / 5).max(1)..=ms.max(1));
    let mut headers = copy_headers(delivery);
    headers.insert(H_RETRIES.into(), count_header(retry));
    headers.insert(
        DELAY_TIER.into(),
        AMQPValue::LongString(tier.to_string().into()),
    );
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string());
    match ctx
        .broker
        .publish_raw(
            &names.retry_exchange(),
            &names.queue(q),
            &delivery.data,
            message_id.as_deref(),
            headers,
            Some(jittered),
        )
        .await
    {
        Ok(()) => ack(delivery).await,
        Err(e) => {
            tracing::warn!(error = %e, "could not schedule the retry; requeueing");
            requeue(delivery).await;
        }
    }
}

async fn dead_letter(
    ctx: &Ctx,
    q: Queue,
    delivery: &Delivery,
    reason: &str,
    message: &str,
    retries: u32,
) {
    metrics::counter!("prereg_dead_lettered_total", "queue" => q.short(), "reason" => reason.to_string()).increment(1);
    let mut headers = copy_headers(delivery);
    let s = |v: &str| AMQPValue::LongString(v.into());
    headers.insert(H_REASON.into(), s(reason));
    headers.insert(
        H_ERROR.into(),
        s(&truncate(&crate::domain::mask::text(message), 2000)),
    );
    headers.insert(H_QUEUE.into(), s(q.short()));
    headers.insert(H_FAILED_AT.into(), s(&Utc::now().to_rfc3339()));
    headers.insert(H_RETRIES.into(), count_header(retries));
    headers.insert(
        "x-prereg-routing-key".into(),
        s(delivery.routing_key.as_str()),
    );
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string());
    let names = &ctx.broker.names;
    match ctx
        .broker
        .publish_raw(
            &names.dlx(),
            q.short(),
            &delivery.data,
            message_id.as_deref(),
            headers,
            None,
        )
        .await
    {
        Ok(()) => ack(delivery).await,
        Err(e) => {
            tracing::error!(error = %e, "could not dead-letter; requeueing");
            requeue(delivery).await;
        }
    }
}

/// A retry count as a header value (a forged huge count stays in range).
fn count_header(n: u32) -> AMQPValue {
    AMQPValue::LongInt(i32::try_from(n).unwrap_or(i32::MAX))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A dead letter as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub reason: Option<String>,
    pub error: Option<String>,
    pub failed_at: Option<String>,
    pub retries: Option<u32>,
    pub routing_key: Option<String>,
    pub body: String,
}

/// Reads up to `limit` dead letters of a queue without removing them.
pub async fn list_dead_letters(
    ctx: &Ctx,
    q: Queue,
    limit: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    let (_, ch) = ctx.broker.channel().await?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(msg) = ch
            .basic_get(
                &ctx.broker.names.dlq(q),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        let h = msg.delivery.properties.headers().clone();
        out.push(DeadLetter {
            message_id: msg
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string()),
            reason: header_str(&h, H_REASON),
            error: header_str(&h, H_ERROR),
            failed_at: header_str(&h, H_FAILED_AT),
            retries: header_u32(&h, H_RETRIES),
            routing_key: header_str(&h, "x-prereg-routing-key"),
            body: String::from_utf8_lossy(&msg.delivery.data).into_owned(),
        });
    }
    // Closing the channel hands every unacknowledged message back, in order.
    let _ = ch.close(200, "listed").await;
    Ok(out)
}

/// Moves up to `limit` dead letters back to their work queue, with a fresh
/// retry count. Returns how many were replayed.
pub async fn replay_dead_letters(ctx: &Ctx, q: Queue, limit: usize) -> anyhow::Result<usize> {
    let (_, ch) = ctx.broker.channel().await?;
    let names = &ctx.broker.names;
    // Only what was dead before: each message this run replays carries the
    // run's id, so one that fails again and comes back is left in place.
    // (Counting the queue first is not enough: messages a listing channel
    // just handed back may not be counted yet.)
    let run = uuid::Uuid::new_v4().to_string();
    let mut n = 0;
    while n < limit {
        let Some(msg) = ch
            .basic_get(
                &names.dlq(q),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        let mut headers = msg
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        if header_str(&Some(headers.clone()), H_REPLAY_RUN).as_deref() == Some(run.as_str()) {
            msg.delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
            break;
        }
        headers.insert(
            H_REPLAY_RUN.into(),
            AMQPValue::LongString(run.clone().into()),
        );
        headers.insert(H_RETRIES.into(), AMQPValue::LongInt(0));
        headers.insert(
            "x-prereg-replayed-at".into(),
            AMQPValue::LongString(Utc::now().to_rfc3339().into()),
        );
        let id = msg
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string());
        // The default exchange routes straight to the work queue by name.
        ctx.broker
            .publish_raw(
                "",
                &names.queue(q),
                &msg.delivery.data,
                id.as_deref(),
                headers,
                None,
            )
            .await?;
        msg.delivery.ack(BasicAckOptions::default()).await?;
        n += 1;
    }
    let _ = ch.close(200, "replayed").await;
    Ok(n)
}
