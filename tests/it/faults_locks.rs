//! A worker killed while holding a customer's Redis locks does not stall
//! that customer for long: locks have a short TTL that a watchdog renews
//! while the job runs, so the dead worker's locks free themselves within
//! about a second and another worker decides.

use std::time::{Duration, Instant};

use prereg::mq::Queue;
use serde_json::json;

use crate::{
    common::{lock_keys, lock_partner_row, spawn_roles, wait_lock_count},
    private::ChildProc,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_worker_frees_its_locks_within_about_a_second() {
    // The intake runs here; the first registration worker is the real binary.
    let mut app = spawn_roles(|_| {}, vec![Queue::Accounts]).await;
    let p = app.create_partner(json!({})).await;
    let redis = redis::Client::open(app.cfg.redis_url.as_str()).unwrap();
    let mut rc = redis.get_multiplexed_async_connection().await.unwrap();

    // Hold the partner row: the worker stops inside its decision, after
    // taking the customer's locks.
    let blocker = lock_partner_row(&app, &p).await;
    let mut child = ChildProc::spawn(&mut app.binary(&["worker", "--only", "registration"]));
    let id = app
        .prereg(&p, "held@customer.example", "+8613700000001")
        .await;
    let prefix = app.cfg.amqp_prefix.clone();
    wait_lock_count(&rc, &prefix, 2).await;
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
    assert_eq!(app.decided_entries(id).await, 1, "decided exactly once");
    app.cleanup().await;
}
