//! SPEC §8 (issue 10): masking by default with audited reveal, no personal
//! data in failures, dead-letter headers or Redis keys, formula-safe CSV,
//! bounded metric labels, throttled association guessing, bounded exports.

use std::time::Duration;

use prereg::mq::Queue;
use prereg_devtools::smtp_sink::{SmtpSink, Stage};
use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::common::*;

/// (who, when) of the audit entries of `action` on record `target`.
async fn audit_rows(
    app: &TestApp,
    action: &str,
    target: Uuid,
) -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
    sqlx::query_as("SELECT actor, at FROM audit_log WHERE action = $1 AND target = $2")
        .bind(action)
        .bind(target.to_string())
        .fetch_all(app.db())
        .await
        .unwrap()
}

async fn preregistered(app: &TestApp, p: &Partner, email: &str, mobile: &str) -> Uuid {
    let id = app.prereg(p, email, mobile).await;
    assert_eq!(app.decided(p, id).await["status"], "preregistered");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_preregistration_and_the_preview_are_masked_unless_revealed_with_an_audit_entry() {
    let (app, p) = spawn_with_partner().await;
    let id = preregistered(&app, &p, "zhang.san@customer.example", "+6591234567").await;

    let (s, v) = app.get(&format!("/v1/preregistrations/{id}"), &p.key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["full_name"], "Z**");
    assert_eq!(v["email"], "z***@customer.example");
    // Issue 10 item 9: the old mask showed all but one digit.
    assert_eq!(v["mobile"], "+65****4567");
    assert!(audit_rows(&app, "preregistration.revealed", id)
        .await
        .is_empty());

    let (s, v) = app
        .get(&format!("/v1/preregistrations/{id}?reveal=true"), &p.key)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["full_name"], "Zhang San");
    assert_eq!(v["email"], "zhang.san@customer.example");
    assert_eq!(v["mobile"], "+6591234567");
    let rows = audit_rows(&app, "preregistration.revealed", id).await;
    assert_eq!(rows.len(), 1, "one audit entry: who, when, which record");
    assert_eq!(rows[0].0, format!("partner:{}", p.id));

    let preview = format!("/v1/invitations/preview?preregistration_id={id}");
    let (s, v) = app.get(&preview, &p.key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let all = format!("{} {}", v["html"], v["text"]);
    assert!(!all.contains("Zhang San"), "{all}");
    assert!(all.contains("Z**"), "{all}");
    assert!(audit_rows(&app, "invitation_preview.revealed", id)
        .await
        .is_empty());
    let (s, v) = app.get(&format!("{preview}&reveal=true"), &p.key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["text"].as_str().unwrap().contains("Zhang San"), "{v}");
    assert_eq!(
        audit_rows(&app, "invitation_preview.revealed", id)
            .await
            .len(),
        1
    );
    let (s, v) = app
        .get(&format!("/v1/preregistrations/{id}?reveal=maybe"), &p.key)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_reply_quoting_the_address_is_masked_in_the_failure_and_the_dead_letter() {
    let sink = SmtpSink::start().await.unwrap();
    sink.script(
        Stage::Rcpt,
        550,
        "5.1.1 <leaky.customer@customer.example> (+8613900001111) mailbox unavailable",
    );
    let url = sink.url();
    let app = spawn_with(move |c| c.smtp_url = url).await;
    let p = app.create_partner(json!({})).await;
    let id = preregistered(
        &app,
        &p,
        "leaky.customer@customer.example",
        "+8613900001111",
    )
    .await;
    let inv = app.invite(&p, id).await;
    wait_until(Duration::from_secs(15), || async {
        app.get(&format!("/v1/invitations/{inv}"), &p.key).await.1["status"] == "failed"
    })
    .await;
    let (_, failed) = app.get(&format!("/v1/invitations/{inv}"), &p.key).await;
    let failure = failed["failure"].as_str().unwrap().to_string();
    assert!(failure.contains("550"), "{failure}");
    assert!(!failure.contains("leaky.customer@"), "{failure}");
    assert!(!failure.contains("13900001111"), "{failure}");
    assert!(failure.contains("l***@customer.example"), "{failure}");
    // Stored masked, not only shown masked.
    let stored: Option<String> =
        sqlx::query_scalar("SELECT failure FROM invitations WHERE id = $1")
            .bind(inv.parse::<Uuid>().unwrap())
            .fetch_one(app.db())
            .await
            .unwrap();
    assert!(!stored.unwrap().contains("leaky.customer@"));
    let dead = app.dead_letters(Queue::Email, 1).await;
    let header = dead[0].error.clone().unwrap_or_default();
    assert!(header.contains("550"), "{header}");
    assert!(!header.contains("leaky.customer@"), "{header}");
    assert!(!header.contains("13900001111"), "{header}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_cells_never_start_like_a_formula() {
    let (app, p) = spawn_with_partner().await;
    let (s, v) = app
        .submit(
            &p,
            json!({"full_name": "Formula Person", "email": "formula@customer.example",
                   "mobile": "+8613800000077", "tags": ["+1+HYPERLINK(\"http://x\")", "@SUM(1)"],
                   "remarks": "-1+cmd|' /C calc'!A0"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id: Uuid = v["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.decided(&p, id).await["status"], "preregistered");
    app.offline_link(&p, id).await;
    let (s, v) = app.post("/v1/exports", &p.key, json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let export = v["id"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(15), || async {
        app.get(&format!("/v1/exports/{export}"), &p.key).await.1["status"] == "completed"
    })
    .await;
    let csv = app
        .http
        .get(format!("{}/v1/exports/{export}/download", app.addr))
        .bearer_auth(&p.key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let row = csv.lines().nth(1).expect("one data row");
    assert!(row.contains("'-1+cmd"), "{row}");
    assert!(row.contains("'+86"), "masked mobile guarded: {row}");
    for cell in row.split(',') {
        let cell = cell.trim_start_matches('"');
        assert!(
            !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
            "cell {cell:?} of {row}"
        );
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_http_methods_do_not_become_metric_labels() {
    let app = spawn_app().await;
    let method = format!(
        "PROBE{}",
        Uuid::new_v4().simple().to_string()[..8].to_uppercase()
    );
    for _ in 0..3 {
        let resp = app
            .http
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}/v1/partner", app.addr),
            )
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_client_error());
    }
    let metrics = app.metrics_text().await;
    assert!(!metrics.contains(&method), "raw method became a label");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("prereg_http_requests_total") && l.contains("method=\"other\"")),
        "invented methods are counted as `other`"
    );
    // Routes are labelled by their template, never the raw path.
    let _ = app
        .get(&format!("/v1/preregistrations/{}", Uuid::new_v4()), "nope")
        .await;
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("route=\"/v1/preregistrations/{id}\""));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lock_keys_hold_no_email_or_mobile() {
    let app = spawn_app().await;
    let names = vec![
        "email:someone@customer.example".to_string(),
        "mobile:+8613800000999".to_string(),
    ];
    let guard = app.ctx.locks.acquire(&names).await.expect("locks");
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:lock:*", app.cfg.amqp_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    app.ctx.locks.release(guard).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for k in &keys {
        assert!(!k.contains('@') && !k.contains("8613800000999"), "{k}");
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_email_burst_over_the_rate_is_spread_out_not_failed() {
    let (sink, app) = with_sink(|c| {
        c.partner_email_rate = 3;
        c.max_attempts = 2;
    })
    .await;
    let p = app.create_partner(json!({})).await;
    let ids = app
        .preregs(&p, 0..12, |n| {
            (
                format!("burst{n}@customer.example"),
                format!("+86139000010{n:02}"),
            )
        })
        .await;
    app.all_granted(&p, &ids).await;
    app.invite_ids("/v1/invitations", &p, &ids).await;
    sink.wait_for(12, Duration::from_secs(30)).await;
    wait_until(Duration::from_secs(10), || async {
        let sent = app
            .count("SELECT count(*) FROM invitations WHERE status <> 'queued'")
            .await;
        sent == 12
    })
    .await;
    let statuses: Vec<(String, i32)> =
        sqlx::query_as("SELECT status, attempts FROM invitations ORDER BY id")
            .fetch_all(app.db())
            .await
            .unwrap();
    assert!(
        statuses.iter().all(|(s, a)| s == "sent" && *a == 1),
        "{statuses:?}"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_per_partner_are_bounded() {
    // No export worker: requested exports stay pending.
    let queues = Queue::ALL
        .iter()
        .copied()
        .filter(|q| *q != Queue::Export)
        .collect();
    let app = spawn_roles(|c| c.export_max_active = 2, queues).await;
    let p = app.create_partner(json!({})).await;
    for _ in 0..2 {
        let (s, v) = app.post("/v1/exports", &p.key, json!({})).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    let (s, v) = app.post("/v1/exports", &p.key, json!({})).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "too_many_exports");
    // Another partner is not affected.
    let other = app.create_partner(json!({"name": "Other"})).await;
    let (s, _) = app.post("/v1/exports", &other.key, json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    app.cleanup().await;
}
