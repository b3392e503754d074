//! A worker killed while holding a customer's Redis locks does not stall
//! that customer for long: locks have a short TTL that a watchdog renews
//! while the job runs, so the dead worker's locks free themselves within
//! about a second and another worker decides.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use prereg::mq::Queue;
use serde_json::json;

use crate::{
    common::{spawn_roles, wait_until},
    private::ChildProc,
};

async fn lock_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(format!("{prefix}:lock:*"))
        .query_async(conn)
        .await
        .expect("redis KEYS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_worker_frees_its_locks_within_about_a_second() {
    // The intake runs here; the first registration worker is the real binary.
    let mut app = spawn_roles(|_| {}, vec![Queue::Accounts]).await;
    let p = app.create_partner(json!({})).await;
    let redis = redis::Client::open(app.cfg.redis_url.as_str()).unwrap();
    let mut rc = redis.get_multiplexed_async_connection().await.unwrap();

    // Hold the partner row: the worker stops inside its decision, after
    // taking the customer's locks.
    let mut blocker = app.db().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM partners WHERE id = $1 FOR NO KEY UPDATE")
        .bind(p.id)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut child = ChildProc::spawn(
        Command::new(env!("CARGO_BIN_EXE_prereg"))
            .args(["worker", "--only", "registration"])
            .env("PREREG_DATABASE_URL", &app.cfg.database_url)
            .env("PREREG_AMQP_URL", &app.cfg.amqp_url)
            .env("PREREG_REDIS_URL", &app.cfg.redis_url)
            .env("PREREG_AMQP_PREFIX", &app.cfg.amqp_prefix)
            .env("PREREG_DEV_MODE", "1")
            .env("PREREG_RETRY_DELAYS", "100ms,200ms,400ms")
            .env("PREREG_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "error"),
    );
    let id = app
        .prereg(&p, "held@customer.example", "+8613700000001")
        .await;
    let prefix = app.cfg.amqp_prefix.clone();
    wait_until(Duration::from_secs(20), || {
        let mut rc = rc.clone();
        let prefix = prefix.clone();
        async move { lock_keys(&mut rc, &prefix).await.len() == 2 }
    })
    .await;
    // Held past several TTLs (1 s by default): the watchdog renews them.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        lock_keys(&mut rc, &prefix).await.len(),
        2,
        "a running job keeps its locks beyond the TTL"
    );
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&lock_keys(&mut rc, &prefix).await[0])
        .query_async(&mut rc)
        .await
        .unwrap();
    assert!(
        (0..=1000).contains(&ttl_ms),
        "short TTL, renewed: {ttl_ms} ms"
    );

    // Crash the worker mid-job, then let the row go.
    child.kill();
    let killed = Instant::now();
    blocker.rollback().await.unwrap();
    app.add_worker(|_| {}).await;
    let v = app.decided(&p, id).await;
    let took = killed.elapsed();
    eprintln!("decided by another worker {took:?} after the SIGKILL");
    assert_eq!(v["status"], "preregistered", "{v}");
    assert!(
        took < Duration::from_millis(2500),
        "the dead worker's locks stalled the customer for {took:?}"
    );
    assert!(lock_keys(&mut rc, &prefix).await.is_empty());
    let decided: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM preregistration_events WHERE preregistration_id = $1 AND change = 'decided'",
    )
    .bind(id)
    .fetch_one(app.db())
    .await
    .unwrap();
    assert_eq!(decided, 1, "decided exactly once");
    app.cleanup().await;
}
