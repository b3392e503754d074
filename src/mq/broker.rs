//! One AMQP connection per process, (re)established on demand, and a publisher
//! that waits for the broker's confirm and treats an unroutable message
//! (`mandatory`) as an error.

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
    #[error("message could not be encoded: {0}")]
    Encode(String),
}

struct Live {
    generation: u64,
    conn: Arc<Connection>,
    publish: Channel,
}

pub struct Broker {
    url: String,
    pub names: Names,
    delivery_limit: u32,
    timeout: Duration,
    live: Mutex<Option<Live>>,
    generation: std::sync::atomic::AtomicU64,
}

impl Broker {
    pub fn new(url: &str, names: Names, delivery_limit: u32) -> Self {
        Self {
            url: url.to_string(),
            names,
            delivery_limit,
            timeout: Duration::from_secs(5),
            live: Mutex::new(None),
            generation: Default::default(),
        }
    }

    async fn open(&self) -> Result<Live, PublishError> {
        let props = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio)
            .with_connection_name("prereg".into());
        let conn = tokio::time::timeout(self.timeout, Connection::connect(&self.url, props))
            .await
            .map_err(|_| PublishError::Timeout(self.timeout))?
            .map_err(|e| PublishError::Unavailable(e.to_string()))?;
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

    /// The live connection and publishing channel, reconnecting when needed.
    async fn live(&self) -> Result<(u64, Arc<Connection>, Channel), PublishError> {
        let mut guard = self.live.lock().await;
        if let Some(l) = guard.as_ref() {
            if l.conn.status().connected() && l.publish.status().connected() {
                return Ok((l.generation, l.conn.clone(), l.publish.clone()));
            }
            tracing::warn!("RabbitMQ connection lost; reconnecting");
        }
        let l = self.open().await?;
        let out = (l.generation, l.conn.clone(), l.publish.clone());
        *guard = Some(l);
        Ok(out)
    }

    /// Drops the connection of `generation` so the next call reconnects.
    pub async fn reset(&self, generation: u64) {
        let mut guard = self.live.lock().await;
        if guard.as_ref().is_some_and(|l| l.generation == generation) {
            if let Some(l) = guard.take() {
                let _ = l.conn.close(320, "reset").await;
            }
        }
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
        let (generation, _, ch) = self.live().await?;
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
        if matches!(
            result,
            Err(PublishError::Unavailable(_) | PublishError::Timeout(_))
        ) {
            self.reset(generation).await;
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
        if let Some(l) = self.live.lock().await.take() {
            let _ = l.conn.close(320, "dropped").await;
        }
    }

    pub async fn close(&self) {
        if let Some(l) = self.live.lock().await.take() {
            let _ = l.conn.close(200, "shutdown").await;
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
