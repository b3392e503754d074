//! The worker runtime shared by every job kind: one consumer per queue with
//! prefetch and bounded concurrency, a per-job timeout, ack only after the
//! handler's effects are committed, delayed retry through TTL queues, dead
//! letters with their reason in headers, reconnection with backoff, and a
//! drain of in-flight work on shutdown.

use std::{
    collections::VecDeque,
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

use super::{dispatch, exhausted, registration::Step, Disposition, JobError, Outcome};
use crate::{
    context::Ctx,
    jobs::{InvitationRequested, Job, PreregistrationRequested},
    mq::{broker::header_u32, topology::DELAY_TIER, CloudEvent, Queue},
};

pub use crate::mq::dead_letters::{
    DeadLetter, H_ERROR, H_FAILED_AT, H_QUEUE, H_REASON, H_REPLAY_RUN, H_RETRIES, H_ROUTING_KEY,
};

/// [`crate::mq::dead_letters::list`] of this process's broker.
pub async fn list_dead_letters(
    ctx: &Ctx,
    q: Queue,
    limit: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    crate::mq::dead_letters::list(&ctx.broker, q, limit).await
}

/// [`crate::mq::dead_letters::replay`] of this process's broker.
pub async fn replay_dead_letters(ctx: &Ctx, q: Queue, limit: usize) -> anyhow::Result<usize> {
    crate::mq::dead_letters::replay(&ctx.broker, q, limit).await
}

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
    let batch = batch_size(ctx, q);
    // A batched consumer holds one batch while the next one arrives.
    let prefetch = if batch > 1 {
        concurrency.max(2 * batch)
    } else {
        concurrency
    };
    ch.basic_qos(
        prefetch.min(u16::MAX as usize) as u16,
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
    if batch > 1 {
        tracing::info!(queue = q.short(), batch, prefetch, "consuming in batches");
        let result = batches(ctx, q, &mut consumer, cancel, batch).await;
        // Stop taking work; what was prefetched but not decided goes back
        // to the queue when the channel closes.
        let _ = ch.basic_cancel(&tag, BasicCancelOptions::default()).await;
        let _ = ch.close(200, "consumer done").await;
        if result.is_err() {
            ctx.broker.reset(generation).await;
        }
        return result;
    }
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
    drain(ctx, q, &mut tasks, "jobs").await;
    let _ = ch.close(200, "consumer done").await;
    if result.is_err() {
        ctx.broker.reset(generation).await;
    }
    result
}

/// Counts a job as in flight (delivered, not yet acknowledged) while alive.
struct InFlight(Queue);

impl InFlight {
    fn new(q: Queue) -> Self {
        metrics::gauge!("prereg_jobs_in_flight", "queue" => q.short()).increment(1.0);
        InFlight(q)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("prereg_jobs_in_flight", "queue" => self.0.short()).decrement(1.0);
    }
}

/// The retry count of a delivery. It is ours: a message straight from the
/// shared commands exchange has never been retried, whatever its headers
/// claim.
fn retries_of(ctx: &Ctx, delivery: &Delivery) -> u32 {
    if delivery.exchange.as_str() == ctx.broker.names.commands() {
        0
    } else {
        header_u32(delivery.properties.headers(), H_RETRIES).unwrap_or(0)
    }
}

/// Checks the size and parses the envelope; a delivery that fails either
/// is dead-lettered here (and `None` returned).
async fn prepare(
    ctx: &Ctx,
    q: Queue,
    delivery: &Delivery,
    retries: u32,
    started: Instant,
) -> Option<CloudEvent> {
    if delivery.data.len() > ctx.cfg.max_message_bytes {
        let reason = format!(
            "message of {} bytes is larger than the maximum of {} bytes",
            delivery.data.len(),
            ctx.cfg.max_message_bytes
        );
        tracing::warn!(queue = q.short(), %reason, "oversized message");
        dead_letter(ctx, q, delivery, "too_large", &reason, retries).await;
        record(q, "dead_lettered", started);
        return None;
    }
    let ev = match CloudEvent::parse(&delivery.data) {
        Ok(ev) => ev,
        Err(reason) => {
            let reason = crate::domain::mask::text(&reason);
            tracing::warn!(queue = q.short(), %reason, "poison message");
            dead_letter(ctx, q, delivery, "unparseable", &reason, retries).await;
            record(q, "dead_lettered", started);
            return None;
        }
    };
    // In a FIFO queue the message taken now was the oldest waiting: its age
    // is the queue's oldest-message age at this moment.
    let waited = (Utc::now() - ev.time).num_milliseconds().max(0) as f64 / 1000.0;
    metrics::gauge!("prereg_queue_oldest_message_age_seconds", "queue" => q.short()).set(waited);
    Some(ev)
}

fn job_span(q: Queue, ev: &CloudEvent, retries: u32) -> tracing::Span {
    tracing::info_span!("job", queue = q.short(), job_id = %ev.id, job_type = %ev.ty,
        correlation_id = ev.correlationid.as_deref().unwrap_or(""), attempt = retries.saturating_add(1))
}

async fn process(ctx: &Ctx, q: Queue, delivery: Delivery) {
    let _in_flight = InFlight::new(q);
    let started = Instant::now();
    let retries = retries_of(ctx, &delivery);
    let Some(ev) = prepare(ctx, q, &delivery, retries, started).await else {
        return;
    };
    async {
        let result = match tokio::time::timeout(ctx.cfg.job_timeout, dispatch(ctx, q, &ev)).await {
            Ok(r) => r,
            Err(_) => Err(JobError::Retryable(format!(
                "timed out after {:?}",
                ctx.cfg.job_timeout
            ))),
        };
        let label = match result {
            Ok(outcome) => {
                if let Outcome::Skipped(why) = outcome {
                    tracing::debug!(why, "job skipped");
                }
                ack(&delivery).await;
                outcome.label()
            }
            Err(e) => settle_failure(ctx, q, &delivery, &ev, retries, e).await,
        };
        record(q, label, started);
    }
    .instrument(job_span(q, &ev, retries))
    .await;
}

/// Retries a failed job later or dead-letters it (the delivery is settled
/// either way). Returns the outcome label.
async fn settle_failure(
    ctx: &Ctx,
    q: Queue,
    delivery: &Delivery,
    ev: &CloudEvent,
    retries: u32,
    e: JobError,
) -> &'static str {
    // Parser errors and replies may quote personal data (SPEC §8).
    match e.disposition().masked() {
        Disposition::DeadLetter { code, message } => {
            tracing::warn!(code, %message, "job failed for good; dead-lettering");
            dead_letter(ctx, q, delivery, code, &message, retries).await;
            "dead_lettered"
        }
        Disposition::Retry(message) if retries.saturating_add(1) >= ctx.cfg.max_attempts => {
            tracing::warn!(%message, "retries exhausted; dead-lettering");
            exhausted(ctx, ev, &message).await;
            dead_letter(ctx, q, delivery, "retries_exhausted", &message, retries).await;
            "dead_lettered"
        }
        Disposition::Retry(message) => {
            tracing::info!(%message, "job will be retried");
            retry_later(ctx, q, delivery, retries.saturating_add(1)).await;
            "retried"
        }
    }
}

/// Most deliveries of queue `q` decided together (1: one at a time).
fn batch_size(ctx: &Ctx, q: Queue) -> usize {
    match q {
        Queue::Registration => ctx.cfg.registration_batch.max(1),
        Queue::Email => ctx.cfg.email_batch.max(1),
        _ => 1,
    }
}

/// How long a batch of queue `q` waits for more deliveries after its first.
fn linger(ctx: &Ctx, q: Queue) -> Duration {
    match q {
        Queue::Email => ctx.cfg.email_linger,
        _ => ctx.cfg.registration_linger,
    }
}

/// The message type a batched queue decides in batches; any other type on
/// it goes the one-at-a-time way.
fn batched_type(q: Queue) -> Option<&'static str> {
    match q {
        Queue::Registration => Some(PreregistrationRequested::TYPE),
        Queue::Email => Some(InvitationRequested::TYPE),
        _ => None,
    }
}

/// The batch handler of queue `q`: one step per delivery, in order.
async fn handle_batch(ctx: &Ctx, q: Queue, evs: &[&CloudEvent]) -> Vec<Step> {
    match q {
        Queue::Email => super::email::handle_batch(ctx, evs).await,
        _ => super::registration::handle_batch(ctx, evs).await,
    }
}

/// A delivery received and not yet settled.
struct Held {
    delivery: Delivery,
    received: Instant,
    _in_flight: InFlight,
    /// When its customer's lock was first found held by another worker.
    busy_since: Option<Instant>,
    /// Its envelope, once parsed.
    ev: Option<CloudEvent>,
}

impl Held {
    fn new(q: Queue, delivery: Delivery) -> Self {
        Held {
            delivery,
            received: Instant::now(),
            _in_flight: InFlight::new(q),
            busy_since: None,
            ev: None,
        }
    }

    fn tag(&self) -> u64 {
        self.delivery.delivery_tag
    }
}

/// Whether the batches of queue `q` may run side by side. An email batch
/// spends most of its time in SMTP exchanges: the next batch is collected
/// and leased while it runs, so one slow mail server exchange holds up only
/// its own batch (the prefetch bounds how much is in flight). Its
/// deliveries are acknowledged one by one (a `multiple` acknowledgement
/// could cover another running batch's). Registration batches run one at
/// a time (their busy jobs are held back in order).
fn overlapping(q: Queue) -> bool {
    q == Queue::Email
}

/// The batched consumer: takes up to `batch` deliveries (waiting at most
/// `PREREG_REGISTRATION_LINGER` or `PREREG_EMAIL_LINGER` after the first
/// for more), decides them together, then settles them. One batch at a
/// time per channel, so every delivery tag below the batch's is settled
/// when it is acknowledged with `multiple` — except on [`overlapping`]
/// queues. `Ok` when cancelled (the batches in hand are finished first,
/// within the shutdown grace period).
async fn batches(
    ctx: &Arc<Ctx>,
    q: Queue,
    consumer: &mut lapin::Consumer,
    cancel: &CancellationToken,
    batch: usize,
) -> anyhow::Result<()> {
    let mut running: JoinSet<usize> = JoinSet::new();
    let result = collect_batches(ctx, q, consumer, cancel, batch, &mut running).await;
    if !running.is_empty() {
        drain(ctx, q, &mut running, "batches").await;
    }
    result
}

async fn collect_batches(
    ctx: &Arc<Ctx>,
    q: Queue,
    consumer: &mut lapin::Consumer,
    cancel: &CancellationToken,
    batch: usize,
    running: &mut JoinSet<usize>,
) -> anyhow::Result<()> {
    let mut held: VecDeque<Held> = VecDeque::new();
    loop {
        if held.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                Some(_) = running.join_next(), if !running.is_empty() => continue,
                next = consumer.next() => match next {
                    None => return Err(anyhow::anyhow!("consumer stream ended")),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(d)) => held.push_back(Held::new(q, d)),
                }
            }
        }
        let linger = tokio::time::Instant::now() + linger(ctx, q);
        while held.len() < batch {
            match tokio::time::timeout_at(linger, consumer.next()).await {
                Err(_) => break,
                Ok(None) => return Err(anyhow::anyhow!("consumer stream ended")),
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(Some(Ok(d))) => held.push_back(Held::new(q, d)),
            }
        }
        let take = held.len().min(batch);
        let current: Vec<Held> = held.drain(..take).collect();
        if overlapping(q) {
            let ctx = ctx.clone();
            running.spawn(
                async move { run_batch(&ctx, q, current, &mut VecDeque::new(), false).await },
            );
            if cancel.is_cancelled() {
                return Ok(());
            }
            continue;
        }
        let decided = run_batch(ctx, q, current, &mut held, true).await;
        if cancel.is_cancelled() {
            return Ok(());
        }
        if decided == 0 && !held.is_empty() {
            // Every job waits for a lock another worker holds: pause a little.
            let pause = rand::thread_rng().gen_range(2..15);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
}

/// Decides one batch and settles it: failures one by one (retry or dead
/// letter), then the successes with one `multiple` acknowledgement (one by
/// one unless `multiple`). Jobs whose customer lock is busy go back to the
/// front of `held`, in order (with `multiple` only; otherwise they are
/// retried later). Returns how many deliveries were settled.
async fn run_batch(
    ctx: &Ctx,
    q: Queue,
    current: Vec<Held>,
    held: &mut VecDeque<Held>,
    multiple: bool,
) -> usize {
    let mut jobs: Vec<Held> = Vec::with_capacity(current.len());
    let mut others: Vec<Held> = Vec::new();
    let mut settled = 0;
    for mut h in current {
        let retries = retries_of(ctx, &h.delivery);
        if h.ev.is_none() {
            match prepare(ctx, q, &h.delivery, retries, h.received).await {
                Some(ev) => h.ev = Some(ev),
                None => {
                    settled += 1;
                    continue;
                }
            }
        }
        let ty = h.ev.as_ref().map(|ev| ev.ty.as_str());
        if ty.is_some() && ty == batched_type(q) {
            jobs.push(h);
        } else {
            others.push(h);
        }
    }
    // Another job type on this queue (or one not bound to it): the
    // one-at-a-time path settles each, concurrently with the batch and
    // before the batch's ack.
    let settled_others = others.len();
    let others = futures::future::join_all(others.into_iter().map(|h| {
        let Held { delivery, .. } = h;
        process(ctx, q, delivery)
    }));
    let evs: Vec<&CloudEvent> = jobs.iter().filter_map(|h| h.ev.as_ref()).collect();
    let span = tracing::info_span!("batch", queue = q.short(), size = evs.len());
    let batch = async {
        if evs.is_empty() {
            return Vec::new();
        }
        match tokio::time::timeout(
            ctx.cfg.job_timeout,
            handle_batch(ctx, q, &evs).instrument(span),
        )
        .await
        {
            Ok(steps) => steps,
            Err(_) => evs
                .iter()
                .map(|_| {
                    Step::Settled(Err(JobError::Retryable(format!(
                        "timed out after {:?}",
                        ctx.cfg.job_timeout
                    ))))
                })
                .collect(),
        }
    };
    let (_, steps) = futures::future::join(others, batch).await;
    settled += settled_others;
    if jobs.is_empty() {
        return settled;
    }
    let mut done: Vec<(Held, &'static str)> = Vec::new();
    let mut busy: Vec<Held> = Vec::new();
    for (mut h, step) in jobs.into_iter().zip(steps) {
        let retries = retries_of(ctx, &h.delivery);
        let result = match step {
            Step::Busy => {
                let since = *h.busy_since.get_or_insert_with(Instant::now);
                if multiple && since.elapsed() < ctx.cfg.lock_wait {
                    busy.push(h);
                    continue;
                }
                Err(JobError::Retryable("customer lock busy".into()))
            }
            Step::Settled(r) => r,
        };
        match result {
            Ok(outcome) => {
                if let Outcome::Skipped(why) = outcome {
                    tracing::debug!(why, "job skipped");
                }
                done.push((h, outcome.label()));
            }
            Err(e) => {
                let Some(ev) = h.ev.as_ref() else { continue };
                let label = settle_failure(ctx, q, &h.delivery, ev, retries, e)
                    .instrument(job_span(q, ev, retries))
                    .await;
                record(q, label, h.received);
                settled += 1;
            }
        }
    }
    for h in busy.into_iter().rev() {
        held.push_front(h);
    }
    // Every unsettled delivery is now either a success of this batch or
    // still held: a `multiple` ack up to the greatest success below the
    // lowest held tag covers exactly this batch's successes there. (Without
    // `multiple`, the floor 0 acknowledges each success alone.)
    let floor = if multiple {
        held.iter().map(Held::tag).min().unwrap_or(u64::MAX)
    } else {
        0
    };
    let upto = done
        .iter()
        .map(|(h, _)| h.tag())
        .filter(|t| *t < floor)
        .max();
    let started = Instant::now();
    if let Some(upto) = upto {
        if let Some((h, _)) = done.iter().find(|(h, _)| h.tag() == upto) {
            if let Err(e) = h.delivery.ack(BasicAckOptions { multiple: true }).await {
                tracing::warn!(error = %e, "ack failed; messages will be redelivered");
            }
        }
    }
    for (h, _) in done.iter().filter(|(h, _)| h.tag() > floor) {
        if let Err(e) = h.delivery.ack(BasicAckOptions::default()).await {
            tracing::warn!(error = %e, "ack failed; message will be redelivered");
        }
    }
    crate::stages::since(crate::stages::Stage::Ack, started);
    for (h, label) in &done {
        record(q, label, h.received);
    }
    settled + done.len()
}

fn record(q: Queue, outcome: &'static str, started: Instant) {
    metrics::counter!("prereg_jobs_total", "queue" => q.short(), "outcome" => outcome).increment(1);
    metrics::histogram!("prereg_job_duration_seconds", "queue" => q.short())
        .record(started.elapsed().as_secs_f64());
}

async fn ack(delivery: &Delivery) {
    let started = Instant::now();
    let r = delivery.ack(BasicAckOptions::default()).await;
    crate::stages::since(crate::stages::Stage::Ack, started);
    if let Err(e) = r {
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
    headers.insert(H_ROUTING_KEY.into(), s(delivery.routing_key.as_str()));
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

/// Waits up to the shutdown grace period for `tasks`; what is unfinished
/// then is aborted, and its deliveries go back to the queue.
async fn drain<T: 'static>(ctx: &Ctx, q: Queue, tasks: &mut JoinSet<T>, what: &str) {
    let all = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(ctx.cfg.shutdown_grace, all)
        .await
        .is_err()
    {
        tracing::warn!(
            queue = q.short(),
            "grace period over; unfinished {what} go back to the queue"
        );
        tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead-letter reason is cut to a byte budget without splitting a
    /// character (a reason may quote a customer's name in any script).
    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("exactly10!", 10), "exactly10!");
        assert_eq!(truncate("abcdefghijk", 10), "abcdefghij…");
        // "é" is two bytes: a cut at byte 3 would split the second one.
        let cut = truncate("éé-rest", 3);
        assert_eq!(cut, "é…");
        // Each of these is three bytes; a budget of 7 keeps two.
        assert_eq!(truncate("日本語です", 7), "日本…");
    }

    #[test]
    fn a_forged_retry_count_stays_in_range() {
        assert_eq!(count_header(3), AMQPValue::LongInt(3));
        assert_eq!(count_header(u32::MAX), AMQPValue::LongInt(i32::MAX));
    }
}
