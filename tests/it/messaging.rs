//! Poison messages, upstream-published commands, reconnection.

use std::time::Duration;

use lapin::options::BasicGetOptions;
use prereg::{
    mq::{CloudEvent, Queue},
    workers::runtime,
};
use serde_json::json;
use uuid::Uuid;

use crate::{
    common::*,
    private::{PrivateRabbit, TempDir},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_their_reason_and_the_queue_moves_on() {
    let (app, p) = spawn_with_partner().await;
    let broker = &app.ctx.broker;
    let commands = broker.names.commands();
    // Not JSON at all.
    broker
        .publish_raw(
            &commands,
            "preregistration.requested",
            b"{definitely not json",
            None,
            Default::default(),
            None,
        )
        .await
        .unwrap();
    // A valid envelope whose data fails validation (bad email and mobile).
    let bad = CloudEvent::new(
        "preregistration.requested",
        json!({"id": Uuid::now_v7(), "partner_id": p.id, "full_name": "X", "email": "nope", "mobile": "123"}),
    );
    broker.publish_upstream(&bad).await.unwrap();
    // Then a good command, published straight by an "upstream system".
    let id = Uuid::now_v7();
    let good = CloudEvent::new(
        "preregistration.requested",
        json!({"id": id, "partner_id": p.id, "full_name": "Good Customer", "email": "good@customer.example", "mobile": "+8612900000001"}),
    );
    broker.publish_upstream(&good).await.unwrap();
    // The worker creates the row from the upstream command.
    wait_until(Duration::from_secs(10), || app.stored(id)).await;
    let v = app.decided(&p, id).await;
    assert_eq!(v["status"], "preregistered");

    let dead = app.dead_letters(Queue::Registration, 2).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_deref().unwrap()).collect();
    assert!(reasons.contains(&"unparseable"), "{dead:?}");
    // Checked as the intake checks an HTTP request: the same reason.
    assert!(reasons.contains(&"validation_failed"), "{dead:?}");
    let invalid = dead
        .iter()
        .find(|d| d.reason.as_deref() == Some("validation_failed"))
        .unwrap();
    assert!(
        invalid.error.as_deref().unwrap().contains("email"),
        "{invalid:?}"
    );
    // Listing leaves them in place; the operator API shows them too.
    let (s, listed) = app
        .get("/v1/admin/dead-letters/registration", OPERATOR)
        .await;
    assert_eq!(s, reqwest::StatusCode::OK);
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    // Listed messages go back to the queue as the listing channel closes.
    let registration = || async {
        let (_, queues) = app.get("/v1/admin/queues", OPERATOR).await;
        queues["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == "registration")
            .unwrap()
            .clone()
    };
    wait_until(std::time::Duration::from_secs(5), || async {
        registration().await["dead_letters"] == 2
    })
    .await;
    let reg = registration().await;
    assert!(reg["consumers"].as_u64().unwrap() >= 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_dead_letters_are_processed_once_fixed() {
    // Commands for a partner that does not exist yet dead-letter; once the
    // partner exists, one replay decides each of them exactly once.
    const N: usize = 5;
    let app = spawn_app().await;
    let (ch, capture) = capture_events(&app.ctx, "replay", "preregistration.*").await;
    let partner_id = Uuid::now_v7();
    let mut ids = Vec::new();
    for i in 0..N {
        let id = Uuid::now_v7();
        let cmd = CloudEvent::new(
            "preregistration.requested",
            json!({"id": id, "partner_id": partner_id, "full_name": "Late", "email": format!("late{i}@customer.example"), "mobile": format!("+86129000000{i:02}")}),
        );
        app.ctx.broker.publish_command(&cmd).await.unwrap();
        ids.push(id);
    }
    assert_eq!(app.dead_letters(Queue::Registration, N).await.len(), N);
    sqlx::query("INSERT INTO partners (id, name, country, contact_email) VALUES ($1, 'Late Partner', 'CN', 'x@y.co')")
        .bind(partner_id)
        .execute(app.db())
        .await
        .unwrap();
    let (s, v) = app
        .post(
            "/v1/admin/dead-letters/registration/replay",
            OPERATOR,
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["replayed"].as_u64()),
        (reqwest::StatusCode::OK, Some(N as u64))
    );
    wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM preregistrations WHERE id = ANY($1) AND status = 'preregistered'",
        )
        .bind(&ids)
        .fetch_one(app.db())
        .await
        .unwrap()
            == N as i64
    })
    .await;
    // Each decided once: one decision in its timeline, one event published.
    for id in &ids {
        assert_eq!(app.decided_entries(*id).await, 1, "{id}");
    }
    app.outbox_drained().await;
    let mut events: Vec<CloudEvent> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match ch
            .basic_get(&capture, BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => events.push(CloudEvent::parse(&m.delivery.data).unwrap()),
            None if events.len() >= N || tokio::time::Instant::now() > deadline => break,
            None => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
    for id in &ids {
        let accepted = events
            .iter()
            .filter(|e| {
                e.ty == "preregistration.accepted"
                    && e.subject.as_deref() == Some(id.to_string().as_str())
            })
            .count();
        assert_eq!(accepted, 1, "accepted events for {id}: {events:?}");
    }
    assert!(
        runtime::list_dead_letters(&app.ctx, Queue::Registration, 20)
            .await
            .unwrap()
            .is_empty()
    );
    // A second replay finds nothing to send back.
    let (_, v) = app
        .post(
            "/v1/admin/dead-letters/registration/replay",
            OPERATOR,
            json!({}),
        )
        .await;
    assert_eq!(v["replayed"].as_u64(), Some(0));
    let _ = ch.close(200, "done").await;
    app.cleanup().await;
}

/// The broker is killed (SIGKILL, no clean close) and started again on the
/// same port: the consumers come back by themselves and new work is decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumers_reconnect_after_the_broker_is_killed_and_restarted() {
    let home = TempDir::new("rabbit");
    let name = format!(
        "prereg-reconnect-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let Some(mut rabbit) = PrivateRabbit::start_in(home.path(), &name) else {
        return;
    };
    let app = spawn_with(|c| {
        c.amqp_url = rabbit.url();
        c.publish_timeout = Duration::from_secs(1);
        c.health_probe_interval = Duration::from_millis(200);
    })
    .await;
    let p = app.create_partner(json!({})).await;
    // The intake answers 503 while its publisher is not (yet) connected; a
    // fresh private node on a loaded machine may still be starting up.
    let accepted = |who: &'static str, mobile: &'static str| {
        let (app, p) = (&app, &p);
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let (status, v) = app.submit(p, json!({"full_name": who, "email": format!("{who}@customer.example"), "mobile": mobile})).await;
                if status == reqwest::StatusCode::ACCEPTED {
                    break v["id"].as_str().unwrap().parse::<Uuid>().unwrap();
                }
                assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{v}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{who}: never accepted"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let first = accepted("before", "+8612800000001").await;
    assert_eq!(app.decided(&p, first).await["status"], "preregistered");

    rabbit.kill();
    assert!(rabbit.start_again(), "node restarts");
    // Accepted again once the publisher is back; then the job must be
    // consumed by a consumer that reconnected on its own.
    let second = accepted("after", "+8612800000002").await;
    assert_eq!(app.decided(&p, second).await["status"], "preregistered");
    // Every worker queue has its consumer again.
    wait_until(Duration::from_secs(20), || async {
        prereg::mq::dead_letters::queue_stats(&app.ctx.broker)
            .await
            .is_ok_and(|queues| queues.iter().all(|q| q["consumers"].as_u64() >= Some(1)))
    })
    .await;
    app.cleanup().await;
    drop(rabbit);
}

/// Whether queue `q` exists (a passive declare, on a channel of its own:
/// a missing queue closes the channel).
async fn queue_exists(conn: &lapin::Connection, q: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = ch
        .queue_declare(q, passive, Default::default())
        .await
        .is_ok();
    let _ = ch.close(200, "checked").await;
    found
}

/// A run killed before its teardown leaves nothing on a shared broker for
/// long: with `PREREG_AMQP_QUEUE_EXPIRES` the broker itself deletes every
/// queue of the prefix (work, dead-letter and delay queues) once unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_of_a_throwaway_prefix_expire_once_its_processes_are_gone() {
    let (mut cfg, db_name) = test_config().await;
    cfg.amqp_queue_expires = Some(Duration::from_secs(4));
    let ctx = prereg::Ctx::new(cfg.clone()).expect("ctx");
    prereg::store::migrate(&ctx.db).await.expect("migrate");
    let roles = prereg::app::Roles {
        intake: true,
        workers: Queue::ALL.to_vec(),
        relay: true,
        health_server: false,
        scheduler: false,
    };
    let running = prereg::app::start(ctx.clone(), roles).await.expect("start");
    let names = ctx.broker.names.clone();
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("broker");
    // The topology is declared once the app's connection is up.
    wait_until(Duration::from_secs(10), || async {
        for q in names.all_queue_names() {
            if !queue_exists(&conn, &q).await {
                return false;
            }
        }
        true
    })
    .await;
    // Consumers keep a queue in use: past the expiry it is still there.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for q in Queue::ALL {
        assert!(queue_exists(&conn, &names.queue(q)).await, "{q:?} in use");
    }

    // The process goes away without deleting anything, as a killed one would.
    running.shutdown().await;
    ctx.db.close().await;
    let mut left = names.all_queue_names();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !left.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut still = Vec::new();
        for q in left {
            if queue_exists(&conn, &q).await {
                still.push(q);
            }
        }
        left = still;
    }
    assert!(left.is_empty(), "still declared 20 s later: {left:?}");
    for x in names.all_exchange_names() {
        let ch = conn.create_channel().await.unwrap();
        let _ = ch.exchange_delete(&x, Default::default()).await;
    }
    let _ = conn.close(200, "done").await;
    drop_database(&db_name).await;
}

/// A test that fails leaves nothing behind on the shared services: the
/// harness's drop guard deletes its queues and drops its database as the
/// panic unwinds (a failing CI run once left a broker to the next one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_that_panics_leaves_no_queues_and_no_database_behind() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let app = spawn_app().await;
        let _ = tx.send((app.ctx.broker.names.clone(), app.db_name.clone()));
        panic!("a failing test");
    });
    let (names, db_name) = rx.await.expect("the app started");
    assert!(failing.await.expect_err("it panicked").is_panic());

    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("broker");
    for q in names.all_queue_names() {
        assert!(!queue_exists(&conn, &q).await, "{q} left behind");
    }
    let _ = conn.close(200, "done").await;
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{}/postgres", pg_base()))
            .await
            .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&db_name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "database {db_name} left behind");
}
