//! Dependency outages are "try again": the intake answers 503 with the error
//! shape and `Retry-After`, fast while the outage is known (shared health
//! state, probed in the background), and recovers without a restart.
//! Every fault here is on a private instance.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{
    common::{spawn_with, TestApp},
    private::PrivatePg,
};

/// One POST /v1/preregistrations: status, body, Retry-After, latency.
async fn submit(
    app: &TestApp,
    key: &str,
    n: usize,
) -> (StatusCode, Value, Option<String>, Duration) {
    let started = Instant::now();
    let resp = app
        .http
        .post(format!("{}/v1/preregistrations", app.addr))
        .bearer_auth(key)
        .json(&json!({"full_name": "Li Si", "email": format!("outage{n}@customer.example"), "mobile": format!("+86139{n:08}")}))
        .send()
        .await
        .expect("request sent");
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body, retry_after, started.elapsed())
}

fn assert_try_again(status: StatusCode, body: &Value, retry_after: &Option<String>, dep: &str) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
    assert!(body["error"]["message"].as_str().is_some(), "{body}");
    assert_eq!(body["error"]["details"]["dependency"], dep, "{body}");
    let secs: u64 = retry_after
        .as_deref()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!(secs >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_is_503_fast_then_recovers_without_restart() {
    let Some(pg) = PrivatePg::start() else { return };
    let url = format!("{}/postgres", pg.base_url());
    let app = spawn_with(|c| {
        c.database_url = url.clone();
        c.health_probe_interval = Duration::from_millis(200);
        c.db_acquire_timeout = Duration::from_secs(5);
        c.retry_delays = vec![Duration::from_secs(1), Duration::from_secs(2)];
        c.max_attempts = 10;
    })
    .await;
    let p = app.create_partner(json!({})).await;
    let first = app
        .prereg(&p, "before@customer.example", "+8613900000001")
        .await;
    app.decided(&p, first).await;

    // A clean shutdown: sessions get "terminating connection due to
    // administrator command".
    let stopped_at = Instant::now();
    tokio::task::block_in_place(|| pg.stop("fast"));
    let mut latencies = Vec::new();
    let mut n = 0;
    // Until the outage is known, one request may wait for the pool; after
    // that every answer is immediate.
    loop {
        n += 1;
        let (status, body, retry_after, took) = submit(&app, &p.key, n).await;
        assert_try_again(status, &body, &retry_after, "postgres");
        latencies.push(took);
        if app.ctx.health.is_down(prereg::deps::Dep::Postgres) {
            break;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(8),
            "the outage was never noticed"
        );
    }
    let noticed = stopped_at.elapsed();
    let mut fast = Vec::new();
    for _ in 0..30 {
        n += 1;
        let (status, body, retry_after, took) = submit(&app, &p.key, n).await;
        assert_try_again(status, &body, &retry_after, "postgres");
        fast.push(took);
    }
    let slowest = fast.iter().max().copied().unwrap_or_default();
    eprintln!(
        "outage noticed after {noticed:?}; before that {latencies:?}; then 30 answers, slowest {slowest:?}"
    );
    assert!(
        slowest < Duration::from_millis(250),
        "503 while known down must not wait for the pool (5 s): slowest {slowest:?}"
    );
    // Readiness says which dependency is down.
    let (status, ready) = app
        .request(reqwest::Method::GET, "/readyz", None, None)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["checks"]["postgres"]["ok"], false, "{ready}");

    // Back: accepted again, same process, and the job is decided.
    tokio::task::block_in_place(|| pg.start_again());
    let back = Instant::now();
    let id = loop {
        n += 1;
        let (status, body, _, _) = submit(&app, &p.key, n).await;
        if status == StatusCode::ACCEPTED {
            break body["id"].as_str().expect("id").parse().unwrap();
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "never accepted again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("accepting again {:?} after the restart", back.elapsed());
    let v = app.decided(&p, id).await;
    assert_eq!(v["status"], "preregistered", "{v}");
    app.cleanup().await;
    drop(pg);
}
