//! RabbitMQ faults on a private node: a memory alarm (publishers blocked)
//! and a crash make the intake answer 503 with `Retry-After` within its
//! publish timeout, then at once while the outage is known; it accepts again
//! when the alarm clears or the node is back, without a restart, and nothing
//! answered 503 is half-done.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{
    common::{spawn_with, Partner, TestApp},
    private::{PrivateRabbit, TempDir},
};

async fn submit(app: &TestApp, p: &Partner, n: usize) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let resp = app
        .http
        .post(format!("{}/v1/preregistrations", app.addr))
        .bearer_auth(&p.key)
        .json(&json!({"full_name": "Wang Wu", "email": format!("alarm{n}@customer.example"), "mobile": format!("+86138{n:08}")}))
        .send()
        .await
        .expect("request sent");
    let status = resp.status();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        assert!(resp.headers().get("retry-after").is_some(), "Retry-After");
    }
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body, started.elapsed())
}

/// Submits until one is accepted (at most `limit`); returns how many 503s.
async fn until_accepted(app: &TestApp, p: &Partner, n: &mut usize, limit: Duration) -> usize {
    let started = Instant::now();
    let mut refused = 0;
    loop {
        *n += 1;
        let (status, body, _) = submit(app, p, *n).await;
        if status == StatusCode::ACCEPTED {
            return refused;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        refused += 1;
        assert!(started.elapsed() < limit, "never accepted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// While the broker cannot take messages: the first answer within the
/// publish timeout, the next ones at once.
async fn refused_fast(app: &TestApp, p: &Partner, n: &mut usize, publish_timeout: Duration) {
    *n += 1;
    let (status, body, first) = submit(app, p, *n).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["details"]["dependency"], "rabbitmq", "{body}");
    assert!(
        first < publish_timeout + Duration::from_secs(1),
        "first refusal within the publish timeout: {first:?}"
    );
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        *n += 1;
        let (status, body, took) = submit(app, p, *n).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
        slowest = slowest.max(took);
    }
    eprintln!("first refusal {first:?}, then slowest of 10: {slowest:?}");
    // Fast means well under the publish timeout a request would otherwise
    // wait out (a fixed 300 ms failed once at load 19 with the cluster test
    // beside it: 378 ms).
    assert!(
        slowest < publish_timeout / 2,
        "known outage answered at once, not after the publish timeout: {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_alarm_and_crash_are_503_then_recover_without_restart() {
    let home = TempDir::new("rabbit");
    let name = format!(
        "prereg-alarm-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let Some(mut rabbit) = PrivateRabbit::start_in(home.path(), &name) else {
        return;
    };
    let publish_timeout = Duration::from_secs(1);
    let app = spawn_with(|c| {
        c.amqp_url = rabbit.url();
        c.publish_timeout = publish_timeout;
        c.health_probe_interval = Duration::from_millis(200);
    })
    .await;
    let p = app.create_partner(json!({})).await;
    let mut n = 0;
    until_accepted(&app, &p, &mut n, Duration::from_secs(10)).await;

    // A memory alarm: the broker blocks every publishing connection.
    assert!(rabbit.ctl(&["set_vm_memory_high_watermark", "0.0000001"]));
    refused_fast(&app, &p, &mut n, publish_timeout).await;
    assert!(rabbit.ctl(&["set_vm_memory_high_watermark", "0.4"]));
    let refused = until_accepted(&app, &p, &mut n, Duration::from_secs(20)).await;
    eprintln!("alarm cleared; {refused} more refusals before accepting");

    // A crash, then the node back on the same port.
    rabbit.kill();
    refused_fast(&app, &p, &mut n, publish_timeout).await;
    assert!(rabbit.start_again(), "node restarts");
    let refused = until_accepted(&app, &p, &mut n, Duration::from_secs(30)).await;
    eprintln!("node back; {refused} more refusals before accepting");

    // Every accepted request is decided; no refused one was half-done.
    let accepted: Vec<(uuid::Uuid,)> =
        sqlx::query_as("SELECT id FROM preregistrations ORDER BY id")
            .fetch_all(app.db())
            .await
            .unwrap();
    for (id,) in &accepted {
        let v = app.decided(&p, *id).await;
        assert_eq!(v["status"], "preregistered", "{v}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = app.count("SELECT count(*) FROM preregistrations").await;
    assert_eq!(accepted.len(), 3, "three answers were 202");
    assert_eq!(rows, 3, "a refused request came back to life");
    app.cleanup().await;
    drop(rabbit);
}
