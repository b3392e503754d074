//! Delayed retries: each retry lands in exactly one delay queue, waits that
//! tier's delay, comes back once, and a job out of retries is dead-lettered
//! exactly once.

use std::time::{Duration, Instant};

use lapin::{
    options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions},
    types::FieldTable,
    Channel,
};
use prereg::mq::Queue;
use serde_json::json;

use crate::common::*;

const DELAYS_MS: [u64; 3] = [400, 800, 1200];

/// How many messages a queue holds now (passive declare: changes nothing).
pub async fn depth(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue exists")
    .message_count()
}

/// A job that keeps failing: an invitation email while the SMTP server
/// refuses connections (a transient failure, retried). Returns its id.
pub async fn failing_invitation(app: &TestApp) -> String {
    let p = app.create_partner(json!({})).await;
    let id = app
        .claimed(&p, "retry@customer.example", "+8613600000001")
        .await;
    app.invite(&p, id).await
}

/// An SMTP address nothing listens on.
pub const NO_SMTP: &str = "smtp://127.0.0.1:1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_occupies_one_delay_slot_waits_each_delay_and_dead_letters_once() {
    let app = spawn_with(|c| {
        c.retry_delays = DELAYS_MS
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        c.max_attempts = 4;
        c.smtp_url = NO_SMTP.into();
    })
    .await;
    let names = app.ctx.broker.names.clone();
    let (_, ch) = app.ctx.broker.channel().await.unwrap();
    // The invitation's email job fails (SMTP down) until retries run out.
    failing_invitation(&app).await;

    // Sample every delay queue until the dead letter appears.
    let tiers = DELAYS_MS.len();
    let mut entered: Vec<Option<Instant>> = vec![None; tiers];
    let mut left: Vec<Option<Instant>> = vec![None; tiers];
    let mut max_total = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut total = 0;
        for (i, (entered, left)) in entered.iter_mut().zip(left.iter_mut()).enumerate() {
            let n = depth(&ch, &names.retry_queue(i)).await;
            total += n;
            let now = Instant::now();
            if n > 0 && entered.is_none() {
                *entered = Some(now);
            }
            if n == 0 && entered.is_some() && left.is_none() {
                *left = Some(now);
            }
        }
        max_total = max_total.max(total);
        assert!(
            total <= 1,
            "one waiting job occupies {total} delay-queue slots (copies)"
        );
        if depth(&ch, &names.dlq(Queue::Email)).await > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(max_total, 1, "the retry was never seen waiting");

    // Each retry went to its own tier, once, and waited that tier's delay
    // (the runtime jitters down to 80 %; sampling adds a little).
    for (i, ms) in DELAYS_MS.iter().enumerate() {
        let (Some(a), Some(b)) = (entered[i], left[i]) else {
            panic!("retry {} never waited in delay queue {i}", i + 1);
        };
        let waited = b - a;
        let lo = Duration::from_millis(ms * 4 / 5).saturating_sub(Duration::from_millis(60));
        let hi = Duration::from_millis(ms + 300);
        assert!(
            waited >= lo && waited <= hi,
            "retry {} waited {waited:?}, configured {ms} ms",
            i + 1
        );
    }
    // Retries happen in order: the n-th retry starts after the (n-1)-th ended.
    for i in 1..tiers {
        assert!(entered[i].unwrap() >= left[i - 1].unwrap());
    }

    // Exactly one dead letter, out of retries, and nothing left waiting even
    // after the longest delay has passed again.
    tokio::time::sleep(Duration::from_millis(DELAYS_MS[tiers - 1] + 300)).await;
    assert_eq!(depth(&ch, &names.dlq(Queue::Email)).await, 1);
    for i in 0..tiers {
        assert_eq!(depth(&ch, &names.retry_queue(i)).await, 0);
    }
    assert_eq!(depth(&ch, &names.queue(Queue::Email)).await, 0);
    let dead = prereg::workers::runtime::list_dead_letters(&app.ctx, Queue::Email, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason.as_deref(), Some("retries_exhausted"));
    assert_eq!(dead[0].retries, Some(3));
    let _ = ch.close(200, "done").await;
    app.cleanup().await;
}

/// A job that outlives `PREREG_JOB_TIMEOUT` is abandoned and retried
/// through a delay queue, then succeeds: an account update whose row the
/// test holds locked (the statement timeout is far longer than the job's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_is_retried_later_and_then_succeeds() {
    let app = spawn_with(|c| {
        c.job_timeout = Duration::from_millis(700);
        c.db_statement_timeout = Duration::from_secs(20);
        c.retry_delays = vec![Duration::from_millis(400), Duration::from_millis(800)];
        c.max_attempts = 20;
    })
    .await;
    let names = app.ctx.broker.names.clone();
    let (_, ch) = app.ctx.broker.channel().await.unwrap();
    let upstream = app.upstream_key().await;
    app.account(
        &upstream,
        "acct-slow",
        json!({"email": "v1@customer.example"}),
    )
    .await;
    let mut blocker = app.db().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE account_id = 'acct-slow' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let (s, v) = app
        .request(
            reqwest::Method::PUT,
            "/v1/accounts/acct-slow",
            Some(&upstream),
            Some(json!({"email": "v2@customer.example"})),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED, "{v}");
    // The update waits on the row past the job timeout: a retry is scheduled.
    let started = Instant::now();
    let mut retried = false;
    while !retried {
        for i in 0..names.retry_delays.len() {
            retried |= depth(&ch, &names.retry_queue(i)).await > 0;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the blocked job was never retried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "retried after {:?}, before its time-out",
        started.elapsed()
    );
    let (_, now) = app.get("/v1/accounts/acct-slow", &upstream).await;
    assert_eq!(now["email"], "v1@customer.example", "{now}");
    blocker.rollback().await.unwrap();
    wait_until(Duration::from_secs(10), || async {
        app.get("/v1/accounts/acct-slow", &upstream).await.1["email"] == "v2@customer.example"
    })
    .await;
    assert!(
        prereg::workers::runtime::list_dead_letters(&app.ctx, Queue::Accounts, 5)
            .await
            .unwrap()
            .is_empty()
    );
    let _ = ch.close(200, "done").await;
    app.cleanup().await;
}

/// The quorum queue's delivery limit is the backstop for a message no worker
/// ever finishes (each one crashes on it, or cannot publish its retry): after
/// `PREREG_DELIVERY_LIMIT` unsuccessful deliveries the broker itself moves it
/// to the queue's dead-letter queue instead of handing it out forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_handed_back_past_the_delivery_limit_is_dead_lettered_by_the_broker() {
    // No consumers: the test plays the worker that dies on the message.
    let app = spawn_roles(|c| c.delivery_limit = 3, vec![]).await;
    let names = app.ctx.broker.names.clone();
    let (_, ch) = app.ctx.broker.channel().await.unwrap();
    let job = prereg::mq::CloudEvent::with_id(
        "backstop-1".into(),
        "sweep.requested",
        json!({"requested_by": "test"}),
    );
    app.ctx.broker.publish_command(&job).await.unwrap();
    let queue = names.queue(Queue::Sweeps);
    let started = Instant::now();
    let mut deliveries = 0;
    while depth(&ch, &names.dlq(Queue::Sweeps)).await == 0 {
        if let Some(m) = ch
            .basic_get(&queue, BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            deliveries += 1;
            m.delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            deliveries <= 20 && started.elapsed() < Duration::from_secs(15),
            "handed out {deliveries} times, never dead-lettered"
        );
    }
    assert!(
        (3..=4).contains(&deliveries),
        "dead-lettered after {deliveries} deliveries with a limit of 3"
    );
    assert_eq!(depth(&ch, &queue).await, 0);
    let dead = prereg::workers::runtime::list_dead_letters(&app.ctx, Queue::Sweeps, 5)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id.as_deref(), Some("backstop-1"));
    let _ = ch.close(200, "done").await;
    app.cleanup().await;
}
