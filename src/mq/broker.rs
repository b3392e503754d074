//! One AMQP connection per process, (re)established on demand, and a publisher
//! that waits for the broker's confirm and treats an unroutable message
//! (`mandatory`) as an error.
//!
//! `PREREG_AMQP_URL` may list several nodes of a cluster, comma-separated:
//! a connection goes to the first that answers, starting after the node
//! that failed last. While the broker is known to be down (or blocked by a
//! memory or disk alarm) publishing fails at once; the process's health
//! probe reconnects.

use std::{sync::Arc, time::Duration};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    publisher_confirm::Confirmation,
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Connection, ConnectionProperties,
};
use thiserror::Error;
use tokio::sync::Mutex;

use super::{envelope::CloudEvent, topology, Names};
use crate::deps::{Dep, Health};

#[derive(Debug, Error)]
pub enum PublishError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("message unroutable: no queue bound for `{0}`")]
    Unroutable(String),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    #[error("broker blocks publishers (memory or disk alarm)")]
    Blocked,
    #[error("message could not be encoded: {0}")]
    Encode(String),
}

struct Live {
    generation: u64,
    conn: Arc<Connection>,
    publish: Channel,
}

pub struct Broker {
    urls: Vec<String>,
    /// Index in `urls` of the node to try first.
    next_url: std::sync::atomic::AtomicUsize,
    pub names: Names,
    delivery_limit: u32,
    timeout: Duration,
    health: Arc<Health>,
    live: Mutex<Option<Live>>,
    generation: std::sync::atomic::AtomicU64,
}

/// The nodes of `PREREG_AMQP_URL`: one URL, or several separated by commas.
pub fn split_urls(url: &str) -> Vec<String> {
    let urls: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if urls.is_empty() {
        vec![url.to_string()]
    } else {
        urls
    }
}

impl Broker {
    pub fn new(url: &str, names: Names, delivery_limit: u32) -> Self {
        Self {
            urls: split_urls(url),
            next_url: Default::default(),
            names,
            delivery_limit,
            timeout: Duration::from_secs(5),
            health: Arc::new(Health::default()),
            live: Mutex::new(None),
            generation: Default::default(),
        }
    }

    /// Shares the process's dependency health.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = health;
        self
    }

    /// How long a connect or a publish confirm may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects to the first node that answers, starting with `next_url`.
    async fn connect_any(&self) -> Result<Connection, PublishError> {
        use std::sync::atomic::Ordering;
        let n = self.urls.len();
        let start = self.next_url.load(Ordering::Relaxed) % n;
        let mut last = PublishError::Unavailable("no broker address".into());
        for i in 0..n {
            let idx = (start + i) % n;
            let props = ConnectionProperties::default()
                .with_executor(tokio_executor_trait::Tokio::current())
                .with_reactor(tokio_reactor_trait::Tokio)
                .with_connection_name("prereg".into());
            match tokio::time::timeout(self.timeout, Connection::connect(&self.urls[idx], props))
                .await
            {
                Ok(Ok(conn)) => {
                    if n > 1 {
                        tracing::info!(node = idx, "connected to RabbitMQ node");
                    }
                    self.next_url.store(idx, Ordering::Relaxed);
                    return Ok(conn);
                }
                Ok(Err(e)) => last = PublishError::Unavailable(e.to_string()),
                Err(_) => last = PublishError::Timeout(self.timeout),
            }
            if n > 1 {
                tracing::warn!(node = idx, error = %last, "RabbitMQ node unreachable; trying the next");
            }
        }
        // Next time, start after the node that failed first.
        self.next_url.store((start + 1) % n, Ordering::Relaxed);
        Err(last)
    }

    async fn open(&self) -> Result<Live, PublishError> {
        let conn = self.connect_any().await?;
        let publish = conn.create_channel().await.map_err(unavailable)?;
        topology::declare(&publish, &self.names, self.delivery_limit)
            .await
            .map_err(unavailable)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        tracing::info!(generation, "connected to RabbitMQ");
        Ok(Live {
            generation,
            conn: Arc::new(conn),
            publish,
        })
    }

    /// The process's dependency health, shared with other publishers (the
    /// intake's batch publisher) so that they fail fast while the broker is
    /// known to be down and report what they see.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The live connection and publishing channel, reconnecting when needed.
    /// While the broker is known to be down this fails at once (unless
    /// `force`, which the health probe uses to find it back).
    async fn live_inner(
        &self,
        force: bool,
    ) -> Result<(u64, Arc<Connection>, Channel), PublishError> {
        if !force {
            if let Some(reason) = self.health.down_reason(Dep::RabbitMq) {
                return Err(PublishError::Unavailable(format!("known down: {reason}")));
            }
        }
        let mut guard = self.live.lock().await;
        if let Some(l) = guard.as_ref() {
            if l.conn.status().connected() && l.publish.status().connected() {
                return Ok((l.generation, l.conn.clone(), l.publish.clone()));
            }
            tracing::warn!("RabbitMQ connection lost; reconnecting");
            *guard = None;
        }
        match self.open().await {
            Ok(l) => {
                let out = (l.generation, l.conn.clone(), l.publish.clone());
                *guard = Some(l);
                Ok(out)
            }
            Err(e) => {
                self.health.mark_down(Dep::RabbitMq, e.to_string());
                Err(e)
            }
        }
    }

    async fn live(&self) -> Result<(u64, Arc<Connection>, Channel), PublishError> {
        self.live_inner(false).await
    }

    /// Drops the connection of `generation` so the next call reconnects.
    pub async fn reset(&self, generation: u64) {
        let taken = {
            let mut guard = self.live.lock().await;
            if guard.as_ref().is_some_and(|l| l.generation == generation) {
                guard.take()
            } else {
                None
            }
        };
        if let Some(l) = taken {
            // A connection blocked by an alarm cannot send its close: do not
            // wait for it.
            let _ = tokio::time::timeout(Duration::from_secs(1), l.conn.close(320, "reset")).await;
        }
    }

    /// Replaces the publishing channel `old` of `generation` with a fresh
    /// one after the broker refused (nacked) a message on it.
    ///
    /// A channel keeps, per quorum queue, a client that remembers the node
    /// the queue's leader was recorded on when the channel first published
    /// to it. On RabbitMQ 3.10 a channel that first publishes to a queue
    /// after its leader's node crashed, but before a new leader is recorded,
    /// asks the dead node on every later publish and rejects every message,
    /// for as long as the channel lives (see docs/operations.md §3, "what
    /// happens when a node fails"). A fresh channel starts from the leader
    /// recorded now; a nack costs one channel open.
    async fn renew_publish_channel(&self, generation: u64, old: &Channel) {
        let mut guard = self.live.lock().await;
        let Some(l) = guard.as_mut() else { return };
        if l.generation != generation || l.publish.id() != old.id() {
            return; // already replaced, or a new connection
        }
        let fresh = async {
            let ch = l.conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(ch)
        };
        match tokio::time::timeout(self.timeout, fresh).await {
            Ok(Ok(ch)) => {
                let old = std::mem::replace(&mut l.publish, ch);
                tracing::info!(generation, "publishing on a fresh channel after a nack");
                // Other publishes may still await their confirm on the old
                // channel: close it once those are due.
                let grace = self.timeout;
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), old.close(200, "nacked"))
                        .await;
                });
            }
            // The connection is failing: the next publish finds it out.
            Ok(Err(e)) => tracing::warn!(error = %e, "no fresh publishing channel"),
            Err(_) => tracing::warn!("no fresh publishing channel in time"),
        }
    }

    /// Whether the live connection is blocked by a resource alarm: what it
    /// was given is held back by the broker, not taken.
    pub async fn blocked(&self) -> bool {
        let guard = self.live.lock().await;
        guard.as_ref().is_some_and(|l| l.conn.status().blocked())
    }

    /// The health probe: reconnects if needed; a connection blocked by a
    /// resource alarm counts as unavailable.
    pub async fn probe(&self) -> Result<(), PublishError> {
        let (_, conn, _) = self.live_inner(true).await?;
        if conn.status().blocked() {
            return Err(PublishError::Blocked);
        }
        Ok(())
    }

    /// A fresh channel on the shared connection (for a consumer), with its
    /// connection generation.
    pub async fn channel(&self) -> Result<(u64, Channel), PublishError> {
        let (generation, conn, _) = self.live().await?;
        match conn.create_channel().await {
            Ok(ch) => Ok((generation, ch)),
            Err(e) => {
                self.reset(generation).await;
                Err(unavailable(e))
            }
        }
    }

    /// Whether the broker answers now (used by `/readyz`).
    pub async fn ping(&self) -> Result<(), PublishError> {
        self.live().await.map(|_| ())
    }

    pub async fn publish_event(&self, ev: &CloudEvent) -> Result<(), PublishError> {
        self.publish(&self.names.events(), &ev.ty, ev, FieldTable::default())
            .await
    }

    /// Publishes one of our own jobs (see [`crate::jobs`]) on the internal
    /// exchange, which upstream publishers cannot write to.
    pub async fn publish_command(&self, ev: &CloudEvent) -> Result<(), PublishError> {
        self.publish(&self.names.internal(), &ev.ty, ev, FieldTable::default())
            .await
    }

    /// Publishes on the commands exchange shared with upstream systems, as an
    /// upstream system does (tools and tests): only the commands of SPEC §6
    /// are routable there.
    pub async fn publish_upstream(&self, ev: &CloudEvent) -> Result<(), PublishError> {
        self.publish(&self.names.commands(), &ev.ty, ev, FieldTable::default())
            .await
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        ev: &CloudEvent,
        headers: FieldTable,
    ) -> Result<(), PublishError> {
        let body = ev
            .to_bytes()
            .map_err(|e| PublishError::Encode(e.to_string()))?;
        self.publish_raw(exchange, routing_key, &body, Some(&ev.id), headers, None)
            .await
    }

    /// Events fan out to whoever listens: having no listener is fine. Jobs
    /// (commands, retries, dead letters) must reach a queue (`mandatory`).
    fn mandatory(&self, exchange: &str) -> bool {
        exchange != self.names.events()
    }

    /// Publishes and waits for the confirm. Routing failures are errors.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        message_id: Option<&str>,
        headers: FieldTable,
        expiration_ms: Option<u64>,
    ) -> Result<(), PublishError> {
        let (generation, conn, ch) = self.live().await?;
        if conn.status().blocked() {
            // A memory or disk alarm: the broker reads nothing from this
            // connection until it clears. Fail now rather than wait.
            self.health
                .mark_down(Dep::RabbitMq, PublishError::Blocked.to_string());
            return Err(PublishError::Blocked);
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/cloudevents+json".into())
            .with_headers(headers);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        if let Some(ms) = expiration_ms {
            props = props.with_expiration(ms.to_string().into());
        }
        let opts = BasicPublishOptions {
            mandatory: self.mandatory(exchange),
            ..Default::default()
        };
        let attempt = async {
            let confirm = ch
                .basic_publish(exchange, routing_key, opts, body, props)
                .await
                .map_err(unavailable)?;
            confirm.await.map_err(unavailable)
        };
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Err(_) => Err(PublishError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => {
                Err(PublishError::Unroutable(routing_key.to_string()))
            }
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
        };
        match &result {
            Err(e @ PublishError::Timeout(_)) if conn.status().blocked() => {
                // Keep the connection: its blocked state tells the probe
                // when the alarm clears.
                self.health.mark_down(Dep::RabbitMq, e.to_string());
            }
            Err(e @ (PublishError::Unavailable(_) | PublishError::Timeout(_))) => {
                self.health.mark_down(Dep::RabbitMq, e.to_string());
                self.reset(generation).await;
            }
            Err(PublishError::Nacked) => self.renew_publish_channel(generation, &ch).await,
            _ => {}
        }
        result
    }

    /// Deletes every queue and exchange of this prefix (tests, teardown).
    pub async fn delete_topology(&self) -> Result<(), PublishError> {
        let (_, ch) = self.channel().await?;
        for q in self.names.all_queue_names() {
            let _ = ch.queue_delete(&q, Default::default()).await;
        }
        for x in self.names.all_exchange_names() {
            let _ = ch.exchange_delete(&x, Default::default()).await;
        }
        Ok(())
    }

    /// Closes the live connection as a broker restart would (for tests and
    /// operators): every channel on it dies; publishers and consumers
    /// reconnect on their own.
    pub async fn drop_connection(&self) {
        let taken = self.live.lock().await.take();
        if let Some(l) = taken {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), l.conn.close(320, "dropped")).await;
        }
    }

    pub async fn close(&self) {
        let taken = self.live.lock().await.take();
        if let Some(l) = taken {
            let _ = tokio::time::timeout(self.timeout, l.conn.close(200, "shutdown")).await;
        }
    }
}

fn unavailable(e: lapin::Error) -> PublishError {
    PublishError::Unavailable(e.to_string())
}

/// Reads a string header.
pub fn header_str(headers: &Option<FieldTable>, key: &str) -> Option<String> {
    headers.as_ref()?.inner().get(key).and_then(|v| match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    })
}

/// Reads an integer header.
pub fn header_u32(headers: &Option<FieldTable>, key: &str) -> Option<u32> {
    headers.as_ref()?.inner().get(key).and_then(|v| match v {
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        _ => None,
    })
}
