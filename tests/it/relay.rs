//! The outbox relay: rows a crashed relay left leased are published once,
//! after their lease; two relays at once publish every row once; a batch in
//! which one message is refused publishes the others and keeps that one.
//! Events staged a grace period ahead are published by the process that
//! decided them, without any relay; those the broker refuses are left to
//! the relay soon.

use std::{collections::HashMap, sync::Arc, time::Duration};

use lapin::{
    options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel,
};
use prereg::{
    app::{self, Roles},
    mq::{CloudEvent, Queue},
    store::outbox,
    Ctx,
};
use serde_json::json;
use uuid::Uuid;

use crate::common::*;

/// A database and broker prefix of its own, with nothing running on it.
struct Bare {
    ctx: Arc<Ctx>,
    db_name: String,
}

impl Bare {
    async fn new() -> Bare {
        let (cfg, db_name) = test_config().await;
        let ctx = Ctx::new(cfg).expect("ctx");
        prereg::store::migrate(&ctx.db).await.expect("migrate");
        Bare { ctx, db_name }
    }

    /// Another process-equivalent on the same database and broker.
    fn twin(&self) -> Arc<Ctx> {
        Ctx::new(self.ctx.cfg.clone()).expect("ctx")
    }

    async fn cleanup(self) {
        release(&self.ctx, &self.db_name).await;
    }
}

/// A queue of the test's own bound to `relay.#` on the events exchange.
async fn capture(ctx: &Ctx) -> (Channel, String) {
    capture_events(ctx, "relay", "relay.#").await
}

/// Takes everything captured so far; counts per message id.
async fn take(ch: &Channel, queue: &str, seen: &mut HashMap<String, usize>) {
    while let Some(m) = ch
        .basic_get(queue, BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let ev = CloudEvent::parse(&m.delivery.data).unwrap();
        *seen.entry(ev.id).or_default() += 1;
    }
}

fn event(i: usize) -> CloudEvent {
    CloudEvent::with_id(format!("relay-{i}"), "relay.test", json!({"n": i}))
}

async fn write_events(ctx: &Ctx, range: std::ops::Range<usize>) {
    let evs: Vec<CloudEvent> = range.map(event).collect();
    let mut conn = ctx.db.acquire().await.unwrap();
    outbox::events(&mut conn, &evs).await.unwrap();
}

async fn outbox_rows(ctx: &Ctx) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&ctx.db)
        .await
        .unwrap()
}

/// Waits until `n` distinct ids were captured; returns the counts.
async fn captured(ch: &Channel, queue: &str, n: usize, limit: Duration) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        take(ch, queue, &mut seen).await;
        if seen.len() >= n {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} messages published",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_crashed_relay_left_leased_are_published_once_after_their_lease() {
    let bare = Bare::new().await;
    let (ch, queue) = capture(&bare.ctx).await;
    // What a relay killed between leasing and publishing leaves: 30 rows
    // leased (attempted once, due again in 1.5 s); 30 more are due now.
    write_events(&bare.ctx, 0..30).await;
    sqlx::query(
        "UPDATE outbox SET attempts = 1, publish_after = now() + interval '1500 milliseconds'",
    )
    .execute(&bare.ctx.db)
    .await
    .unwrap();
    write_events(&bare.ctx, 30..60).await;
    let leased_until = tokio::time::Instant::now() + Duration::from_millis(1400);
    // A relay starts (a new process).
    let relay = app::start(
        bare.twin(),
        Roles {
            relay: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let first = captured(&ch, &queue, 30, Duration::from_secs(10)).await;
    assert!(
        tokio::time::Instant::now() < leased_until,
        "too slow to tell the due rows from the leased ones"
    );
    assert!(
        first
            .keys()
            .all(|id| id["relay-".len()..].parse::<usize>().unwrap() >= 30),
        "a leased row was published inside its lease: {first:?}"
    );
    // After the lease, the left-over rows go out too, each once.
    let mut seen = captured(&ch, &queue, 30, Duration::from_secs(10)).await;
    wait_until(Duration::from_secs(5), || async {
        outbox_rows(&bare.ctx).await == 0
    })
    .await;
    take(&ch, &queue, &mut seen).await;
    for (id, n) in &first {
        *seen.entry(id.clone()).or_default() += n;
    }
    assert_eq!(seen.len(), 60, "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    relay.shutdown().await;
    let _ = ch.close(200, "done").await;
    bare.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_at_once_publish_each_row_once() {
    const ROWS: usize = 2000;
    let bare = Bare::new().await;
    let (ch, queue) = capture(&bare.ctx).await;
    let (one, two) = (bare.twin(), bare.twin());
    // Warm both publishers (connection, topology) before the race.
    for c in [&one, &two] {
        c.broker.channel().await.unwrap();
    }
    // A barrier: the rows are written while the outbox is locked; both
    // relays' leasing statements are seen waiting before either runs.
    let mut barrier = bare.ctx.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE outbox IN SHARE MODE")
        .execute(&mut *barrier)
        .await
        .unwrap();
    let evs: Vec<CloudEvent> = (0..ROWS).map(event).collect();
    outbox::events(&mut barrier, &evs).await.unwrap();
    let run = |ctx: Arc<Ctx>| async move {
        let mut total = 0;
        loop {
            let n = outbox::relay_once(&ctx.db, &ctx.publisher, 100, Duration::from_secs(30))
                .await
                .unwrap();
            if n == 0 {
                return total;
            }
            total += n;
        }
    };
    let racing = tokio::spawn(async move { tokio::join!(run(one), run(two)) });
    wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND wait_event_type = 'Lock' AND query LIKE '%publish_after%'",
        )
        .fetch_one(&bare.ctx.db)
        .await
        .unwrap()
            == 2
    })
    .await;
    barrier.commit().await.unwrap();
    let (a, b) = racing.await.unwrap();
    assert_eq!(a + b, ROWS, "rows leased: {a} + {b}");
    assert!(a > 0 && b > 0, "one relay did everything: {a} + {b}");
    assert_eq!(outbox_rows(&bare.ctx).await, 0);
    let mut seen = captured(&ch, &queue, ROWS, Duration::from_secs(10)).await;
    // Anything published twice would be in the queue by now (confirmed).
    take(&ch, &queue, &mut seen).await;
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    let _ = ch.close(200, "done").await;
    bare.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_refused_message_publishes_the_rest_and_keeps_that_row() {
    let bare = Bare::new().await;
    let (ch, queue) = capture(&bare.ctx).await;
    write_events(&bare.ctx, 0..4).await;
    // A job no queue is bound to: the broker returns it (mandatory), so its
    // publish fails while the events around it succeed.
    let orphan = CloudEvent::with_id("relay-orphan".into(), "relay.nobody.consumes", json!({}));
    {
        let mut conn = bare.ctx.db.acquire().await.unwrap();
        outbox::command(&mut conn, &orphan).await.unwrap();
    }
    write_events(&bare.ctx, 4..9).await;
    let n = outbox::relay_once(
        &bare.ctx.db,
        &bare.ctx.publisher,
        100,
        Duration::from_secs(30),
    )
    .await
    .expect("a partly failed batch is not an error");
    assert_eq!(n, 10, "one batch");
    let mut seen = captured(&ch, &queue, 9, Duration::from_secs(10)).await;
    take(&ch, &queue, &mut seen).await;
    assert_eq!(seen.len(), 9);
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    // Only the refused row is left, attempted once, due again soon (not
    // after the 30 s lease).
    let (left, attempts, due_in): (String, i32, f64) = sqlx::query_as(
        "SELECT message->>'id', attempts, EXTRACT(EPOCH FROM publish_after - now())::float8 FROM outbox",
    )
    .fetch_one(&bare.ctx.db)
    .await
    .unwrap();
    assert_eq!((left.as_str(), attempts), ("relay-orphan", 1));
    assert!(due_in > 0.0 && due_in < 5.0, "due again in {due_in} s");
    assert_eq!(outbox_rows(&bare.ctx).await, 1);
    // Not due yet: the next round leaves it alone; once due it is tried again.
    assert_eq!(
        outbox::relay_once(
            &bare.ctx.db,
            &bare.ctx.publisher,
            100,
            Duration::from_secs(30)
        )
        .await
        .unwrap(),
        0
    );
    let _ = ch.close(200, "done").await;
    bare.cleanup().await;
}

/// A worker publishes its decisions' events itself, right after the commit
/// (their outbox rows are due for a relay only a grace period later): with
/// no relay running anywhere, every event arrives and no row is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_publishes_its_decision_events_without_any_relay() {
    const N: u32 = 12;
    let roles = Roles {
        intake: true,
        workers: vec![Queue::Registration],
        relay: false,
        ..Default::default()
    };
    let app = spawn_node(|c| c.outbox_grace = Duration::from_secs(600), roles).await;
    let (ch, queue) = capture_events(&app.ctx, "decided", "preregistration.*").await;
    let p = app.create_partner(json!({})).await;
    let mut ids: Vec<Uuid> = Vec::new();
    for i in 0..N {
        let (email, mobile) = customer("selfpub", i, 13_700_000_000);
        ids.push(app.prereg(&p, &email, &mobile).await);
    }
    app.all_granted(&p, &ids).await;
    let seen = captured(&ch, &queue, N as usize, Duration::from_secs(10)).await;
    for id in &ids {
        assert_eq!(
            seen.get(&format!("preregistration.accepted:{id}")),
            Some(&1),
            "{seen:?}"
        );
    }
    app.outbox_drained().await;
    let _ = ch.close(200, "done").await;
    app.cleanup().await;
}

/// A staged event the broker does not confirm stays in the outbox, due for
/// the relay soon rather than after the grace period; the confirmed one is
/// deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_event_the_broker_refuses_is_left_to_the_relay_soon() {
    let bare = Bare::new().await;
    let (ch, queue) = capture(&bare.ctx).await;
    // A queue that is always full and refuses what would overflow it: the
    // broker nacks every message routed to it.
    let refusing = format!("{}.refusing", bare.ctx.broker.names.prefix);
    let mut args = expiring_queue();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(&refusing, QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.queue_bind(
        &refusing,
        &bare.ctx.broker.names.events(),
        "refused.test",
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let refused = CloudEvent::with_id("relay-refused".into(), "refused.test", json!({}));
    let events = [event(1), refused];
    let mut ids: Vec<i64> = Vec::new();
    for ev in &events {
        ids.push(
            sqlx::query_scalar(
                "INSERT INTO outbox (exchange, routing_key, message, publish_after)
                 VALUES ('events', $1, $2, now() + interval '1 hour') RETURNING id",
            )
            .bind(&ev.ty)
            .bind(serde_json::to_value(ev).unwrap())
            .fetch_one(&bare.ctx.db)
            .await
            .unwrap(),
        );
    }
    let confirmed = outbox::publish_staged(&bare.ctx.db, &bare.ctx.publisher, &ids, &events)
        .await
        .unwrap();
    assert_eq!(confirmed, 1);
    let seen = captured(&ch, &queue, 1, Duration::from_secs(5)).await;
    assert_eq!(seen.get("relay-1"), Some(&1), "{seen:?}");
    let (left, due_in): (String, f64) = sqlx::query_as(
        "SELECT message->>'id', EXTRACT(EPOCH FROM publish_after - now())::float8 FROM outbox",
    )
    .fetch_one(&bare.ctx.db)
    .await
    .unwrap();
    assert_eq!(left, "relay-refused");
    assert!(due_in < 5.0, "due for the relay in {due_in} s");
    let _ = ch.queue_delete(&refusing, Default::default()).await;
    let _ = ch.close(200, "done").await;
    bare.cleanup().await;
}
