//! Dead letters and queue statistics, for operators (API, dashboard, CLI).
//!
//! Browsing takes messages with `basic.get` and hands them back by closing
//! the channel; on a quorum queue every hand-back counts as a delivery. The
//! dead-letter queues are therefore declared with a delivery limit no browse
//! can reach (`topology::DLQ_DELIVERY_LIMIT`), so looking at a dead
//! letter never drops it (RabbitMQ 4 gives quorum queues a default limit of
//! 20).

use chrono::Utc;
use lapin::{
    options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::{json, Value};

use super::{
    broker::{header_str, header_u32},
    Broker, Queue,
};

pub const H_RETRIES: &str = "x-retry-count";
pub const H_REASON: &str = "x-prereg-reason";
pub const H_ERROR: &str = "x-prereg-error";
pub const H_QUEUE: &str = "x-prereg-queue";
pub const H_FAILED_AT: &str = "x-prereg-failed-at";
pub const H_ROUTING_KEY: &str = "x-prereg-routing-key";
pub const H_REPLAY_RUN: &str = "x-prereg-replay-run";
pub const H_REPLAYED_AT: &str = "x-prereg-replayed-at";

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
    /// Every AMQP header, as text (for the dashboard; the API shows the
    /// fields above).
    #[serde(skip)]
    pub headers: Vec<(String, String)>,
}

/// A header value as text.
fn header_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::FieldArray(a) => format!(
            "[{}]",
            a.as_slice()
                .iter()
                .map(header_text)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::FieldTable(t) => format!(
            "{{{}}}",
            t.inner()
                .iter()
                .map(|(k, v)| format!("{}: {}", k, header_text(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("{other:?}"),
    }
}

fn view(d: &lapin::message::Delivery) -> DeadLetter {
    let h = d.properties.headers().clone();
    DeadLetter {
        message_id: message_id(d),
        reason: header_str(&h, H_REASON),
        error: header_str(&h, H_ERROR),
        failed_at: header_str(&h, H_FAILED_AT),
        retries: header_u32(&h, H_RETRIES),
        routing_key: header_str(&h, H_ROUTING_KEY),
        body: String::from_utf8_lossy(&d.data).into_owned(),
        headers: h
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), header_text(v)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn message_id(d: &lapin::message::Delivery) -> Option<String> {
    d.properties.message_id().as_ref().map(|s| s.to_string())
}

/// Reads up to `limit` dead letters of a queue without removing them.
pub async fn list(broker: &Broker, q: Queue, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let (_, ch) = broker.channel().await?;
    let dlq = broker.names.dlq(q);
    let mut out = Vec::new();
    let mut last_tag = None;
    while out.len() < limit {
        let Some(msg) = ch
            .basic_get(&dlq, BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        last_tag = Some(msg.delivery.delivery_tag);
        out.push(view(&msg.delivery));
    }
    if let Some(tag) = last_tag {
        // Hand them all back, then wait until the queue shows them ready
        // again: a browse right after this one (an operator refreshing)
        // would otherwise find the queue empty while the hand-back is
        // still on its way to the queue's leader.
        ch.basic_nack(
            tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await?;
        let deadline = tokio::time::Instant::now() + HAND_BACK_WAIT;
        while passive_declare(&ch, &dlq).await?.message_count() < out.len() as u32
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    let _ = ch.close(200, "listed").await;
    Ok(out)
}

/// How long a browse waits for the dead letters it looked at to be ready
/// in their queue again.
const HAND_BACK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The headers of a replayed message: a fresh retry count.
fn replay_headers(mut headers: FieldTable, run: &str) -> FieldTable {
    headers.insert(H_REPLAY_RUN.into(), AMQPValue::LongString(run.into()));
    headers.insert(H_RETRIES.into(), AMQPValue::LongInt(0));
    headers.insert(
        H_REPLAYED_AT.into(),
        AMQPValue::LongString(Utc::now().to_rfc3339().into()),
    );
    headers
}

/// Sends a dead letter back to its work queue (through the internal
/// exchange, which binds every work queue by its own name).
async fn send_back(
    broker: &Broker,
    q: Queue,
    d: &lapin::message::Delivery,
    run: &str,
) -> anyhow::Result<()> {
    let headers = replay_headers(d.properties.headers().clone().unwrap_or_default(), run);
    let id = message_id(d);
    broker
        .publish_raw(
            &broker.names.internal(),
            &broker.names.queue(q),
            &d.data,
            id.as_deref(),
            headers,
            None,
        )
        .await?;
    Ok(())
}

/// Moves up to `limit` dead letters back to their work queue, with a fresh
/// retry count. Returns how many were replayed.
pub async fn replay(broker: &Broker, q: Queue, limit: usize) -> anyhow::Result<usize> {
    let (_, ch) = broker.channel().await?;
    // Only what was dead before: each message this run replays carries the
    // run's id, so one that fails again and comes back is left in place.
    let run = uuid::Uuid::new_v4().to_string();
    let mut n = 0;
    while n < limit {
        let Some(msg) = ch
            .basic_get(&broker.names.dlq(q), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let h = msg.delivery.properties.headers().clone();
        if header_str(&h, H_REPLAY_RUN).as_deref() == Some(run.as_str()) {
            msg.delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
            break;
        }
        send_back(broker, q, &msg.delivery, &run).await?;
        msg.delivery.ack(BasicAckOptions::default()).await?;
        n += 1;
    }
    let _ = ch.close(200, "replayed").await;
    Ok(n)
}

/// Moves the one dead letter whose message id is `message_id` back to its
/// work queue, with a fresh retry count; the others stay. Returns whether it
/// was found.
pub async fn replay_one(broker: &Broker, q: Queue, message_id: &str) -> anyhow::Result<bool> {
    let (_, ch) = broker.channel().await?;
    let run = uuid::Uuid::new_v4().to_string();
    let mut found = false;
    // Unacknowledged messages are not handed out twice on one channel, so
    // this visits each dead letter once; closing the channel returns the rest.
    while let Some(msg) = ch
        .basic_get(&broker.names.dlq(q), BasicGetOptions { no_ack: false })
        .await?
    {
        if message_id_matches(&msg.delivery, message_id) {
            send_back(broker, q, &msg.delivery, &run).await?;
            msg.delivery.ack(BasicAckOptions::default()).await?;
            found = true;
            break;
        }
    }
    let _ = ch.close(200, "replayed one").await;
    Ok(found)
}

/// Removes the one dead letter whose message id is `message_id` for good
/// (an operator's decision that it is of no use); the others stay. Returns
/// whether it was found.
pub async fn discard_one(broker: &Broker, q: Queue, message_id: &str) -> anyhow::Result<bool> {
    let (_, ch) = broker.channel().await?;
    let mut found = false;
    // As in `replay_one`: each dead letter is visited once on this channel.
    while let Some(msg) = ch
        .basic_get(&broker.names.dlq(q), BasicGetOptions { no_ack: false })
        .await?
    {
        if message_id_matches(&msg.delivery, message_id) {
            msg.delivery.ack(BasicAckOptions::default()).await?;
            found = true;
            break;
        }
    }
    let _ = ch.close(200, "discarded one").await;
    Ok(found)
}

fn message_id_matches(d: &lapin::message::Delivery, id: &str) -> bool {
    message_id(d).as_deref() == Some(id)
}

/// The passive declare of a durable queue: its depth and consumers, or an
/// error if it does not exist.
pub async fn passive_declare(
    ch: &lapin::Channel,
    name: &str,
) -> Result<lapin::Queue, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name, passive, Default::default()).await
}

/// Work queue `q` and its dead-letter queue, as passive declares see them.
pub async fn depths(
    ch: &lapin::Channel,
    names: &super::topology::Names,
    q: Queue,
) -> Result<(lapin::Queue, lapin::Queue), lapin::Error> {
    let work = passive_declare(ch, &names.queue(q)).await?;
    let dlq = passive_declare(ch, &names.dlq(q)).await?;
    Ok((work, dlq))
}

/// Depth and consumers of every work queue and its dead-letter queue (and
/// the queue gauges of `/metrics`).
pub async fn queue_stats(broker: &Broker) -> anyhow::Result<Vec<Value>> {
    let (_, ch) = broker.channel().await?;
    let mut out = Vec::new();
    for q in Queue::ALL {
        let (work, dlq) = depths(&ch, &broker.names, q).await?;
        metrics::gauge!("prereg_queue_depth", "queue" => q.short())
            .set(work.message_count() as f64);
        metrics::gauge!("prereg_dead_letters", "queue" => q.short())
            .set(dlq.message_count() as f64);
        metrics::gauge!("prereg_queue_consumers", "queue" => q.short())
            .set(work.consumer_count() as f64);
        if work.message_count() == 0 {
            // Nothing waits: the oldest message is no age at all.
            metrics::gauge!("prereg_queue_oldest_message_age_seconds", "queue" => q.short())
                .set(0.0);
        }
        out.push(json!({
            "queue": q.short(),
            "messages": work.message_count(),
            "consumers": work.consumer_count(),
            "dead_letters": dlq.message_count(),
        }));
    }
    let _ = ch.close(200, "stats").await;
    Ok(out)
}
