//! Slow dependencies: a Postgres lock wait is bounded by `statement_timeout`
//! (503 at the intake, a delayed retry in the worker); an SMTP server that
//! answers 421 or accepts and then stalls gets the retry schedule and the
//! customer one email.

use std::time::{Duration, Instant};

use prereg_devtools::smtp_sink::{SmtpSink, Stage};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::common::{lock_partner_row, spawn_with, wait_until, Partner, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statement_timeout_bounds_a_lock_wait_and_the_job_is_retried() {
    let app = spawn_with(|c| {
        c.db_statement_timeout = Duration::from_millis(400);
        c.retry_delays = vec![Duration::from_millis(300), Duration::from_millis(600)];
        c.max_attempts = 12;
    })
    .await;
    let p = app.create_partner(json!({})).await;
    // Someone holds the partner row (a long transaction, a stuck migration).
    let blocker = lock_partner_row(&app, &p).await;

    // The intake: an update of that row answers 503 + Retry-After after
    // about the statement timeout, not whenever the lock goes.
    let started = Instant::now();
    let resp = app
        .http
        .put(format!("{}/v1/partner/contact", app.addr))
        .bearer_auth(&p.key)
        .json(&json!({"contact_email": "new@partner.example"}))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
    assert!(took < Duration::from_secs(3), "bounded wait: {took:?}");

    // The worker: its decision waits on the same row; each attempt gives up
    // after the statement timeout and is retried later.
    let id = app
        .prereg(&p, "slow@customer.example", "+8613600000001")
        .await;
    let mut longest = 0.0f64;
    let watch_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_until {
        let age: f64 = sqlx::query_scalar(
            "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - query_start)), 0)::float8
               FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(app.db())
        .await
        .unwrap();
        longest = longest.max(age);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, v) = app.get(&format!("/v1/preregistrations/{id}"), &p.key).await;
    assert_eq!(v["status"], "queued", "still waiting while the row is held");
    assert!(
        longest > 0.1 && longest < 1.0,
        "lock waits are cut at the statement timeout (longest {longest:.2} s)"
    );
    blocker.rollback().await.unwrap();
    let v = app.decided(&p, id).await;
    assert_eq!(v["status"], "preregistered", "{v}");
    app.cleanup().await;
}

async fn mail_app(smtp_url: String) -> TestApp {
    spawn_with(move |c| {
        c.smtp_url = smtp_url;
        c.smtp_timeout = Duration::from_millis(800);
        c.job_timeout = Duration::from_secs(6);
        c.retry_delays = vec![Duration::from_millis(200), Duration::from_millis(400)];
        c.max_attempts = 6;
    })
    .await
}

/// Claims a customer and invites them; returns the invitation id.
async fn invite_one(app: &TestApp, p: &Partner, n: u32) -> String {
    let id = app
        .claimed(
            p,
            &format!("mailfault{n}@customer.example"),
            &format!("+8615100000{n:03}"),
        )
        .await;
    app.invite(p, id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_421_is_retried_and_the_customer_gets_one_email() {
    let sink = SmtpSink::start().await.unwrap();
    sink.script(Stage::Mail, 421, "4.7.0 too busy, closing");
    sink.script(Stage::Mail, 421, "4.7.0 too busy, closing");
    let app = mail_app(sink.url()).await;
    let p = app.create_partner(json!({})).await;
    let inv = invite_one(&app, &p, 1).await;
    let v = app.invitation_state(&p, &inv, "sent").await;
    assert_eq!(v["attempts"], 3, "two 421s, then sent: {v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 1, "one email");
    app.cleanup().await;
}

/// A mail server that is down (connections refused) is a retry, nothing
/// sent and nothing failed; once it is back, the customer gets one email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_down_is_retried_and_the_customer_gets_one_email_once_it_is_back() {
    // A free port with nothing listening on it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let app = mail_app(format!("smtp://{addr}")).await;
    let p = app.create_partner(json!({})).await;
    let inv = invite_one(&app, &p, 3).await;
    let path = format!("/v1/invitations/{inv}");
    wait_until(Duration::from_secs(10), || async {
        let v = app.get(&path, &p.key).await.1;
        assert_ne!(v["status"], "failed", "a refused connection failed it: {v}");
        v["attempts"].as_i64().unwrap_or(0) >= 2
    })
    .await;

    // Attempt 1 was refused; attempt 2 (counted when it starts) may be
    // the one that finds the server back.
    let sink = SmtpSink::start_on(addr).await.unwrap();
    let v = app.invitation_state(&p, &inv, "sent").await;
    assert!(v["attempts"].as_i64().unwrap_or(0) >= 2, "{v}");
    assert_eq!(sink.wait_for(1, Duration::from_secs(5)).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 1, "one email");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_that_accepts_then_stalls_is_retried_and_the_customer_gets_one_email() {
    let sink = SmtpSink::start().await.unwrap();
    // A relay that accepts connections and says nothing, until it recovers
    // and passes connections to the sink.
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stalled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sink_addr = sink.addr();
    let (h, s) = (healthy.clone(), stalled.clone());
    let relay_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = relay.accept().await {
            if h.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(sink_addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                    }
                });
            } else {
                s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(conn);
            }
        }
    });
    let app = mail_app(format!("smtp://{relay_addr}")).await;
    let p = app.create_partner(json!({})).await;
    let inv = invite_one(&app, &p, 2).await;
    wait_until(Duration::from_secs(20), || async {
        stalled.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    let (_, v) = app.get(&format!("/v1/invitations/{inv}"), &p.key).await;
    assert_eq!(
        v["status"], "queued",
        "not sent while the server stalls: {v}"
    );
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let v = app.invitation_state(&p, &inv, "sent").await;
    assert!(v["attempts"].as_i64().unwrap_or(0) >= 2, "{v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 1, "one email");
    relay_task.abort();
    app.cleanup().await;
}
