//! Exchange and queue names (all carrying `PREREG_AMQP_PREFIX`) and their
//! idempotent declaration.
//!
//! - `{p}.commands` (topic): shared with upstream systems, which may publish
//!   the commands of SPEC §6 on it; only those types are bound from it
//!   ([`Contract::upstream`]), so anything else published there is unroutable;
//! - `{p}.internal` (direct): our own processes' jobs (email delivery,
//!   review deadlines, exports, retries, replays). Upstream publishers get no
//!   write permission on it. Every job type is bound to its queue, and every
//!   work queue also by its own full name (retries and replays go back to
//!   one queue);
//! - `{p}.events` (topic): what happened;
//! - one durable quorum work queue per job kind, bound to its command keys,
//!   with a delivery limit and `{p}.dlx` as dead-letter exchange;
//! - `{p}.dlx` (direct) → one `{p}.{queue}.dlq` per work queue;
//! - delayed retry without plugins (RabbitMQ 3.10+): `{p}.delay` (headers) →
//!   `{p}.delay.{i}` quorum queues (replicated like the work queues) with a
//!   fixed TTL that dead-letter (at least once) back through `{p}.internal`
//!   to the work queue named by the message's routing key. Each
//!   delay queue is bound on the header [`DELAY_TIER`] (`x-match: all`); the
//!   header must not start with `x-`, which RabbitMQ leaves out of matching
//!   (a binding on an `x-` header alone matches every message). The names
//!   differ from the classic `{p}.retry.{i}` queues of earlier versions, so
//!   declaring never conflicts with queues an older deployment left behind.

use std::time::Duration;

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, ExchangeKind,
};

use crate::jobs::Contract;
pub use crate::jobs::Queue;

/// The header that picks a retry's delay queue (its tier, `0`, `1`, …).
pub const DELAY_TIER: &str = "prereg-delay-tier";

/// Every broker name of one deployment.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
    pub retry_delays: Vec<Duration>,
    /// `x-expires` of every queue (throwaway prefixes only, see
    /// `Config::amqp_queue_expires`).
    pub queue_expires: Option<Duration>,
}

impl Names {
    pub fn new(prefix: &str, retry_delays: Vec<Duration>) -> Self {
        Self {
            prefix: prefix.to_string(),
            retry_delays,
            queue_expires: None,
        }
    }
    /// The same names, with every queue declared to expire once unused for
    /// `after` (`None`: never).
    pub fn expiring(mut self, after: Option<Duration>) -> Self {
        self.queue_expires = after;
        self
    }
    /// Adds `x-expires` to a queue's arguments when this prefix expires.
    fn with_expiry(&self, mut args: FieldTable) -> FieldTable {
        if let Some(after) = self.queue_expires {
            args.insert("x-expires".into(), millis(after));
        }
        args
    }
    pub fn commands(&self) -> String {
        format!("{}.commands", self.prefix)
    }
    pub fn internal(&self) -> String {
        format!("{}.internal", self.prefix)
    }
    pub fn events(&self) -> String {
        format!("{}.events", self.prefix)
    }
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    pub fn retry_exchange(&self) -> String {
        format!("{}.delay", self.prefix)
    }
    pub fn queue(&self, q: Queue) -> String {
        format!("{}.{}", self.prefix, q.short())
    }
    pub fn dlq(&self, q: Queue) -> String {
        format!("{}.{}.dlq", self.prefix, q.short())
    }
    pub fn retry_queue(&self, tier: usize) -> String {
        format!("{}.delay.{tier}", self.prefix)
    }
    /// The retry tier for the n-th retry (1-based) and its delay.
    pub fn retry_tier(&self, retry: u32) -> (usize, Duration) {
        let i = (retry.max(1) as usize - 1).min(self.retry_delays.len() - 1);
        (i, self.retry_delays[i])
    }
    pub fn queue_by_full_name(&self, full: &str) -> Option<Queue> {
        full.strip_prefix(&self.prefix)
            .and_then(|s| s.strip_prefix('.'))
            .and_then(Queue::parse)
    }
    pub fn all_queue_names(&self) -> Vec<String> {
        let mut v: Vec<String> = Queue::ALL
            .iter()
            .flat_map(|q| [self.queue(*q), self.dlq(*q)])
            .collect();
        v.extend((0..self.retry_delays.len()).map(|i| self.retry_queue(i)));
        v
    }
    pub fn all_exchange_names(&self) -> Vec<String> {
        vec![
            self.commands(),
            self.internal(),
            self.events(),
            self.dlx(),
            self.retry_exchange(),
        ]
    }
}

/// The delivery limit of the dead-letter queues: in effect none, so that
/// browsing them (each hand-back counts as a delivery on a quorum queue)
/// never drops a dead letter.
pub const DLQ_DELIVERY_LIMIT: i32 = i32::MAX;

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// A duration as the broker's millisecond arguments take it.
fn millis(d: Duration) -> AMQPValue {
    AMQPValue::LongInt(d.as_millis().min(i32::MAX as u128) as i32)
}

fn str_arg(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Declares everything; safe to run at every start from every process.
pub async fn declare(ch: &Channel, names: &Names, delivery_limit: u32) -> lapin::Result<()> {
    ch.exchange_declare(
        &names.commands(),
        ExchangeKind::Topic,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        &names.internal(),
        ExchangeKind::Direct,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        &names.events(),
        ExchangeKind::Topic,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        &names.dlx(),
        ExchangeKind::Direct,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        &names.retry_exchange(),
        ExchangeKind::Headers,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;

    for q in Queue::ALL {
        let mut dlq_args = FieldTable::default();
        dlq_args.insert("x-queue-type".into(), str_arg("quorum"));
        // Browsing hands messages back, which counts as a delivery: no
        // browse may ever drop a dead letter (see `dead_letters`).
        dlq_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(DLQ_DELIVERY_LIMIT),
        );
        ch.queue_declare(&names.dlq(q), durable_queue(), names.with_expiry(dlq_args))
            .await?;
        ch.queue_bind(
            &names.dlq(q),
            &names.dlx(),
            q.short(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), str_arg("quorum"));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(delivery_limit as i32),
        );
        args.insert("x-dead-letter-exchange".into(), str_arg(&names.dlx()));
        args.insert("x-dead-letter-routing-key".into(), str_arg(q.short()));
        ch.queue_declare(&names.queue(q), durable_queue(), names.with_expiry(args))
            .await?;
        for (exchange, key) in bindings(names, q) {
            ch.queue_bind(
                &names.queue(q),
                &exchange,
                &key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
    }

    for (i, delay) in names.retry_delays.iter().enumerate() {
        ch.queue_declare(
            &names.retry_queue(i),
            durable_queue(),
            names.with_expiry(delay_args(names, *delay)),
        )
        .await?;
        ch.queue_bind(
            &names.retry_queue(i),
            &names.retry_exchange(),
            "",
            QueueBindOptions::default(),
            delay_binding(i),
        )
        .await?;
    }
    Ok(())
}

/// A delay queue: quorum (replicated), a fixed TTL, and at-least-once
/// dead-lettering to the internal exchange, which routes by the message's
/// own routing key (the full name of its work queue).
fn delay_args(names: &Names, delay: Duration) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), str_arg("quorum"));
    args.insert("x-message-ttl".into(), millis(delay));
    args.insert("x-dead-letter-exchange".into(), str_arg(&names.internal()));
    args.insert("x-dead-letter-strategy".into(), str_arg("at-least-once"));
    // At-least-once dead-lettering requires `reject-publish` overflow.
    args.insert("x-overflow".into(), str_arg("reject-publish"));
    args
}

/// The (exchange, routing key) pairs a work queue is bound with: its
/// upstream commands from the shared exchange; every type it consumes, and
/// its own name, from the internal one.
pub fn bindings(names: &Names, q: Queue) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = q
        .contracts()
        .filter(|c: &&Contract| c.upstream)
        .map(|c| (names.commands(), c.ty.to_string()))
        .collect();
    out.extend(q.contracts().map(|c| (names.internal(), c.ty.to_string())));
    out.push((names.internal(), names.queue(q)));
    out
}

/// The binding of delay queue `tier`: exactly the messages whose
/// [`DELAY_TIER`] header names it.
fn delay_binding(tier: usize) -> FieldTable {
    let mut bind = FieldTable::default();
    bind.insert("x-match".into(), str_arg("all"));
    bind.insert(DELAY_TIER.into(), str_arg(&tier.to_string()));
    bind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let n = Names::new("t1", vec![Duration::from_secs(1), Duration::from_secs(5)]);
        assert!(n.all_queue_names().iter().all(|q| q.starts_with("t1.")));
        assert!(n.all_exchange_names().iter().all(|q| q.starts_with("t1.")));
        assert_eq!(n.queue(Queue::Email), "t1.email");
        assert_eq!(n.dlq(Queue::Email), "t1.email.dlq");
        assert_eq!(
            n.queue_by_full_name("t1.registration"),
            Some(Queue::Registration)
        );
        assert_eq!(n.internal(), "t1.internal");
        assert_eq!(n.retry_tier(1), (0, Duration::from_secs(1)));
        assert_eq!(n.retry_tier(9), (1, Duration::from_secs(5)));
    }

    #[test]
    fn internal_jobs_are_not_bound_from_the_shared_commands_exchange() {
        let n = Names::new("t", vec![]);
        let email = bindings(&n, Queue::Email);
        assert!(email.contains(&(n.commands(), "invitation.requested".into())));
        assert!(!email.contains(&(n.commands(), "email.requested".into())));
        assert!(email.contains(&(n.internal(), "email.requested".into())));
        assert!(email.contains(&(n.internal(), "t.email".into())));
        let deadlines = bindings(&n, Queue::Deadlines);
        assert!(deadlines.iter().all(|(x, _)| *x == n.internal()));
    }

    #[test]
    fn delay_bindings_match_on_a_header_rabbitmq_does_not_ignore() {
        // RabbitMQ skips headers starting with `x-` when matching: a binding
        // on such a header alone would match every message.
        assert!(!DELAY_TIER.starts_with("x-"));
        let b = delay_binding(2);
        assert_eq!(b.inner().get(DELAY_TIER), Some(&str_arg("2")));
        assert_eq!(b.inner().get("x-match"), Some(&str_arg("all")));
        let a = delay_args(&Names::new("t", vec![]), Duration::from_millis(1500));
        assert_eq!(a.inner().get("x-queue-type"), Some(&str_arg("quorum")));
        assert_eq!(
            a.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongInt(1500))
        );
    }

    #[test]
    fn only_an_expiring_prefix_declares_x_expires() {
        let plain = Names::new("t", vec![]);
        assert_eq!(
            plain
                .with_expiry(FieldTable::default())
                .inner()
                .get("x-expires"),
            None
        );
        let throwaway = plain.expiring(Some(Duration::from_secs(90)));
        assert_eq!(
            throwaway
                .with_expiry(FieldTable::default())
                .inner()
                .get("x-expires"),
            Some(&AMQPValue::LongInt(90_000))
        );
    }
}
