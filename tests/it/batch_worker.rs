//! The batched registration worker: what deciding many deliveries in one
//! transaction must not break. Rows decided in one transaction share their
//! `decided_at` (Postgres `now()` is the transaction's start), which is how
//! these tests see that a batch was decided together.

use std::time::Duration;

use prereg::mq::{CloudEvent, Queue};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{common::*, private::ChildProc};

/// An intake (and relay) with no registration consumer: accepted work waits
/// in the queue until a worker is added, which then takes it in batches.
async fn intake_only() -> TestApp {
    spawn_roles(|_| {}, vec![]).await
}

/// A worker whose batch waits long enough for every waiting delivery, so
/// what is queued before it starts is one batch.
fn patient(c: &mut prereg::Config) {
    c.registration_batch = 64;
    c.registration_linger = Duration::from_millis(300);
}

/// Runs the PL/pgSQL `statement` in the worker's write whenever the customer
/// `email` is decided (a trigger on `preregistrations`).
async fn on_deciding(app: &TestApp, email: &str, statement: &str) {
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION on_deciding() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.status <> 'queued' AND NEW.email_norm = '{email}' THEN
             {statement};
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER on_deciding BEFORE UPDATE ON preregistrations
           FOR EACH ROW EXECUTE FUNCTION on_deciding();"
    ))
    .execute(app.db())
    .await
    .unwrap();
}

async fn dead_letters(app: &TestApp) -> Vec<Value> {
    let (s, v) = app
        .get("/v1/admin/dead-letters/registration", OPERATOR)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["items"].as_array().cloned().unwrap_or_default()
}

async fn queued(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM preregistrations WHERE status = 'queued'")
        .await
}

/// How many transactions decided `ids` (distinct `decided_at`).
async fn transactions(app: &TestApp, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT decided_at) FROM preregistrations WHERE id = ANY($1) AND decided_at IS NOT NULL",
    )
    .bind(ids)
    .fetch_one(app.db())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_failing_inside_the_batch_transaction_is_dead_lettered_alone() {
    let mut app = intake_only().await;
    // Postgres refuses the decision of one customer: the batch statement
    // fails as a whole, so the batch must be split to find it.
    on_deciding(
        &app,
        "poison@batch.example",
        "RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023'",
    )
    .await;
    let p = app.create_partner(json!({})).await;
    let mut good = app
        .preregs(&p, 0..6, |i| {
            (format!("a{i}@batch.example"), format!("+86139100000{i:02}"))
        })
        .await;
    let poison = app
        .prereg(&p, "poison@batch.example", "+8613910000099")
        .await;
    good.extend(
        app.preregs(&p, 0..6, |i| {
            (format!("b{i}@batch.example"), format!("+86139200000{i:02}"))
        })
        .await,
    );
    app.add_worker(patient).await;
    app.all_granted(&p, &good).await;
    wait_until(Duration::from_secs(15), || async {
        !dead_letters(&app).await.is_empty()
    })
    .await;
    let dead = dead_letters(&app).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["reason"], "data_exception", "{dead:?}");
    // Dead-lettered at once (a data exception is not retried), and only it.
    let status: String = sqlx::query_scalar("SELECT status FROM preregistrations WHERE id = $1")
        .bind(poison)
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(status, "queued");
    assert_eq!(app.decided_entries(poison).await, 0);
    for id in &good {
        assert_eq!(app.decided_entries(*id).await, 1);
    }
    // The neighbours were still decided in batches (halves), not one by one.
    let txs = transactions(&app, &good).await;
    assert!(
        txs < good.len() as i64,
        "{txs} transactions for {} jobs",
        good.len()
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_in_the_middle_of_a_batch_fails_alone_and_the_rest_commit_together() {
    let mut app = intake_only().await;
    let p = app.create_partner(json!({})).await;
    let mut ids = app
        .preregs(&p, 0..5, |i| {
            (format!("x{i}@batch.example"), format!("+86139300000{i:02}"))
        })
        .await;
    // In the middle: an upstream command the admission rules refuse, and one
    // that is not even JSON.
    let bad = CloudEvent::new(
        "preregistration.requested",
        json!({"id": Uuid::now_v7(), "partner_id": p.id, "full_name": "X", "email": "nope", "mobile": "1"}),
    );
    app.ctx.broker.publish_command(&bad).await.unwrap();
    app.ctx
        .broker
        .publish_raw(
            &app.ctx.broker.names.commands(),
            "preregistration.requested",
            b"{not json",
            None,
            Default::default(),
            None,
        )
        .await
        .unwrap();
    ids.extend(
        app.preregs(&p, 0..5, |i| {
            (format!("y{i}@batch.example"), format!("+86139400000{i:02}"))
        })
        .await,
    );
    app.add_worker(patient).await;
    app.all_granted(&p, &ids).await;
    wait_until(Duration::from_secs(10), || async {
        dead_letters(&app).await.len() == 2
    })
    .await;
    let mut reasons: Vec<String> = dead_letters(&app)
        .await
        .iter()
        .map(|d| d["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["unparseable", "validation_failed"]);
    // The ten good ones were decided in one transaction.
    assert_eq!(transactions(&app, &ids).await, 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_customer_twice_in_one_batch_is_decided_in_delivery_order() {
    let mut app = intake_only().await;
    let a = app.create_partner(json!({"name": "A"})).await;
    let b = app.create_partner(json!({"name": "B"})).await;
    // In this order: the customer, again (another spelling), by another
    // partner, and by its mobile alone.
    let mut ids = Vec::new();
    for (p, email, mobile) in [
        (&a, "order@batch.example", "+8613750000001"),
        (&a, "ORDER@batch.example", "+8613750000001"),
        (&b, "order@batch.example", "+8613750000002"),
        (&b, "someone-else@batch.example", "+8613750000001"),
    ] {
        ids.push(app.prereg(p, email, mobile).await);
    }
    let [first, again, other, by_mobile] = ids[..] else {
        unreachable!("four requests")
    };
    app.add_worker(patient).await;
    let v1 = app.decided(&a, first).await;
    let v2 = app.decided(&a, again).await;
    let v3 = app.decided(&b, other).await;
    let v4 = app.decided(&b, by_mobile).await;
    // One transaction, decided in the order the requests were accepted: the
    // first holds the claim and every later one sees it.
    assert_eq!(
        transactions(&app, &[first, again, other, by_mobile]).await,
        1
    );
    assert_eq!(v1["status"], "preregistered", "{v1}");
    assert_eq!(v2["status"], "rejected", "{v2}");
    assert_eq!(v2["reason"]["code"], "already_preregistered", "{v2}");
    assert_eq!(v2["existing_id"], first.to_string(), "{v2}");
    for v in [&v3, &v4] {
        assert_eq!(v["status"], "rejected", "{v}");
        assert_eq!(v["reason"]["code"], "preregistered_by_other_partner", "{v}");
    }
    let claims = app
        .count(
            "SELECT count(*) FROM preregistrations WHERE status = 'preregistered'
           AND (email_norm = 'order@batch.example' OR mobile_norm = '+8613750000001')",
        )
        .await;
    assert_eq!(claims, 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_with_overlapping_batches_give_each_customer_one_claim() {
    let mut app = intake_only().await;
    let mut partners = Vec::new();
    for i in 0..3 {
        partners.push(app.create_partner(json!({"name": format!("Q{i}")})).await);
    }
    // 40 customers, each asked for by every partner: whichever worker's
    // batch takes a customer first, the others must see its claim.
    let mut ids = Vec::new();
    for p in &partners {
        for c in 0..40 {
            ids.push(
                app.prereg(p, &format!("k{c}@batch.example"), &format!("+86135{c:08}"))
                    .await,
            );
        }
    }
    for _ in 0..2 {
        app.add_worker(|c| {
            c.registration_batch = 24;
            c.registration_linger = Duration::from_millis(20);
        })
        .await;
    }
    wait_until(Duration::from_secs(30), || async {
        queued(&app).await == 0
    })
    .await;
    let per_customer: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT email_norm, count(*) FILTER (WHERE status = 'preregistered'),
                count(*) FILTER (WHERE reason_code IN ('already_preregistered', 'preregistered_by_other_partner'))
         FROM preregistrations GROUP BY email_norm ORDER BY email_norm",
    )
    .fetch_all(app.db())
    .await
    .unwrap();
    assert_eq!(per_customer.len(), 40);
    for (email, claims, refused) in &per_customer {
        assert_eq!((*claims, *refused), (1, 2), "{email}");
    }
    for id in &ids {
        assert_eq!(app.decided_entries(*id).await, 1);
    }
    assert!(dead_letters(&app).await.is_empty());
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_batch_leaves_every_job_to_be_decided_exactly_once() {
    // The intake runs here; the first registration worker is the real binary.
    let mut app = spawn_roles(|_| {}, vec![Queue::Accounts]).await;
    let p = app.create_partner(json!({})).await;
    let q = app.create_partner(json!({"name": "Other"})).await;
    let redis = redis::Client::open(app.cfg.redis_url.as_str()).unwrap();
    let rc = redis.get_multiplexed_async_connection().await.unwrap();

    // Hold one partner row: the worker's batch transaction stops at the
    // partner lock, after taking the batch's customer locks.
    let blocker = lock_partner_row(&app, &p).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push((
            &p,
            app.prereg(
                &p,
                &format!("k{i}@kill.example"),
                &format!("+86137600000{i:02}"),
            )
            .await,
        ));
        // Every other customer is asked for by a second partner too.
        if i % 2 == 0 {
            ids.push((
                &q,
                app.prereg(
                    &q,
                    &format!("k{i}@kill.example"),
                    &format!("+86137600000{i:02}"),
                )
                .await,
            ));
        }
    }
    let mut child = ChildProc::spawn(
        app.binary(&["worker", "--only", "registration"])
            .env("PREREG_REGISTRATION_BATCH", "64")
            .env("PREREG_REGISTRATION_LINGER", "300ms"),
    );
    // The whole batch is in flight: the locks of its ten customers (email
    // and mobile each) are held at once.
    let prefix = app.cfg.amqp_prefix.clone();
    wait_lock_count(&rc, &prefix, 20).await;
    assert_eq!(
        queued(&app).await,
        ids.len() as i64,
        "nothing committed yet"
    );
    child.kill();
    blocker.rollback().await.unwrap();

    // Another worker takes the redelivered batch.
    app.add_worker(patient).await;
    wait_until(Duration::from_secs(30), || async {
        queued(&app).await == 0
    })
    .await;
    for (partner, id) in &ids {
        let v = app.decided(partner, *id).await;
        assert_ne!(v["status"], "queued");
        assert_eq!(app.decided_entries(*id).await, 1, "decided exactly once");
    }
    let claims: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE status = 'preregistered') FROM preregistrations GROUP BY email_norm",
    )
    .fetch_all(app.db())
    .await
    .unwrap();
    assert_eq!(claims, vec![1; 10]);
    assert!(dead_letters(&app).await.is_empty());
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_locks_are_taken_per_job_all_or_none_and_released_together() {
    let url = redis_url();
    let prefix = format!("test-locks-{}", Uuid::new_v4().simple());
    let mk = || {
        prereg::locks::Locks::new(
            &url,
            &prefix,
            Duration::from_secs(5),
            Duration::from_millis(100),
        )
    };
    let (ours, theirs) = (mk(), mk());
    let names = |s: &[&str]| s.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    // Another owner holds one mobile.
    let held = theirs.acquire(&names(&["mobile:2"])).await.unwrap();
    let (guard, taken) = ours
        .try_acquire_groups(&[
            names(&["email:a", "mobile:1"]),
            names(&["email:b", "mobile:2"]),
            // The same customer again in the batch: already ours.
            names(&["email:a", "mobile:1"]),
        ])
        .await
        .unwrap();
    assert_eq!(taken, vec![true, false, true]);
    let redis = redis::Client::open(url.as_str()).unwrap();
    let mut rc = redis.get_multiplexed_async_connection().await.unwrap();
    // The busy job took nothing: not even its free email.
    assert_eq!(lock_keys(&mut rc, &prefix).await.len(), 3);
    ours.release(guard).await;
    let left = lock_keys(&mut rc, &prefix).await;
    assert_eq!(left.len(), 1, "only the other owner's lock is left");
    theirs.release(held).await;
    assert!(lock_keys(&mut rc, &prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_holding_its_partners_does_not_stall_the_intake_of_those_partners() {
    let mut app = intake_only().await;
    // The batch's write stops for a while on one customer, with the batch's
    // partner locks held.
    on_deciding(&app, "slow@batch.example", "PERFORM pg_sleep(4)").await;
    let p = app.create_partner(json!({})).await;
    let slow = app.prereg(&p, "slow@batch.example", "+8613780000001").await;
    app.add_worker(|_| {}).await;
    wait_until(Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'",
        )
        .fetch_one(app.db())
        .await
        .unwrap()
            == 1
    })
    .await;
    // The intake inserts a row of the same partner (its foreign key takes a
    // KEY SHARE lock on the partner): it must not wait for the batch.
    let started = std::time::Instant::now();
    let fast = app.prereg(&p, "fast@batch.example", "+8613780000002").await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "the intake waited {took:?} for the worker's batch"
    );
    assert_eq!(app.decided(&p, slow).await["status"], "preregistered");
    assert_eq!(app.decided(&p, fast).await["status"], "preregistered");
    app.cleanup().await;
}
