//! Behaviours the README and docs/ promise that had no test of their own:
//! notices actually delivered through the email worker to a real SMTP
//! server, a retry that waits its delay, a claim that lapses without a
//! sweep, the quota under concurrency, partner administration and the
//! request id carried from HTTP to the published event.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use lapin::options::BasicGetOptions;
use prereg::{
    app::{self, Roles},
    config::ReviewSla,
    mq::CloudEvent,
    Ctx,
};
use prereg_devtools::smtp_sink::{ReceivedMail, SmtpSink, Stage};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::*;

fn subject(m: &ReceivedMail) -> String {
    m.data
        .lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or_default()
        .to_string()
}

/// Mails to `to` among everything the sink accepted so far.
async fn mails_to(sink: &SmtpSink, to: &str) -> Vec<ReceivedMail> {
    sink.wait_for(usize::MAX, Duration::ZERO)
        .await
        .into_iter()
        .filter(|m| m.to.iter().any(|t| t == to))
        .collect()
}

async fn wait_mails_to(sink: &SmtpSink, to: &str, n: usize, limit: Duration) -> Vec<ReceivedMail> {
    eventually(limit, || async {
        let got = mails_to(sink, to).await;
        if got.len() >= n {
            Ok(got)
        } else {
            Err(format!("{} of {n} mails to {to}", got.len()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_smtp_failure_is_retried_after_its_delay_and_sent_once() {
    let sink = SmtpSink::start().await.unwrap();
    sink.script(Stage::Data, 451, "4.3.0 try again later");
    // A first delay long enough to tell "waited" from "retried at once";
    // jitter takes at most a fifth off it.
    let app = mail_app(&sink, |c| {
        c.retry_delays = vec![Duration::from_millis(1500), Duration::from_secs(3)];
    })
    .await;
    let p = app.create_partner(json!({})).await;
    let id = app
        .claimed(&p, "delay@customer.example", "+8615900000001")
        .await;
    let inv = app.invite(&p, id).await;
    let sent = app.invitation_state(&p, &inv, "sent").await;
    assert_eq!(sent["attempts"], 2, "{sent}");
    let t = |k: &str| serde_json::from_value::<DateTime<Utc>>(sent[k].clone()).unwrap();
    let waited = (t("sent_at") - t("created_at")).to_std().unwrap();
    assert!(
        waited >= Duration::from_millis(1200),
        "the retry came after {waited:?}, before its 1.5 s delay (less jitter)"
    );
    assert!(
        waited < Duration::from_secs(3),
        "the first retry took the second tier's delay: {waited:?}"
    );
    assert_one_mail(&sink, Duration::from_millis(500), "one email").await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_expiry_reminder_email_reaches_the_partner_once() {
    let (sink, app) = with_mail(|c| {
        c.claim_validity = Duration::from_secs(3600);
        c.claim_reminder_before = Duration::from_secs(7200);
    })
    .await;
    let p = app
        .create_partner(json!({"contact_email": "claims@partner.example"}))
        .await;
    app.claimed(&p, "remind-me@customer.example", "+8615900000002")
        .await;
    for _ in 0..3 {
        let (s, v) = app.post("/v1/admin/sweeps", OPERATOR, json!({})).await;
        assert!(s.is_success(), "{s} {v}");
    }
    let mails = wait_mails_to(&sink, "claims@partner.example", 1, Duration::from_secs(15)).await;
    assert!(
        subject(&mails[0]).contains("expires soon"),
        "{}",
        mails[0].data
    );
    // Three sweeps, one reminder: no second one turns up.
    tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if mails_to(&sink, "claims@partner.example").await.len() > 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect_err("a second reminder was sent");
    // The customer is never the recipient of a partner notice.
    assert!(mails_to(&sink, "remind-me@customer.example")
        .await
        .is_empty());
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_reminder_and_escalation_emails_are_delivered_once_each() {
    let (sink, app) = with_mail(|c| {
        c.review_sla = ReviewSla::Plain(Duration::from_secs(3));
        c.review_reminder_before = Duration::from_secs(2);
        c.sweep_interval = Duration::from_millis(200);
        c.escalation_email = "escalate@provider.example".into();
        c.reviewer_email = "reviewers@provider.example".into();
    })
    .await;
    // Two schedulers: ticks from both must not double the notices.
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(app.scheduler_node().await);
    }
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({})).await;
    let email = "review-mail@customer.example";
    let mobile = "+8615900000003";
    let id = app
        .review_requested(&upstream, &p, "rev-mail", email, mobile)
        .await;

    for (to, subject_start) in [
        ("reviewers@provider.example", "Reminder: manual review"),
        ("escalate@provider.example", "OVERDUE"),
    ] {
        let mail = wait_mails_to(&sink, to, 1, Duration::from_secs(15)).await;
        assert!(
            subject(&mail[0]).starts_with(subject_start),
            "{}",
            mail[0].data
        );
    }
    // Several more ticks from both schedulers pass: still one of each.
    let escalated = app
        .count_for(
            "SELECT count(*) FROM reviews WHERE preregistration_id = $1 AND escalated_at IS NOT NULL",
            id,
        )
        .await;
    assert_eq!(escalated, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mails_to(&sink, "reviewers@provider.example").await.len(), 1);
    assert_eq!(mails_to(&sink, "escalate@provider.example").await.len(), 1);
    for n in nodes {
        n.shutdown().await;
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_expires_a_lapsed_claim_itself_without_a_sweep() {
    // No scheduler runs in this app: only the registration worker can
    // notice that the first claim has lapsed.
    let app = spawn_with(|c| c.claim_validity = Duration::from_secs(1)).await;
    let a = app.create_partner(json!({})).await;
    let b = app.create_partner(json!({"name": "Second Co"})).await;
    let first = app
        .prereg(&a, "lapse@customer.example", "+8615900000004")
        .await;
    let claim = app.decided(&a, first).await;
    assert_eq!(claim["status"], "preregistered");
    let expires: DateTime<Utc> = serde_json::from_value(claim["expires_at"].clone()).unwrap();
    while Utc::now() <= expires {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.claimed(&b, "lapse@customer.example", "+8615900000004")
        .await;
    let (_, old) = app
        .get(&format!("/v1/preregistrations/{first}"), &a.key)
        .await;
    assert_eq!(old["status"], "expired", "{old}");
    app.cleanup().await;
}

/// The database keeps each partner's quota usage with triggers; the set
/// of statuses they count is the domain's, for every status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_databases_quota_statuses_are_the_domains() {
    let app = spawn_app().await;
    for s in prereg::domain::status::Status::ALL {
        let counted: bool = sqlx::query_scalar("SELECT counts_toward_quota($1)")
            .bind(s.as_str())
            .fetch_one(app.db())
            .await
            .unwrap();
        assert_eq!(counted, s.counts_toward_quota(), "{s:?}");
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_holds_under_concurrent_requests() {
    let app = spawn_with(|c| c.partner_quota = 3).await;
    let p = app.create_partner(json!({})).await;
    let ids = join_all((0..12).map(|i| {
        let app = &app;
        let p = &p;
        async move {
            app.prereg(
                p,
                &format!("quota{i}@customer.example"),
                &format!("+86159100000{i:02}"),
            )
            .await
        }
    }))
    .await;
    let mut granted = 0;
    let mut over = 0;
    for id in ids {
        let v = app.decided(&p, id).await;
        match v["status"].as_str().unwrap() {
            "preregistered" => granted += 1,
            "rejected" => {
                assert_eq!(v["reason"]["code"], "quota_exceeded", "{v}");
                over += 1;
            }
            other => panic!("unexpected status {other}: {v}"),
        }
    }
    assert_eq!((granted, over), (3, 9));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_patch_partners_and_partners_set_their_contact() {
    let (app, p) = spawn_with_partner().await;
    // The partner changes its contact; the profile shows it.
    let (s, v) = app
        .request(
            Method::PUT,
            "/v1/partner/contact",
            Some(&p.key),
            Some(json!({"contact_email": "new-ops@partner.example", "contact_mobile": "+8613700000009"})),
        )
        .await;
    assert!(s.is_success(), "{s} {v}");
    let (_, me) = app.get("/v1/partner", &p.key).await;
    assert_eq!(me["contact_email"], "new-ops@partner.example", "{me}");
    let (s, v) = app
        .request(
            Method::PUT,
            "/v1/partner/contact",
            Some(&p.key),
            Some(json!({"contact_email": "not an address"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    // The operator withdraws customer development: the partner is told why.
    app.patch_partner(&p, json!({"customer_development": false}))
        .await;
    let (_, shown) = app
        .get(&format!("/v1/admin/partners/{}", p.id), OPERATOR)
        .await;
    assert_eq!(shown["customer_development"], false, "{shown}");
    let (s, v) = app.submit(&p, json!({"full_name": "Li Si", "email": "patched@customer.example", "mobile": "+8613700000010"})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "customer_development_disabled");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_travels_from_http_to_the_published_event() {
    let app = spawn_app().await;
    // A queue of the test's own receives a copy of the decision events.
    let (ch, capture) = capture_events(&app.ctx, "rid", "preregistration.*").await;
    let p = app.create_partner(json!({})).await;
    let rid = format!("req-{}", Uuid::new_v4().simple());
    let resp = app
        .http
        .post(format!("{}/v1/preregistrations", app.addr))
        .bearer_auth(&p.key)
        .header("x-request-id", &rid)
        .json(&json!({"full_name": "Wang Wu", "email": "rid@customer.example", "mobile": "+8613700000011"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(resp.headers()["x-request-id"], rid.as_str());
    let id: Uuid = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    app.decided(&p, id).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let event = loop {
        if let Some(m) = ch
            .basic_get(&capture, BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let ev = CloudEvent::parse(&m.delivery.data).unwrap();
            if ev.subject.as_deref() == Some(id.to_string().as_str()) {
                break ev;
            }
            continue;
        }
        assert!(tokio::time::Instant::now() < deadline, "no event for {id}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(event.ty, "preregistration.accepted");
    assert_eq!(event.correlationid.as_deref(), Some(rid.as_str()));
    app.cleanup().await;
}

/// A worker process (the real binary, `prereg worker --only registration`)
/// serves `/healthz`, `/readyz` and `/metrics` on `PREREG_METRICS_ADDR`;
/// its own metrics count the one job it did. A worker whose Redis is
/// unreachable is live but not ready, naming Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_health_readiness_and_its_own_metrics() {
    // No registration worker in this process: the child decides.
    let app = spawn_roles(|_| {}, vec![prereg::mq::Queue::Accounts]).await;
    let port = crate::private::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = app.binary(&["worker", "--only", "registration"]);
    cmd.env("PREREG_METRICS_ADDR", format!("127.0.0.1:{port}"));
    let mut child = crate::private::ChildProc::spawn(&mut cmd);
    let get = |path: &str| {
        let url = format!("{base}{path}");
        let http = app.http.clone();
        async move {
            match http.get(url).send().await {
                Ok(r) => Some((r.status(), r.text().await.unwrap_or_default())),
                Err(_) => None,
            }
        }
    };
    wait_until(Duration::from_secs(30), || async {
        get("/healthz")
            .await
            .is_some_and(|(s, _)| s == StatusCode::OK)
    })
    .await;
    let (s, body) = get("/readyz").await.unwrap();
    assert_eq!(s, StatusCode::OK, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "ready");
    for dep in ["postgres", "redis", "rabbitmq"] {
        assert_eq!(ready["checks"][dep]["ok"], true, "{dep}: {ready}");
    }
    let p = app.create_partner(json!({})).await;
    let id = app
        .prereg(&p, "health@customer.example", "+8615900000099")
        .await;
    assert_eq!(app.decided(&p, id).await["status"], "preregistered");
    // The child's own recorder: exactly the one registration job.
    let jobs = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("prereg_jobs_total{") && l.contains("queue=\"registration\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut text = String::new();
    wait_until(Duration::from_secs(5), || async {
        get("/metrics").await.is_some_and(|(_, t)| jobs(&t) >= 1.0)
    })
    .await;
    if let Some((s, t)) = get("/metrics").await {
        assert_eq!(s, StatusCode::OK);
        text = t;
    }
    assert_eq!(jobs(&text), 1.0, "{text}");
    assert!(
        !text.contains("health@customer.example"),
        "no personal data in metrics"
    );
    child.kill();

    // Redis unreachable: live, not ready.
    let mut cfg = app.cfg.clone();
    cfg.redis_url = "redis://127.0.0.1:1".into();
    cfg.metrics_addr = "127.0.0.1:0".parse().unwrap();
    let node = app::start(
        Ctx::new(cfg).unwrap(),
        Roles {
            workers: vec![prereg::mq::Queue::Sweeps],
            health_server: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr = node.health_addr.expect("health server address");
    let probe = |path: &str| app.http.get(format!("http://{addr}{path}")).send();
    let r = probe("/readyz").await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ready: Value = r.json().await.unwrap();
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(ready["checks"]["redis"]["ok"], false, "{ready}");
    assert_eq!(ready["checks"]["postgres"]["ok"], true, "{ready}");
    let r = probe("/healthz").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    node.shutdown().await;
    app.cleanup().await;
}
