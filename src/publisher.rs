//! A pipelined publisher: a batch of messages is sent on one confirm-mode
//! channel without waiting in between, and the confirms are awaited together.
//! Each message's fate is reported separately and says whether the broker may
//! hold it, so a caller never answers "not done" for work that will happen.
//!
//! It uses its own channel on the process's shared connection: a confirm that
//! never comes closes only this channel, not the connection the consumers use.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::join_all;
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    publisher_confirm::Confirmation,
    types::FieldTable,
    BasicProperties, Channel,
};
use tokio::sync::Mutex;

use crate::{
    deps::Dep,
    mq::{Broker, CloudEvent},
    stages::{self, Stage},
};

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    /// The encoded message, or why it could not be encoded (too large, …):
    /// such a message is never sent and its fate is `NotTaken`.
    pub body: Result<Vec<u8>, String>,
    pub message_id: String,
    /// Must reach a queue (jobs); events may have no listener.
    pub mandatory: bool,
}

impl Outgoing {
    /// One of our own jobs, on the internal exchange (upstream systems
    /// publish to the commands exchange; we do not).
    pub fn command(broker: &Broker, ev: &CloudEvent) -> Self {
        Self {
            exchange: broker.names.internal(),
            routing_key: ev.ty.clone(),
            body: ev.to_bytes().map_err(|e| e.to_string()),
            message_id: ev.id.clone(),
            mandatory: true,
        }
    }

    /// An event on the events exchange.
    pub fn event(broker: &Broker, ev: &CloudEvent) -> Self {
        Self {
            exchange: broker.names.events(),
            routing_key: ev.ty.clone(),
            body: ev.to_bytes().map_err(|e| e.to_string()),
            message_id: ev.id.clone(),
            mandatory: false,
        }
    }
}

/// Why a message the broker refused (nacked) was not taken.
const NACKED: &str = "the broker refused the message (nack)";

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// The broker confirmed it: it is durably queued.
    Confirmed,
    /// The broker certainly does not hold it (never sent, refused, or
    /// unroutable).
    NotTaken(String),
    /// Sent, but no answer: the broker may or may not hold it.
    Unknown(String),
}

impl Fate {
    pub fn is_confirmed(&self) -> bool {
        matches!(self, Fate::Confirmed)
    }
}

pub struct Publisher {
    broker: Arc<Broker>,
    timeout: Duration,
    channel: Mutex<Option<Channel>>,
}

impl Publisher {
    pub fn new(broker: Arc<Broker>, timeout: Duration) -> Self {
        Self {
            broker,
            timeout,
            channel: Mutex::new(None),
        }
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    async fn channel(&self) -> Result<Channel, String> {
        let mut guard = self.channel.lock().await;
        if let Some(ch) = guard.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let (_, ch) = self.broker.channel().await.map_err(|e| e.to_string())?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        *guard = Some(ch.clone());
        Ok(ch)
    }

    /// Drops this publisher's channel (after a confirm that never came), so
    /// the next batch starts on a fresh one.
    async fn discard(&self, ch: &Channel) {
        let mut guard = self.channel.lock().await;
        if guard.as_ref().is_some_and(|c| c.id() == ch.id()) {
            guard.take();
        }
        drop(guard);
        // A connection blocked by an alarm cannot send its close: do not
        // wait for it.
        let ch = ch.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), ch.close(200, "confirm timeout"))
                .await;
        });
    }

    /// Stops using this publisher's channel for new batches (after a nack)
    /// and closes it once the confirms other batches may await on it are
    /// due.
    async fn retire(&self, ch: &Channel) {
        let mut guard = self.channel.lock().await;
        if guard.as_ref().is_some_and(|c| c.id() == ch.id()) {
            guard.take();
        }
        drop(guard);
        let (ch, grace) = (ch.clone(), self.timeout);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), ch.close(200, "nacked")).await;
        });
    }

    /// Publishes every message, then waits (up to the timeout) for all the
    /// confirms together. One fate per message, in order.
    pub async fn publish_all(&self, msgs: &[Outgoing]) -> Vec<Fate> {
        if msgs.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        // While the broker is known to be down (or blocked by an alarm),
        // nothing is sent: the caller answers at once.
        if let Some(reason) = self.broker.health().down_reason(Dep::RabbitMq) {
            let why = format!("broker unavailable: known down: {reason}");
            return msgs.iter().map(|_| Fate::NotTaken(why.clone())).collect();
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let ch = match self.channel().await {
            Ok(ch) => ch,
            Err(e) => {
                let why = format!("broker unavailable: {e}");
                return msgs.iter().map(|_| Fate::NotTaken(why.clone())).collect();
            }
        };
        let mut pending = Vec::with_capacity(msgs.len());
        for m in msgs {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/cloudevents+json".into())
                .with_message_id(m.message_id.as_str().into())
                .with_headers(FieldTable::default());
            let opts = BasicPublishOptions {
                mandatory: m.mandatory,
                ..Default::default()
            };
            let body = match &m.body {
                Ok(b) => b,
                Err(why) => {
                    pending.push(Err(format!("message not sent: {why}")));
                    continue;
                }
            };
            // A connection blocked by an alarm may not even take the frame:
            // the send is bounded by the same deadline as the confirm.
            pending.push(
                match tokio::time::timeout_at(
                    deadline,
                    ch.basic_publish(&m.exchange, &m.routing_key, opts, body, props),
                )
                .await
                {
                    Ok(r) => r.map_err(|e| format!("broker unavailable: {e}")),
                    Err(_) => Err("the broker took nothing in time (blocked?)".into()),
                },
            );
        }
        // lapin hands a returned (unroutable) message to whichever confirm
        // it resolves next, and a `multiple` ack resolves several at once;
        // so a return is matched to its message by message id, not by the
        // confirm that carried it.
        let waits = pending.into_iter().map(|p| async move {
            match p {
                Err(why) => (Fate::NotTaken(why), None),
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Err(_) => (
                        Fate::Unknown("no confirm from the broker in time".into()),
                        None,
                    ),
                    Ok(Err(e)) => (
                        Fate::Unknown(format!("channel failed before the confirm: {e}")),
                        None,
                    ),
                    Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => {
                        (Fate::Confirmed, None)
                    }
                    Ok(Ok(Confirmation::Ack(Some(returned)))) => (
                        Fate::Confirmed,
                        Some(
                            returned
                                .properties
                                .message_id()
                                .as_ref()
                                .map(|id| id.to_string()),
                        ),
                    ),
                    Ok(Ok(Confirmation::Nack(_))) => (Fate::NotTaken(NACKED.into()), None),
                },
            }
        });
        let settled = join_all(waits).await;
        let nacked = settled
            .iter()
            .any(|(f, _)| matches!(f, Fate::NotTaken(why) if why == NACKED));
        let returned: Vec<Option<String>> = settled.iter().filter_map(|(_, r)| r.clone()).collect();
        let fates: Vec<Fate> = settled
            .into_iter()
            .zip(msgs)
            .map(|((fate, _), m)| {
                let came_back = returned
                    .iter()
                    .any(|r| r.as_deref().is_none_or(|id| id == m.message_id));
                match fate {
                    Fate::Confirmed if came_back => {
                        Fate::NotTaken("message unroutable: no queue bound".into())
                    }
                    other => other,
                }
            })
            .collect();
        stages::since(Stage::PublishConfirm, started);
        let mut fates = fates;
        if fates.iter().any(|f| matches!(f, Fate::Unknown(_))) && self.broker.blocked().await {
            // Blocked by a memory or disk alarm: the broker holds the frames
            // back and has taken nothing yet. The caller withdraws the job
            // (and records it, so that a copy released after the alarm is
            // skipped) and answers 503 within the publish timeout.
            for f in fates.iter_mut() {
                if matches!(f, Fate::Unknown(_)) {
                    *f = Fate::NotTaken("the broker is blocked by a resource alarm".into());
                }
            }
            self.broker
                .health()
                .mark_down(Dep::RabbitMq, "blocked by a resource alarm");
            self.discard(&ch).await;
        }
        if fates.iter().any(|f| matches!(f, Fate::Unknown(_))) {
            // The health probe looks again at once; until it finds the
            // broker answering, publishers fail fast.
            self.broker
                .health()
                .mark_down(Dep::RabbitMq, "no confirm from the broker in time");
            self.discard(&ch).await;
        } else if nacked {
            // A channel whose quorum-queue client asks a crashed leader's
            // node refuses everything until it is closed (RabbitMQ 3.10; see
            // `Broker::renew_publish_channel`): the next batch starts on a
            // fresh channel, which looks up the current leader.
            tracing::info!("publishing on a fresh channel after a nack");
            self.retire(&ch).await;
        }
        fates
    }
}
