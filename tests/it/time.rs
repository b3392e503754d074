//! Time (SPEC §5): expiry sweeps, the scheduler, review deadlines and the
//! working-day calendar, with durations of seconds.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc, Weekday};
use chrono_tz::Asia::Shanghai;
use lapin::{
    options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
    Channel,
};
use prereg::{
    app::{Roles, Running},
    config::ReviewSla,
    domain::workdays::{self, Calendar, CalendarEntry, DayKind},
    mq::{CloudEvent, Queue},
    workers::{deadlines, sweeps},
    Ctx,
};
use prereg_devtools::smtp_sink::SmtpSink;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

use crate::common::*;

// --- helpers ------------------------------------------------------------------

/// A queue of its own that receives a copy of the messages published with
/// these (exchange, routing key) pairs, whoever consumes the real queues.
struct Capture {
    ch: Channel,
    queue: String,
    seen: Vec<CloudEvent>,
}

async fn capture(app: &TestApp, binds: &[(&str, &str)]) -> Capture {
    let (_, ch) = app.ctx.broker.channel().await.expect("channel");
    let names = &app.ctx.broker.names;
    let queue = format!("{}.capture", names.prefix);
    ch.queue_declare(&queue, QueueDeclareOptions::default(), expiring_queue())
        .await
        .expect("declare capture queue");
    for (exchange, key) in binds {
        // Our own jobs travel on the internal exchange.
        let x = if *exchange == "events" {
            names.events()
        } else {
            names.internal()
        };
        ch.queue_bind(
            &queue,
            &x,
            key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind capture queue");
    }
    Capture {
        ch,
        queue,
        seen: Vec::new(),
    }
}

impl Capture {
    /// Everything captured so far.
    async fn drain(&mut self) -> &[CloudEvent] {
        while let Some(m) = self
            .ch
            .basic_get(&self.queue, BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            self.seen
                .push(CloudEvent::parse(&m.delivery.data).expect("a CloudEvent"));
        }
        &self.seen
    }

    fn count(&self, ty: &str, kind: Option<&str>, key: &str, id: Uuid) -> usize {
        self.seen
            .iter()
            .filter(|e| e.ty == ty)
            .filter(|e| match kind {
                Some(k) => e.data["kind"] == k,
                None => true,
            })
            .filter(|e| e.data[key] == json!(id))
            .count()
    }

    async fn delete(self) {
        let _ = self
            .ch
            .queue_delete(&self.queue, QueueDeleteOptions::default())
            .await;
    }
}

/// A separate node running the sweeps and deadlines workers, the outbox
/// relay and (optionally) the scheduler.
async fn time_node(app: &TestApp, scheduler: bool) -> Running {
    let roles = Roles {
        workers: vec![Queue::Sweeps, Queue::Deadlines],
        relay: true,
        scheduler,
        ..Default::default()
    };
    app.node(roles, |_| {}).await
}

/// `(n, d)` of a query selecting `count(*) AS n` and a distinct count `d`.
async fn rows_and_distinct(db: &sqlx::PgPool, sql: &str) -> (i64, i64) {
    let row = sqlx::query(sql).fetch_one(db).await.unwrap();
    (row.get("n"), row.get("d"))
}

async fn status_of(app: &TestApp, p: &Partner, id: Uuid) -> Value {
    app.get(&format!("/v1/preregistrations/{id}"), &p.key)
        .await
        .1
}

/// A partner's customer rejected as `registered_over_7_days`, then put under
/// review. Returns (pre-registration id, review id).
async fn open_review(app: &TestApp, upstream: &str, p: &Partner, n: u32) -> (Uuid, Uuid) {
    let email = format!("review{n}@customer.example");
    let mobile = format!("+8613200000{n:03}");
    let id = app
        .review_requested(upstream, p, &format!("rev-{n}"), &email, &mobile)
        .await;
    app.wait_status(p, id, "under_review", Duration::from_secs(10))
        .await;
    let review: Uuid = sqlx::query_scalar(
        "SELECT id FROM reviews WHERE preregistration_id = $1 AND state = 'open'",
    )
    .bind(id)
    .fetch_one(app.db())
    .await
    .unwrap();
    (id, review)
}

struct ReviewRow {
    state: String,
    due_at: DateTime<Utc>,
    reminder_sent_at: Option<DateTime<Utc>>,
    overdue_at: Option<DateTime<Utc>>,
    escalated_at: Option<DateTime<Utc>>,
}

async fn review_row(app: &TestApp, id: Uuid) -> ReviewRow {
    let r = sqlx::query(
        "SELECT state, due_at, reminder_sent_at, overdue_at, escalated_at FROM reviews WHERE id = $1",
    )
    .bind(id)
    .fetch_one(app.db())
    .await
    .unwrap();
    ReviewRow {
        state: r.get("state"),
        due_at: r.get("due_at"),
        reminder_sent_at: r.get("reminder_sent_at"),
        overdue_at: r.get("overdue_at"),
        escalated_at: r.get("escalated_at"),
    }
}

fn sh(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Shanghai
        .with_ymd_and_hms(y, m, d, h, min, 0)
        .single()
        .unwrap()
        .with_timezone(&Utc)
}

fn entry(date: NaiveDate, kind: DayKind, name: &str) -> CalendarEntry {
    CalendarEntry {
        date,
        kind,
        name: name.into(),
    }
}

async fn put_calendar(app: &TestApp, year: i32, entries: &[CalendarEntry]) -> Value {
    let (s, v) = app
        .request(
            Method::PUT,
            &format!("/v1/admin/calendar/{year}"),
            Some(OPERATOR),
            Some(json!(entries)),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

// --- expiry sweeps ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_expires_and_another_partner_can_then_claim_the_customer() {
    let app = spawn_with(|c| {
        c.claim_validity = Duration::from_secs(3);
        c.sweep_interval = Duration::from_millis(300);
    })
    .await;
    let mut cap = capture(&app, &[("events", "preregistration.expired")]).await;
    // Two schedulers at once do no harm.
    let s1 = app.scheduler_node().await;
    let s2 = app.scheduler_node().await;
    let a = app.create_partner(json!({"name": "First"})).await;
    let b = app.create_partner(json!({"name": "Second"})).await;
    let id = app
        .prereg(&a, "expiring@customer.example", "+8613400000001")
        .await;
    let v = app.decided(&a, id).await;
    assert_eq!(v["status"], "preregistered");
    // While the claim holds, the other partner is refused.
    let early = app
        .prereg(&b, "expiring@customer.example", "+8613400000002")
        .await;
    assert_eq!(
        app.decided(&b, early).await["reason"]["code"],
        "preregistered_by_other_partner"
    );
    // The sweep (not a registration) ends it, shortly after its validity.
    app.wait_status(&a, id, "expired", Duration::from_secs(15))
        .await;
    let expires_at: DateTime<Utc> = serde_json::from_value(v["expires_at"].clone()).unwrap();
    assert!(Utc::now() >= expires_at);
    let t = app
        .get(&format!("/v1/preregistrations/{id}/timeline"), &a.key)
        .await
        .1;
    let last = t["items"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["change"].as_str(), last["actor"].as_str()),
        (Some("expired"), Some("system:sweep"))
    );
    assert_eq!(last["from_status"], "preregistered");
    // The customer is free for any partner at once.
    app.claimed(&b, "expiring@customer.example", "+8613400000002")
        .await;
    // One event, one timeline entry, whatever the number of schedulers.
    app.outbox_drained().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cap.drain().await;
    assert_eq!(
        cap.count("preregistration.expired", None, "preregistration_id", id),
        1
    );
    let expired_entries = app.count_for("SELECT count(*) FROM preregistration_events WHERE preregistration_id = $1 AND change = 'expired'", id).await;
    assert_eq!(expired_entries, 1);
    // The last successful run is in Postgres and in the metrics.
    let last_run: DateTime<Utc> =
        sqlx::query_scalar("SELECT last_success_at FROM sweep_runs WHERE name = 'expiry'")
            .fetch_one(app.db())
            .await
            .unwrap();
    assert!(Utc::now() - last_run < chrono::Duration::seconds(5));
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("prereg_sweep_last_success_age_seconds{sweep=\"expiry\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("prereg_reviews_overdue"));
    assert!(metrics.contains("prereg_calendar_missing"));
    s1.shutdown().await;
    s2.shutdown().await;
    cap.delete().await;
    app.cleanup().await;
}

/// A fresh database with partners and `n` due claims, without any process
/// running (nothing publishes the outbox, so its rows can be counted).
async fn bare(tweak: impl FnOnce(&mut prereg::Config)) -> (prereg::Config, String) {
    let (mut cfg, db) = test_config().await;
    tweak(&mut cfg);
    let ctx = Ctx::new(cfg.clone()).unwrap();
    prereg::store::migrate(&ctx.db).await.unwrap();
    ctx.db.close().await;
    (cfg, db)
}

async fn fill_claims(ctx: &Ctx, n: i64, expires: &str, status: &str, tag: &str) {
    sqlx::query(&format!(
        "INSERT INTO preregistrations (id, partner_id, full_name, email, mobile, email_norm, mobile_norm, status,
             decided_at, preregistered_at, expires_at)
         SELECT gen_random_uuid(), (SELECT id FROM partners ORDER BY id LIMIT 1), 'Bulk ' || i,
                '{tag}' || i || '@bulk.example', '+86{tag}' || i, '{tag}' || i || '@bulk.example', '+86{tag}' || i,
                '{status}', now(), now() - interval '20 days', {expires}
         FROM generate_series(1, $1) AS i"
    ))
    .bind(n)
    .execute(&ctx.db)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sweeps_at_once_expire_each_claim_exactly_once() {
    let (cfg, db) = bare(|c| {
        c.sweep_batch = 150;
        c.claim_reminder_before = Duration::from_secs(3600);
        // One batch loop per sweep: two waiting statements are two sweeps.
        c.sweep_parallelism = 1;
    })
    .await;
    let one = Ctx::new(cfg.clone()).unwrap();
    let two = Ctx::new(cfg.clone()).unwrap();
    // The partner has a contact email: its reminders are queued as emails.
    sqlx::query("INSERT INTO partners (id, name, country, contact_email) VALUES ($1, 'Bulk', 'CN', 'bulk@partner.example')")
        .bind(Uuid::now_v7())
        .execute(&one.db)
        .await
        .unwrap();
    const DUE: i64 = 3000;
    fill_claims(
        &one,
        DUE - 1000,
        "now() - interval '1 minute'",
        "preregistered",
        "1",
    )
    .await;
    fill_claims(&one, 600, "now() - interval '1 second'", "invited", "2").await;
    fill_claims(
        &one,
        400,
        "now() - interval '1 day'",
        "association_failed",
        "3",
    )
    .await;
    // Not due, or not expirable: untouched.
    fill_claims(
        &one,
        500,
        "now() + interval '10 days'",
        "preregistered",
        "4",
    )
    .await;
    fill_claims(&one, 50, "now() - interval '1 day'", "associated", "5").await;
    // Due for a reminder only (within the hour).
    fill_claims(&one, 20, "now() + interval '30 minutes'", "invited", "6").await;

    // A barrier: while the test holds the outbox in SHARE mode, the first
    // batch statement of each sweep (which writes to the outbox) waits. Both
    // sweeps are seen waiting before either can expire anything, so they
    // provably run at the same time.
    let mut barrier = one.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE outbox IN SHARE MODE")
        .execute(&mut *barrier)
        .await
        .unwrap();
    let sweeping = tokio::spawn({
        let (one, two) = (one.clone(), two.clone());
        async move {
            let (a, b) = tokio::join!(sweeps::run(&one), sweeps::run(&two));
            (a.unwrap(), b.unwrap())
        }
    });
    wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND wait_event_type = 'Lock' AND query LIKE '%preregistration.expired%'",
        )
        .fetch_one(&one.db)
        .await
        .unwrap()
            == 2
    })
    .await;
    let early: i64 =
        sqlx::query_scalar("SELECT count(*) FROM preregistrations WHERE status = 'expired'")
            .fetch_one(&one.db)
            .await
            .unwrap();
    assert_eq!(early, 0, "nothing expired before both sweeps started");
    barrier.commit().await.unwrap();
    let (a, b) = sweeping.await.unwrap();
    assert_eq!(
        a.claims_expired + b.claims_expired,
        DUE as u64,
        "{a:?} {b:?}"
    );
    // Released together, each took batches of its own (SKIP LOCKED).
    assert!(
        a.claims_expired > 0 && b.claims_expired > 0,
        "one sweep did everything: {a:?} {b:?}"
    );
    assert_eq!(a.reminders + b.reminders, 20, "{a:?} {b:?}");

    assert_eq!(
        rows_and_distinct(&one.db, "SELECT count(*) AS n, count(DISTINCT preregistration_id) AS d FROM preregistration_events WHERE change = 'expired'").await,
        (DUE, DUE),
        "one timeline entry per expired claim"
    );
    assert_eq!(
        rows_and_distinct(&one.db, "SELECT count(*) AS n, count(DISTINCT message->>'id') AS d FROM outbox WHERE routing_key = 'preregistration.expired'").await,
        (DUE, DUE),
        "one event per expired claim"
    );
    // The event written by SQL is the one the registration worker builds.
    let (prereg_id, message): (Uuid, Value) = sqlx::query_as(
        "SELECT p.id, o.message FROM outbox o JOIN preregistrations p ON o.message->>'id' = 'preregistration.expired:' || p.id
         WHERE o.routing_key = 'preregistration.expired' LIMIT 1",
    )
    .fetch_one(&one.db)
    .await
    .unwrap();
    let written: CloudEvent = serde_json::from_value(message).expect("a CloudEvent");
    let (partner_id, expires_at): (Uuid, DateTime<Utc>) =
        sqlx::query_as("SELECT partner_id, expires_at FROM preregistrations WHERE id = $1")
            .bind(prereg_id)
            .fetch_one(&one.db)
            .await
            .unwrap();
    let previous = written.data["previous_status"]
        .as_str()
        .unwrap()
        .to_string();
    let built = sweeps::expired_event(prereg_id, partner_id, &previous, Some(expires_at));
    let time = |v: &Value| serde_json::from_value::<DateTime<Utc>>(v.clone()).unwrap();
    assert_eq!(
        time(&written.data["expires_at"]),
        time(&built.data["expires_at"])
    );
    let mut data = written.data.clone();
    data["expires_at"] = built.data["expires_at"].clone();
    assert_eq!(
        CloudEvent {
            time: built.time,
            data,
            ..written
        },
        built
    );
    let by_status: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM preregistrations GROUP BY status ORDER BY status",
    )
    .fetch_all(&one.db)
    .await
    .unwrap();
    assert_eq!(
        by_status,
        [
            ("associated".to_string(), 50),
            ("expired".to_string(), DUE),
            ("invited".to_string(), 20),
            ("preregistered".to_string(), 500),
        ]
    );
    // Reminders: one email command per claim (its own job id), marked once.
    assert_eq!(
        rows_and_distinct(&one.db, "SELECT count(*) AS n, count(DISTINCT message->>'id') AS d FROM outbox
          WHERE routing_key = 'email.requested' AND message->'data'->>'kind' = 'claim_expiry_reminder'").await,
        (20, 20),
        "one reminder email per claim due for one"
    );
    let reminded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox o JOIN preregistrations p
            ON o.message->>'id' = 'email:claim_expiry_reminder:' || p.id
         WHERE p.expiry_reminder_sent_at IS NOT NULL AND p.status = 'invited'",
    )
    .fetch_one(&one.db)
    .await
    .unwrap();
    assert_eq!(
        reminded, 20,
        "the reminders name the claims that were marked"
    );
    let marked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM preregistrations WHERE expiry_reminder_sent_at IS NOT NULL",
    )
    .fetch_one(&one.db)
    .await
    .unwrap();
    assert_eq!(marked, 20);

    // A second sweep finds nothing; both runs are recorded.
    let again = sweeps::run(&one).await.unwrap();
    assert_eq!((again.claims_expired, again.reminders), (0, 0));
    let stats: Value =
        sqlx::query_scalar("SELECT last_stats FROM sweep_runs WHERE name = 'expiry'")
            .fetch_one(&one.db)
            .await
            .unwrap();
    assert_eq!(stats["claims_expired"], 0);
    two.db.close().await;
    release(&one, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_expiry_reminder_goes_to_the_partner_once() {
    let app = spawn_roles(
        |c| {
            c.claim_validity = Duration::from_secs(3600);
            c.claim_reminder_before = Duration::from_secs(7200);
        },
        vec![Queue::Registration, Queue::Accounts],
    )
    .await;
    let p = app.create_partner(json!({})).await;
    let id = app
        .claimed(&p, "remind@customer.example", "+8613400000011")
        .await;
    let mut cap = capture(&app, &[("commands", "email.requested")]).await;
    for _ in 0..3 {
        sweeps::run(&app.ctx).await.unwrap();
    }
    app.outbox_drained().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    cap.drain().await;
    assert_eq!(
        cap.count(
            "email.requested",
            Some("claim_expiry_reminder"),
            "preregistration_id",
            id
        ),
        1
    );
    let mail = cap.seen.iter().find(|e| e.ty == "email.requested").unwrap();
    // The recipient (the partner's stored contact) is read when sending.
    assert!(mail.data.get("to").is_none());
    assert_eq!(mail.id, format!("email:claim_expiry_reminder:{id}"));
    cap.delete().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_run_on_demand_from_the_api_and_from_a_message() {
    let app = spawn_with(|c| {
        c.claim_validity = Duration::from_secs(1);
        c.sweep_interval = Duration::from_secs(3600);
    })
    .await;
    let p = app.create_partner(json!({})).await;
    let ids = app
        .decided_preregs(&p, 1..3, "ondemand", 13_400_000_020)
        .await;
    let (one, two) = (ids[0], ids[1]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Only operators may.
    let (s, _) = app.post("/v1/admin/sweeps", &p.key, json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = app
        .request(Method::POST, "/v1/admin/sweeps", Some(OPERATOR), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "queued");
    app.wait_status(&p, one, "expired", Duration::from_secs(10))
        .await;
    app.wait_status(&p, two, "expired", Duration::from_secs(10))
        .await;
    // An upstream system may publish `sweep.requested` itself (no payload).
    let three = app
        .prereg(&p, "ondemand3@customer.example", "+8613400000023")
        .await;
    app.decided(&p, three).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut ev = CloudEvent::new("sweep.requested", Value::Null);
    ev.data = Value::Null;
    app.ctx.broker.publish_command(&ev).await.unwrap();
    app.wait_status(&p, three, "expired", Duration::from_secs(10))
        .await;
    let audited = app.audits("sweep.requested").await;
    assert_eq!(audited, 1);
    app.cleanup().await;
}

// --- review deadlines -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_review_is_reminded_once_escalated_once_and_stays_so_across_a_restart() {
    let app = spawn_roles(
        |c| {
            c.review_sla = ReviewSla::Plain(Duration::from_secs(4));
            c.review_reminder_before = Duration::from_secs(2);
            c.sweep_interval = Duration::from_millis(250);
            c.escalation_email = "escalate@provider.example".into();
            c.reviewer_email = "reviewers@provider.example".into();
        },
        vec![Queue::Registration, Queue::Accounts],
    )
    .await;
    let mut cap = capture(
        &app,
        &[
            ("commands", "email.requested"),
            ("events", "review.overdue"),
        ],
    )
    .await;
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({})).await;
    let node = time_node(&app, true).await;

    // 1. Reminded before the deadline, then overdue and escalated at it.
    let (prereg1, r1) = open_review(&app, &upstream, &p, 1).await;
    wait_until(Duration::from_secs(8), || async {
        review_row(&app, r1).await.reminder_sent_at.is_some()
    })
    .await;
    let row = review_row(&app, r1).await;
    assert_eq!(row.state, "open");
    assert!(row.reminder_sent_at.unwrap() < row.due_at);
    assert!(row.reminder_sent_at.unwrap() >= row.due_at - chrono::Duration::seconds(2));
    wait_until(Duration::from_secs(10), || async {
        review_row(&app, r1).await.state == "overdue"
    })
    .await;
    let r1_before = review_row(&app, r1).await;
    assert!(r1_before.overdue_at.unwrap() >= r1_before.due_at);
    let escalated_at = r1_before.escalated_at.expect("escalated");
    let (s, list) = app.get("/v1/admin/reviews?state=overdue", OPERATOR).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["items"][0]["id"], r1.to_string());
    assert_eq!(list["items"][0]["state"], "overdue");
    assert_eq!(list["items"][0]["escalated_at"], json!(escalated_at));
    // Still open for a decision; the partner sees it overdue.
    let (_, open) = app.get("/v1/admin/reviews?state=open", OPERATOR).await;
    assert_eq!(open["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        status_of(&app, &p, prereg1).await["review"]["state"],
        "overdue"
    );

    // 2. Every time worker down while another deadline passes.
    node.shutdown().await;
    let (_, r2) = open_review(&app, &upstream, &p, 2).await;
    let due2 = review_row(&app, r2).await.due_at;
    while Utc::now() < due2 + chrono::Duration::milliseconds(500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(review_row(&app, r2).await.state, "open", "nobody was there");

    // 3. Restart: the missed deadline is handled once; the first stays as it was.
    let node = time_node(&app, true).await;
    wait_until(Duration::from_secs(10), || async {
        review_row(&app, r2).await.state == "overdue"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await; // a few more ticks
    let r2_row = review_row(&app, r2).await;
    assert!(r2_row.escalated_at.is_some());
    assert!(
        r2_row.reminder_sent_at.is_none(),
        "past its deadline: escalated, not reminded"
    );
    let r1_after = review_row(&app, r1).await;
    assert_eq!(r1_after.escalated_at, Some(escalated_at));
    assert_eq!(r1_after.overdue_at, r1_before.overdue_at);
    assert_eq!(r1_after.reminder_sent_at, r1_before.reminder_sent_at);

    app.outbox_drained().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cap.drain().await;
    let reminders = |r| cap.count("email.requested", Some("review_reminder"), "review_id", r);
    let escalations = |r| cap.count("email.requested", Some("review_escalation"), "review_id", r);
    let overdue = |r| cap.count("review.overdue", None, "review_id", r);
    assert_eq!((reminders(r1), escalations(r1), overdue(r1)), (1, 1, 1));
    assert_eq!((reminders(r2), escalations(r2), overdue(r2)), (0, 1, 1));
    let of_kind = |kind: &str| cap.seen.iter().find(|e| e.data["kind"] == kind).unwrap();
    let escalation = of_kind("review_escalation");
    // The job names the review, not a recipient: the email worker picks
    // escalation or the reviewers from configuration when it sends.
    assert!(escalation.data.get("to").is_none());
    let reminder = of_kind("review_reminder");
    assert!(reminder.data.get("to").is_none());
    let entries = app
        .count("SELECT count(*) FROM preregistration_events WHERE change = 'review_overdue'")
        .await;
    assert_eq!(entries, 2);

    // Deciding an overdue review still works.
    let (s, r) = app.decide_review(r1, json!({"decision": "approve"})).await;
    assert_eq!((s, r["state"].as_str()), (StatusCode::OK, Some("approved")));
    node.shutdown().await;
    cap.delete().await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deadline_runs_escalate_once() {
    let sink = SmtpSink::start().await.unwrap();
    let url = sink.url();
    let app = spawn_roles(
        move |c| {
            c.review_sla = ReviewSla::Plain(Duration::from_millis(500));
            c.review_reminder_before = Duration::from_secs(1);
            c.smtp_url = url;
            c.escalation_email = "escalate@provider.example".into();
        },
        vec![Queue::Registration, Queue::Accounts, Queue::Email],
    )
    .await;
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({})).await;
    let mut reviews = Vec::new();
    for n in 10..14 {
        reviews.push(open_review(&app, &upstream, &p, n).await.1);
    }
    let mut last_due = Utc::now();
    for r in &reviews {
        last_due = last_due.max(review_row(&app, *r).await.due_at);
    }
    wait_until(Duration::from_secs(5), || async { Utc::now() > last_due }).await;
    let other = Ctx::new(app.cfg.clone()).unwrap();
    let (a, b, c) = tokio::join!(
        deadlines::run(&app.ctx),
        deadlines::run(&other),
        deadlines::run(&app.ctx)
    );
    let total = a.unwrap().overdue + b.unwrap().overdue + c.unwrap().overdue;
    assert_eq!(total, 4);
    for r in &reviews {
        assert_eq!(review_row(&app, *r).await.state, "overdue");
    }
    // One escalation email per review reached the SMTP server, through the
    // outbox and the email worker.
    let escalations = || {
        sink.received()
            .into_iter()
            .filter(|m| m.to == ["escalate@provider.example"])
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(15), || async {
        escalations().len() >= 4
    })
    .await;
    for r in &reviews {
        let about = escalations()
            .iter()
            .filter(|m| m.data.contains(&r.to_string()))
            .count();
        assert_eq!(about, 1, "escalation emails about review {r}");
    }
    // No fifth one turns up once the outbox is empty.
    app.outbox_drained().await;
    assert_eq!(sink.wait_for(5, Duration::from_secs(1)).await.len(), 4);
    other.db.close().await;
    app.cleanup().await;
}

/// An invitation link past its own expiry (`PREREG_INVITATION_VALIDITY`)
/// while its claim still holds: an association with it is `link_expired`
/// from the time alone (the invitation row still says `sent`), and the
/// sweep then marks the link `expired` with its event, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invitation_link_expires_by_time_and_the_sweep_marks_it_once() {
    let (_sink, app) = with_sink(|c| {
        c.invitation_validity = Duration::from_secs(2);
        c.claim_validity = Duration::from_secs(3600);
    })
    .await;
    let mut cap = capture(&app, &[("events", "invitation.expired")]).await;
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({})).await;
    let id = app
        .prereg(&p, "linktime@customer.example", "+8613400000031")
        .await;
    assert_eq!(app.decided(&p, id).await["status"], "preregistered");
    let inv: Uuid = app.invite(&p, id).await.parse().unwrap();
    let sent = app.invitation_state(&p, &inv.to_string(), "sent").await;
    let link_expires: DateTime<Utc> =
        serde_json::from_value(sent["link_expires_at"].clone()).expect("a link expiry");
    assert!(link_expires < Utc::now() + chrono::Duration::seconds(3));
    app.account(
        &upstream,
        "acct-linktime",
        json!({"email": "linktime@customer.example"}),
    )
    .await;
    wait_until(Duration::from_secs(10), || async {
        Utc::now() > link_expires
    })
    .await;
    // The association decides by the time: no sweep has run.
    let token = app.link_token(inv).await;
    let a = app
        .attempt(
            &upstream,
            json!({"token": token, "account_id": "acct-linktime"}),
        )
        .await;
    let attempt = a["id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let a = loop {
        let a = app
            .get(&format!("/v1/associations/{attempt}"), &upstream)
            .await
            .1;
        if a["status"] != "queued" {
            break a;
        }
        assert!(tokio::time::Instant::now() < deadline, "never decided: {a}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        (a["status"].as_str(), a["cause"]["code"].as_str()),
        (Some("failed"), Some("link_expired")),
        "{a}"
    );
    let row_status: String = sqlx::query_scalar("SELECT status FROM invitations WHERE id = $1")
        .bind(inv)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(row_status, "sent", "decided by time, not by a swept status");
    // The sweep marks the link, and only the link.
    let stats = sweeps::run(&app.ctx).await.unwrap();
    assert_eq!(
        (stats.links_expired, stats.claims_expired),
        (1, 0),
        "{stats:?}"
    );
    let (_, v) = app.get(&format!("/v1/invitations/{inv}"), &p.key).await;
    assert_eq!(v["status"], "expired", "{v}");
    let (_, pr) = app.get(&format!("/v1/preregistrations/{id}"), &p.key).await;
    assert_ne!(pr["status"], "expired", "the claim holds: {pr}");
    let again = sweeps::run(&app.ctx).await.unwrap();
    assert_eq!(again.links_expired, 0);
    app.outbox_drained().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let events: Vec<CloudEvent> = loop {
        let got: Vec<CloudEvent> = cap
            .drain()
            .await
            .iter()
            .filter(|e| e.data["invitation_id"] == json!(inv))
            .cloned()
            .collect();
        if !got.is_empty() {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no invitation.expired event"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].data["reason"], "link_validity_passed");
    cap.delete().await;
    app.cleanup().await;
}

// --- the working-day calendar ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_times_of_the_spec_follow_the_calendar_loaded_through_the_api() {
    let app = spawn_roles(|_| {}, vec![]).await;
    // Only the Mid-Autumn holidays and the National Day make-up Saturday:
    // this upload replaces the shipped 2026 data.
    let d = |m, day| NaiveDate::from_ymd_opt(2026, m, day).unwrap();
    let upload = [
        entry(d(9, 25), DayKind::Holiday, "Mid-Autumn Festival"),
        entry(d(9, 26), DayKind::Holiday, "Mid-Autumn Festival"),
        entry(d(9, 27), DayKind::Holiday, "Mid-Autumn Festival"),
        entry(d(10, 10), DayKind::Workday, "National Day make-up workday"),
    ];
    let v = put_calendar(&app, 2026, &upload).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 4);
    let examples = [
        (sh(2026, 11, 20, 15, 0), sh(2026, 11, 24, 15, 0)),
        (sh(2026, 11, 21, 10, 0), sh(2026, 11, 25, 0, 0)),
        // A holiday.
        (sh(2026, 9, 24, 11, 0), sh(2026, 9, 29, 11, 0)),
        // A make-up workday.
        (sh(2026, 10, 9, 9, 0), sh(2026, 10, 12, 9, 0)),
        // National Day was not uploaded: 1 and 2 October count now.
        (sh(2026, 9, 30, 11, 0), sh(2026, 10, 2, 11, 0)),
    ];
    for (from, due) in examples {
        let got = app.ctx.review_due(from).await.unwrap();
        assert_eq!(got.at, due, "from {from}");
        assert!(!got.calendar_missing);
    }
    // Without a calendar for 2027 a deadline there is weekends-only, flagged.
    let got = app.ctx.review_due(sh(2027, 10, 1, 9, 0)).await.unwrap();
    assert_eq!(
        (got.at, got.calendar_missing),
        (sh(2027, 10, 5, 9, 0), true)
    );
    put_calendar(
        &app,
        2027,
        &[entry(
            NaiveDate::from_ymd_opt(2027, 10, 4).unwrap(),
            DayKind::Holiday,
            "National Day",
        )],
    )
    .await;
    let got = app.ctx.review_due(sh(2027, 10, 1, 9, 0)).await.unwrap();
    assert_eq!(
        (got.at, got.calendar_missing),
        (sh(2027, 10, 6, 9, 0), false)
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_deadline_uses_the_uploaded_calendar() {
    let app = spawn_roles(|_| {}, vec![Queue::Registration, Queue::Accounts]).await;
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({})).await;
    // The next two working days become holidays and the next weekend day a
    // make-up workday (in whichever years they fall).
    let default = Calendar::cn_2026();
    let today = Utc::now().with_timezone(&Shanghai).date_naive();
    let mut added = Vec::new();
    let mut day = today;
    let (mut holidays, mut workday) = (0, false);
    while holidays < 2 || !workday {
        day = day.succ_opt().unwrap();
        let weekend = matches!(day.weekday(), Weekday::Sat | Weekday::Sun);
        if !weekend && default.is_working_day(day) && holidays < 2 {
            added.push(entry(day, DayKind::Holiday, "Test holiday"));
            holidays += 1;
        } else if weekend && !default.is_working_day(day) && !workday {
            added.push(entry(day, DayKind::Workday, "Test make-up workday"));
            workday = true;
        }
    }
    let mut years: Vec<i32> = added.iter().map(|e| e.date.year()).collect();
    years.sort();
    years.dedup();
    let mut expected_cal = Calendar::cn_2026();
    for y in years {
        let mut entries = default.entries_for_year(y);
        entries.extend(added.iter().filter(|e| e.date.year() == y).cloned());
        put_calendar(&app, y, &entries).await;
        expected_cal.load_year(y, &entries).unwrap();
        let (s, v) = app.get(&format!("/v1/admin/calendar/{y}"), OPERATOR).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["source"], "uploaded");
        assert_eq!(v["items"].as_array().unwrap().len(), entries.len());
    }
    let (_, review) = open_review(&app, &upstream, &p, 30).await;
    let row = sqlx::query("SELECT opened_at, due_at FROM reviews WHERE id = $1")
        .bind(review)
        .fetch_one(app.db())
        .await
        .unwrap();
    let opened: DateTime<Utc> = row.get("opened_at");
    let due: DateTime<Utc> = row.get("due_at");
    assert_eq!(due, expected_cal.add_working_days(opened, 2, Shanghai).at);
    assert_ne!(
        due,
        default.add_working_days(opened, 2, Shanghai).at,
        "the upload changed the deadline"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_api_validation_and_the_calendar_missing_warning() {
    let app = spawn_roles(|_| {}, vec![Queue::Registration, Queue::Accounts]).await;
    let p = app.create_partner(json!({})).await;
    // Role, shape and per-field errors.
    let (s, _) = app
        .request(
            Method::PUT,
            "/v1/admin/calendar/2027",
            Some(&p.key),
            Some(json!([])),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = app
        .request(
            Method::PUT,
            "/v1/admin/calendar/2027",
            Some(OPERATOR),
            Some(json!([
                {"date": "2027-02-30", "kind": "holiday", "name": "x"},
                {"date": "2028-01-01", "kind": "rest", "name": "y"},
                {"date": "2027-05-01", "kind": "holiday"}
            ])),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let fields: Vec<&str> = v["error"]["details"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["[0].date", "[1].kind", "[1].date", "[2].name"]);
    let (s, _) = app
        .request(
            Method::PUT,
            "/v1/admin/calendar/1800",
            Some(OPERATOR),
            Some(json!([])),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    // Not loaded, then the shipped default, then uploaded.
    let (s, v) = app.get("/v1/admin/calendar/2031", OPERATOR).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "calendar_year_not_loaded");
    let (s, v) = app.get("/v1/admin/calendar/2026", OPERATOR).await;
    assert_eq!((s, v["source"].as_str()), (StatusCode::OK, Some("default")));
    assert_eq!(
        v["items"].as_array().unwrap().len(),
        workdays::parse_tsv(workdays::CN_2026_TSV).unwrap().len()
    );

    // Load this year and the next (empty: weekends only, but loaded).
    let this_year = Utc::now().with_timezone(&Shanghai).year();
    for y in [this_year, this_year + 1] {
        let entries = if y == 2026 {
            Calendar::cn_2026().entries_for_year(2026)
        } else {
            Vec::new()
        };
        put_calendar(&app, y, &entries).await;
    }
    let (s, ready) = app.request(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK, "{ready}");
    let cal = &ready["details"]["calendar"];
    assert_eq!(cal["calendar_missing"], false, "{ready}");
    assert_eq!(cal["next_year_loaded"], true);
    // An open review whose deadline was computed without a calendar raises
    // the warning (without making the service unready) …
    let upstream = app.upstream_key().await;
    let (_, review) = open_review(&app, &upstream, &p, 40).await;
    sqlx::query("UPDATE reviews SET calendar_missing = true, due_at = due_at + interval '1 day' WHERE id = $1")
        .bind(review)
        .execute(app.db())
        .await
        .unwrap();
    let (s, ready) = app.request(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let cal = &ready["details"]["calendar"];
    assert_eq!(
        (
            cal["calendar_missing"].as_bool(),
            cal["open_reviews_calendar_missing"].as_i64()
        ),
        (Some(true), Some(1)),
        "{ready}"
    );
    // … until the calendar is uploaded: its deadline is computed again.
    let v = put_calendar(&app, this_year + 1, &[]).await;
    assert_eq!(v["reviews_recomputed"], 1);
    let row = sqlx::query("SELECT opened_at, due_at, calendar_missing FROM reviews WHERE id = $1")
        .bind(review)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert!(!row.get::<bool, _>("calendar_missing"));
    let opened: DateTime<Utc> = row.get("opened_at");
    let expected = app.ctx.review_due(opened).await.unwrap().at;
    assert_eq!(row.get::<DateTime<Utc>, _>("due_at"), expected);
    let (_, ready) = app.request(Method::GET, "/readyz", None, None).await;
    assert_eq!(ready["details"]["calendar"]["calendar_missing"], false);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cli_loads_a_calendar_file() {
    let app = spawn_roles(|_| {}, vec![]).await;
    let dir = std::env::temp_dir().join(format!("prereg-cal-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cal-2027.tsv");
    std::fs::write(
        &file,
        "# test\ndate\tkind\tname\n2027-01-01\tholiday\tNew Year's Day\n2027-02-06\tworkday\tSpring Festival make-up workday\n",
    )
    .unwrap();
    let run = |args: &[&str]| app.binary(args).output().expect("run prereg");
    let out = run(&["admin", "calendar", "load", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("loaded 2027: 1 holidays, 1 make-up workdays"));
    let (s, v) = app.get("/v1/admin/calendar/2027", OPERATOR).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"][1]["kind"], "workday");
    // The shipped file loads too; a wrong year is refused.
    let shipped = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/domain/data/calendar-cn-2026.tsv"
    );
    assert!(run(&["admin", "calendar", "load", shipped])
        .status
        .success());
    let out = run(&["admin", "calendar", "load", shipped, "--year", "2027"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the year 2027"));
    let _ = std::fs::remove_dir_all(&dir);
    app.cleanup().await;
}
