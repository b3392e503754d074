//! Races for one customer, with and without Redis; the locks themselves;
//! SIGTERM in the middle of a load.

use std::time::Duration;

use futures::future::join_all;
use prereg::{
    locks::{LockError, Locks},
    mq::Queue,
};
use serde_json::json;
use uuid::Uuid;

use crate::common::*;

async fn race(app: &TestApp, partners: &[Partner]) {
    // Everyone submits the same customer at the same moment.
    let submits = partners
        .iter()
        .map(|p| app.prereg(p, "race@customer.example", "+8613300000001"));
    let ids: Vec<Uuid> = join_all(submits).await;
    let mut decided = Vec::new();
    for (p, id) in partners.iter().zip(&ids) {
        decided.push(app.decided(p, *id).await);
    }
    let winners: Vec<_> = decided
        .iter()
        .filter(|v| v["status"] == "preregistered")
        .collect();
    assert_eq!(winners.len(), 1, "exactly one active claim");
    let losers = decided
        .iter()
        .filter(|v| v["reason"]["code"] == "preregistered_by_other_partner")
        .count();
    assert_eq!(
        losers,
        partners.len() - 1,
        "every other request names the other partner's claim"
    );
    let active = app
        .count(
            "SELECT count(*) FROM preregistrations WHERE email_norm = 'race@customer.example'
           AND status IN ('preregistered', 'invited', 'association_failed', 'associated')",
        )
        .await;
    assert_eq!(active, 1);
}

async fn racing_app(redis: Option<&str>) -> (TestApp, Vec<Partner>) {
    let redis = redis.map(str::to_string);
    let r2 = redis.clone();
    let mut app = spawn_with(move |c| {
        if let Some(r) = r2 {
            c.redis_url = r;
        }
    })
    .await;
    // Two more independent workers: three consumers on the registration queue.
    for _ in 0..2 {
        let r = redis.clone();
        app.add_worker(move |c| {
            if let Some(r) = r {
                c.redis_url = r;
            }
        })
        .await;
    }
    let mut partners = Vec::new();
    for i in 0..50 {
        partners.push(
            app.create_partner(json!({"name": format!("Racer {i}")}))
                .await,
        );
    }
    (app, partners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_partners_race_for_one_customer() {
    let (app, partners) = racing_app(None).await;
    race(&app, &partners).await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_partners_race_with_redis_unreachable() {
    // Nothing listens on port 1: every lock attempt fails at once.
    let (app, partners) = racing_app(Some("redis://127.0.0.1:1")).await;
    assert!(app.ctx.locks.ping().await.is_err());
    race(&app, &partners).await;
    app.cleanup().await;
}

#[tokio::test]
async fn redis_locks_are_exclusive_ordered_and_owner_released() {
    let prefix = format!("locktest-{}", Uuid::new_v4().simple());
    let a = Locks::new(
        &redis_url(),
        &prefix,
        Duration::from_secs(5),
        Duration::from_millis(150),
    );
    let b = Locks::new(
        &redis_url(),
        &prefix,
        Duration::from_secs(5),
        Duration::from_millis(150),
    );
    let keys = ["mobile:+86".to_string(), "email:x@y.z".to_string()];
    let g = a.acquire(&keys).await.expect("first owner");
    // Any overlap is refused while held (in either key order).
    let rev: Vec<String> = keys.iter().rev().cloned().collect();
    assert!(matches!(b.acquire(&rev).await, Err(LockError::Busy)));
    assert!(matches!(b.acquire(&keys[..1]).await, Err(LockError::Busy)));
    // Other keys are free.
    let other = b
        .acquire(&["email:other@y.z".to_string()])
        .await
        .expect("independent key");
    b.release(other).await;
    a.release(g).await;
    let g2 = b.acquire(&keys).await.expect("free after release");
    b.release(g2).await;
    // Expiry: a lock not released frees itself after its TTL.
    let short = Locks::new(
        &redis_url(),
        &prefix,
        Duration::from_millis(200),
        Duration::from_millis(50),
    );
    let mut forgotten = short.acquire(&keys).await.expect("taken");
    // As if its owner crashed: nobody renews it any more.
    forgotten.stop_renewing();
    assert!(matches!(b.acquire(&keys).await, Err(LockError::Busy)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let g3 = b.acquire(&keys).await.expect("expired");
    // A late release by the old owner does not free the new owner's lock.
    short.release(forgotten).await;
    assert!(matches!(a.acquire(&keys).await, Err(LockError::Busy)));
    b.release(g3).await;
}

/// Kills the child worker however the test ends: an orphan would keep
/// re-declaring its queues on the shared broker.
struct ChildGuard(Option<std::process::Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_load_loses_nothing() {
    // The intake runs here; the registration worker is the real binary.
    let mut app = spawn_roles(|_| {}, vec![Queue::Accounts]).await;
    let spawn_worker = |app: &TestApp| {
        app.binary(&["worker", "--only", "registration"])
            .env("PREREG_WORKER_CONCURRENCY", "4")
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("worker binary starts")
    };
    let mut guard = ChildGuard(Some(spawn_worker(&app)));
    let pid = guard.0.as_ref().map(|c| c.id()).unwrap_or_default();
    let partners = [
        app.create_partner(json!({"name": "A"})).await,
        app.create_partner(json!({"name": "B"})).await,
    ];
    const N: usize = 600;
    // Requests are sent in chunks; the worker is signalled once it has
    // decided some of the first ones, and the rest keep coming while it
    // drains and after it is gone, so the signal always lands mid-load
    // (the batched worker would otherwise decide all 600 before it).
    const BEFORE_SIGNAL: usize = 100;
    let db = app.db().clone();
    let count_decided = || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM preregistrations WHERE status <> 'queued'",
            )
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let mut ids = Vec::with_capacity(N);
    let mut signalled = None;
    for chunk in (0..N).collect::<Vec<_>>().chunks(20) {
        if signalled.is_none() && ids.len() >= BEFORE_SIGNAL {
            wait_until(Duration::from_secs(30), || async {
                count_decided().await >= 50
            })
            .await;
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            signalled = Some(count_decided().await);
        }
        // Duplicates included: every 10th customer is submitted by both partners.
        let batch = chunk.iter().map(|i| {
            let p = &partners[i % 2];
            let n = if i % 10 == 1 { i - 1 } else { *i };
            app.prereg(
                p,
                Box::leak(format!("load{n}@customer.example").into_boxed_str()),
                Box::leak(format!("+86132{n:08}").into_boxed_str()),
            )
        });
        ids.extend(join_all(batch).await);
    }
    let at_signal = signalled.expect("signalled mid-load");
    let mut child = guard.0.take().expect("child");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .expect("worker exits");
    assert!(status.success(), "graceful exit, got {status:?}");
    assert!(
        (at_signal as usize) < N && at_signal >= 50,
        "the signal came mid-load ({at_signal} of {N} decided)"
    );
    let left = N as i64 - count_decided().await;
    assert!(left > 0, "work was left for the next worker");
    // A new worker picks up the rest.
    app.add_worker(|_| {}).await;
    wait_until(Duration::from_secs(60), || async {
        count_decided().await as usize == N
    })
    .await;
    let twice = app.count("SELECT count(*) FROM (SELECT preregistration_id FROM preregistration_events WHERE change = 'decided'
           GROUP BY 1 HAVING count(*) <> 1) x").await;
    assert_eq!(twice, 0, "every pre-registration decided exactly once");
    let decided_events = app
        .count("SELECT count(*) FROM preregistration_events WHERE change = 'decided'")
        .await;
    assert_eq!(decided_events as usize, N);
    app.cleanup().await;
}

/// The Redis lock is really taken: while the test holds the customer's lock
/// (through the same `Locks` the workers use, on the app's prefix), that
/// customer's request stays queued — another customer is decided meanwhile —
/// and it is decided once the lock is released. With the lock ignored the
/// request would be decided at once (the unique index alone decides races).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_customer_lock_holds_that_decision_back_until_released() {
    let app = spawn_with(|c| {
        c.lock_wait = Duration::from_millis(200);
        c.retry_delays = vec![Duration::from_millis(300); 3];
        c.max_attempts = 100;
    })
    .await;
    let p = app.create_partner(json!({})).await;
    // The intake normalises the email: the worker asks for the same lock.
    held_lock_holds_back_its_customer(
        &app,
        &p,
        &app.cfg.redis_url,
        "held@customer.example",
        [" Held@Customer.EXAMPLE", "+8613300000077"],
        ["free@customer.example", "+8613300000078"],
    )
    .await;
    app.cleanup().await;
}

/// Redis is killed and started again on its port (a private instance): the
/// workers decide without it meanwhile (Postgres still guards), and once it
/// is back they take the locks again — a lock the test holds on the
/// restarted Redis holds that customer back until released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_take_redis_locks_again_after_redis_restarts() {
    let Some(mut redis) = crate::private::PrivateRedis::start() else {
        return;
    };
    let url = redis.url();
    let app = spawn_with(move |c| {
        c.redis_url = url;
        c.lock_wait = Duration::from_millis(200);
        c.retry_delays = vec![Duration::from_millis(300); 3];
        c.max_attempts = 100;
    })
    .await;
    let p = app.create_partner(json!({})).await;
    let before = app
        .prereg(&p, "r-before@customer.example", "+8613300000081")
        .await;
    assert_eq!(app.decided(&p, before).await["status"], "preregistered");
    redis.kill();
    let during = app
        .prereg(&p, "r-during@customer.example", "+8613300000082")
        .await;
    assert_eq!(app.decided(&p, during).await["status"], "preregistered");
    redis.start_again();
    // The app's lock client finds Redis again by itself.
    wait_until(Duration::from_secs(15), || async {
        app.ctx.locks.ping().await.is_ok()
    })
    .await;
    held_lock_holds_back_its_customer(
        &app,
        &p,
        &redis.url(),
        "r-after@customer.example",
        ["r-after@customer.example", "+8613300000083"],
        ["r-free@customer.example", "+8613300000084"],
    )
    .await;
    app.cleanup().await;
}

/// Takes the customer lock of `locked_email` from the test (on `redis_url`,
/// under the app's prefix, as the workers name it), submits that customer
/// (`held`: email, mobile) and another one (`free`), and asserts the held
/// one stays `queued` through several lock waits and retries while the other
/// is decided, then is decided once the test releases the lock.
async fn held_lock_holds_back_its_customer(
    app: &TestApp,
    p: &Partner,
    redis_url: &str,
    locked_email: &str,
    held: [&str; 2],
    free: [&str; 2],
) {
    let holder = Locks::new(
        redis_url,
        &app.cfg.amqp_prefix,
        Duration::from_secs(30),
        Duration::from_millis(100),
    );
    let guard = holder
        .acquire(&[format!("email:{locked_email}")])
        .await
        .expect("the test takes the customer's lock");
    let held = app.prereg(p, held[0], held[1]).await;
    let free = app.prereg(p, free[0], free[1]).await;
    assert_eq!(app.decided(p, free).await["status"], "preregistered");
    // Several lock waits and retries pass (lock wait 200 ms, retry 300 ms).
    let window = tokio::time::Instant::now() + Duration::from_millis(2000);
    while tokio::time::Instant::now() < window {
        let (_, v) = app
            .get(&format!("/v1/preregistrations/{held}"), &p.key)
            .await;
        assert_eq!(
            v["status"], "queued",
            "decided while its lock was held: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    holder.release(guard).await;
    assert_eq!(app.decided(p, held).await["status"], "preregistered");
}
