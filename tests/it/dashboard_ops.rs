//! The operators' dashboard as a tool (issue 12 item 8) and its sessions
//! (issue 10 item 3, SPEC §8): server-side sessions, sign-out, expiry,
//! CSRF, sign-in limits; reviews decided, charts and queues shown, in
//! headless Chromium with screenshots.

use std::time::Duration;

use chrono::Utc;

use fantoccini::Locator;
use prereg::mq::{CloudEvent, Queue};
use reqwest::{redirect::Policy, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::common::*;

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// Signs in over HTTP; returns the session cookie's `name=value` and the whole Set-Cookie.
async fn sign_in(app: &TestApp, key: &str) -> (StatusCode, String, String) {
    let resp = no_redirects()
        .post(format!("{}/admin/login", app.addr))
        .form(&[("key", key), ("tz", "Europe/Paris")])
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let set = header_or_empty(&resp, "set-cookie");
    let pair = set.split(';').next().unwrap_or_default().to_string();
    (status, pair, set)
}

async fn get_admin(app: &TestApp, cookie: &str) -> (StatusCode, String) {
    let resp = no_redirects()
        .get(format!("{}/admin", app.addr))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

fn csrf_of(html: &str) -> String {
    let at =
        html.find(r#"name="csrf" value=""#).expect("a CSRF field") + r#"name="csrf" value=""#.len();
    html[at..at + html[at..].find('"').unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sessions_are_server_side_expire_and_resist_forgery() {
    let app = spawn_with(|c| {
        c.dashboard_idle = Duration::from_secs(2);
        c.dashboard_lifetime = Duration::from_secs(4);
    })
    .await;
    // The cookie carries a random session id, never the key.
    let (s, cookie, set) = sign_in(&app, OPERATOR).await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{set}");
    assert!(cookie.starts_with("prereg_session="), "{set}");
    assert!(!set.contains(OPERATOR), "{set}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/admin"] {
        assert!(set.contains(attr), "{attr} missing: {set}");
    }
    assert!(!set.contains("Secure"), "http public URL: {set}");
    let id = cookie.trim_start_matches("prereg_session=");
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id_hash FROM dashboard_sessions")
        .fetch_all(app.db())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], id.as_bytes(), "only a hash of the id is stored");
    // The operator's browser time zone is used for times.
    let (s, html) = get_admin(&app, &cookie).await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("times in Europe/Paris"), "{html}");
    // A forged form (wrong CSRF token) changes nothing.
    let csrf = csrf_of(&html);
    let forged = no_redirects()
        .post(format!("{}/admin/logout", app.addr))
        .header("cookie", &cookie)
        .form(&[("csrf", format!("{}x", &csrf[..csrf.len() - 1]))])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert_eq!(get_admin(&app, &cookie).await.0, StatusCode::OK);
    // A made-up session id is no session.
    assert_eq!(
        get_admin(&app, "prereg_session=made-up").await.0,
        StatusCode::SEE_OTHER
    );

    // Idle expiry: unused for longer than PREREG_DASHBOARD_IDLE.
    let started = tokio::time::Instant::now();
    wait_until(Duration::from_secs(10), || async {
        get_admin(&app, &cookie).await.0 == StatusCode::SEE_OTHER
    })
    .await;
    assert!(started.elapsed() >= Duration::from_secs(1));

    // Absolute expiry: ends after PREREG_DASHBOARD_LIFETIME however busy.
    let (_, busy, _) = sign_in(&app, OPERATOR).await;
    let started = tokio::time::Instant::now();
    loop {
        let (s, _) = get_admin(&app, &busy).await;
        if s == StatusCode::SEE_OTHER {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "ended before its lifetime: {:?}",
        started.elapsed()
    );

    // Sign-out ends the session server-side: the old cookie no longer works.
    let (_, cookie, _) = sign_in(&app, OPERATOR).await;
    let (_, html) = get_admin(&app, &cookie).await;
    let out = no_redirects()
        .post(format!("{}/admin/logout", app.addr))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf_of(&html))])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(header(&out, "set-cookie").contains("Max-Age=0"));
    assert_eq!(get_admin(&app, &cookie).await.0, StatusCode::SEE_OTHER);

    // Sign-in is rate-limited per address: the 6th failure within a minute is refused.
    for _ in 0..5 {
        assert_eq!(sign_in(&app, "wrong-key").await.0, StatusCode::UNAUTHORIZED);
    }
    let resp = no_redirects()
        .post(format!("{}/admin/login", app.addr))
        .form(&[("key", OPERATOR)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookie_is_secure_behind_https() {
    let app = spawn_with(|c| c.public_url = "https://partners.example".into()).await;
    let (s, _, set) = sign_in(&app, OPERATOR).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert!(set.contains("; Secure"), "{set}");
    app.cleanup().await;
}

/// A customer rejected as `registered_over_7_days`, put under review.
async fn open_review(app: &TestApp, upstream: &str, p: &Partner) -> (Uuid, Uuid) {
    let (email, mobile) = ("review1@customer.example", "+8613200000001");
    let id = app
        .review_requested(upstream, p, "rev-1", email, mobile)
        .await;
    let q = "SELECT id FROM reviews WHERE preregistration_id = $1 AND state = 'open'";
    wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, Uuid>(q)
            .bind(id)
            .fetch_optional(app.db())
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let review: Uuid = sqlx::query_scalar(q)
        .bind(id)
        .fetch_one(app.db())
        .await
        .unwrap();
    (id, review)
}

/// Puts `ev` into `q`'s dead-letter queue as the worker runtime does after
/// the last retry (same exchange, headers and message id).
async fn dead_letter_directly(app: &TestApp, q: Queue, ev: &CloudEvent) {
    use lapin::types::{AMQPValue, FieldTable};
    use prereg::mq::dead_letters::{H_ERROR, H_FAILED_AT, H_QUEUE, H_REASON, H_RETRIES};
    let s = |v: &str| AMQPValue::LongString(v.into());
    let mut h = FieldTable::default();
    h.insert(H_REASON.into(), s("retries_exhausted"));
    h.insert(H_ERROR.into(), s("database unavailable"));
    h.insert(H_QUEUE.into(), s(q.short()));
    h.insert(H_FAILED_AT.into(), s(&Utc::now().to_rfc3339()));
    h.insert(H_RETRIES.into(), AMQPValue::LongInt(5));
    h.insert(prereg::mq::dead_letters::H_ROUTING_KEY.into(), s(&ev.ty));
    let b = &app.ctx.broker;
    b.publish_raw(
        &b.names.dlx(),
        q.short(),
        &ev.to_bytes().unwrap(),
        Some(&ev.id),
        h,
        None,
    )
    .await
    .unwrap();
}

async fn dead_letter_ids(app: &TestApp, q: Queue) -> Vec<String> {
    prereg::workers::runtime::list_dead_letters(&app.ctx, q, 50)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|d| d.message_id)
        .collect()
}

/// Waits until the page (after a form's redirect) shows `flash`.
async fn wait_flash(
    browser: &fantoccini::Client,
    flash: &str,
) -> Result<(), fantoccini::error::CmdError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = match browser.find(Locator::Id("flash")).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if seen == flash {
            return Ok(());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "flash {flash:?} never shown (last: {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the `button` of the dead letter in `row`.
async fn click_in_row(
    browser: &fantoccini::Client,
    row: &str,
    button: &str,
) -> Result<(), fantoccini::error::CmdError> {
    browser
        .find(Locator::Css(&format!("{row} button.{button}")))
        .await?
        .click()
        .await
}

fn screenshot_dir() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_watch_queues_and_decide_reviews_in_chromium() {
    if !crate::dashboard::browser_available("operators_watch_queues_and_decide_reviews_in_chromium")
    {
        return;
    }
    let app = spawn_app().await;
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({"name": "Acme Cloud"})).await;
    let (claim, review) = open_review(&app, &upstream, &p).await;
    // A claim that ends within 48 hours, and some work for the charts.
    let soon = app
        .prereg(&p, "soon@customer.example", "+8613200000002")
        .await;
    app.decided(&p, soon).await;
    app.set_expiry(soon, "now() + interval '20 hours'").await;
    let bad = CloudEvent::new(
        "preregistration.requested",
        json!({"id": "not-a-uuid", "email": "leak@customer.example"}),
    );
    app.ctx.broker.publish_command(&bad).await.unwrap();
    // A valid upstream pre-registration that ran out of retries while a
    // dependency was down: replaying it now must get it processed.
    let replayable = Uuid::now_v7();
    let good = CloudEvent::new(
        "preregistration.requested",
        json!({"id": replayable, "partner_id": p.id, "full_name": "Li Si",
               "email": "replay@customer.example", "mobile": "+8613200000003"}),
    );
    dead_letter_directly(&app, Queue::Registration, &good).await;
    wait_until(Duration::from_secs(10), || async {
        dead_letter_ids(&app, Queue::Registration).await.len() == 2
    })
    .await;
    // The processed chart draws a line once this process's metrics have
    // two points of registration work (a sample every 5 s).
    wait_until(Duration::from_secs(30), || async {
        let h = prereg::jobstats::history();
        let points = prereg::jobstats::points(&h, prereg::jobstats::RATE_WINDOW, |a, b| {
            Some(prereg::jobstats::rates(a, b, "registration").0)
        });
        points.len() > 1 && points.iter().any(|p| p.1 > 0.0)
    })
    .await;

    let driver = crate::dashboard::chromedriver().await;
    let browser = crate::dashboard::headless(&driver, &["--window-size=1500,2600"]).await;
    let shots = screenshot_dir();
    let run = async {
        browser.goto(&format!("{}/admin", app.addr)).await?;
        crate::dashboard::sign_in(&browser, OPERATOR, "queues").await?;
        // The cookie is a session id, HttpOnly and SameSite=Strict.
        let c = browser.get_named_cookie("prereg_session").await?;
        assert_ne!(c.value(), OPERATOR);
        assert_eq!(c.http_only(), Some(true));
        assert_eq!(format!("{:?}", c.same_site()), "Some(Strict)");
        std::fs::write(shots.join("dashboard.png"), browser.screenshot().await?).unwrap();

        let queues = browser.find(Locator::Id("queues")).await?.text().await?;
        for col in [
            "ready",
            "in flight",
            "consumers",
            "dead letters",
            "oldest message",
            "publish",
            "deliver",
            "ack",
        ] {
            assert!(queues.contains(col), "{col}: {queues}");
        }
        for q in Queue::ALL {
            assert!(queues.contains(q.short()), "{queues}");
        }
        browser.find(Locator::Id("retries")).await?;
        // Charts drawn on the server: the processed chart has a line for registration.
        let chart = browser.find(Locator::Id("chart-processed")).await?;
        assert!(chart.html(false).await?.contains("polyline"));
        browser.find(Locator::Id("chart-latency")).await?;
        // Claims expiring within 48 h, masked.
        let claims = browser.find(Locator::Id("claims")).await?.text().await?;
        assert!(claims.contains(&soon.to_string()), "{claims}");
        assert!(!claims.contains("soon@customer.example"), "{claims}");
        // Dead letters per message, body masked.
        let dead = browser
            .find(Locator::Css("table.dead"))
            .await?
            .html(false)
            .await?;
        assert!(dead.contains("invalid_payload"), "{dead}");
        assert!(!dead.contains("leak@customer.example"), "{dead}");
        assert!(!dead.contains("replay@customer.example"), "{dead}");
        // One dead letter opened: every header, the reason, the masked body.
        let row = |id: &str| format!("tr.dead-letter[data-message-id=\"{id}\"]");
        browser
            .find(Locator::Css(&format!("{} summary", row(&good.id))))
            .await?
            .click()
            .await?;
        let opened = browser
            .find(Locator::Css(&format!("{} details", row(&good.id))))
            .await?
            .text()
            .await?;
        for shown in [
            "x-prereg-reason",
            "retries_exhausted",
            "x-prereg-failed-at",
            "r***@customer.example",
        ] {
            assert!(opened.contains(shown), "{shown}: {opened}");
        }
        std::fs::write(
            shots.join("dashboard-dead-letter.png"),
            browser
                .find(Locator::Id("dlq"))
                .await?
                .screenshot()
                .await
                .unwrap_or_default(),
        )
        .unwrap();
        // Replay that one (after a confirmation); the other stays.
        click_in_row(&browser, &row(&good.id), "replay-one").await?;
        assert_eq!(
            browser.get_alert_text().await?,
            "Replay this message to registration?"
        );
        browser.accept_alert().await?;
        wait_flash(&browser, "Replayed one message of registration.").await?;
        assert!(browser
            .find_all(Locator::Css(&row(&good.id)))
            .await?
            .is_empty());
        browser.find(Locator::Css(&row(&bad.id))).await?;
        // Discard the poison message: dismissing the confirmation keeps it.
        click_in_row(&browser, &row(&bad.id), "discard-one").await?;
        browser.dismiss_alert().await?;
        browser.find(Locator::Css(&row(&bad.id))).await?;
        click_in_row(&browser, &row(&bad.id), "discard-one").await?;
        browser.accept_alert().await?;
        wait_flash(&browser, "Discarded one message of registration.").await?;
        browser.find(Locator::Id("no-dead")).await?;
        // The open review, approved with a confirmation.
        let row = browser
            .find(Locator::Id(&format!("review-{review}")))
            .await?
            .text()
            .await?;
        assert!(row.contains("Acme Cloud"), "{row}");
        browser
            .find(Locator::Id(&format!("approve-{review}")))
            .await?
            .click()
            .await?;
        browser.accept_alert().await?;
        wait_flash(&browser, "Review approved.").await?;
        browser.find(Locator::Id("no-reviews")).await?;
        std::fs::write(
            shots.join("dashboard-after-approve.png"),
            browser.screenshot().await?,
        )
        .unwrap();
        // Sign out: back to the sign-in page, and the dashboard is closed.
        browser.find(Locator::Id("sign-out")).await?.click().await?;
        browser
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id("sign-in"))
            .await?;
        crate::dashboard::expect_sign_in(&browser, &app.addr).await?;
        Ok::<_, fantoccini::error::CmdError>(())
    };
    let result = run.await;
    let _ = browser.close().await;
    result.expect("browser steps");
    let (s, v) = app
        .get(&format!("/v1/preregistrations/{claim}"), &p.key)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "preregistered", "{v}");
    let (state, decided_by): (String, String) =
        sqlx::query_as("SELECT state, decided_by FROM reviews WHERE id = $1")
            .bind(review)
            .fetch_one(app.db())
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), decided_by.as_str()),
        ("approved", "operator:bootstrap")
    );
    // The replayed dead letter left the queue and was processed; the
    // discarded one is gone for good; both actions are audited.
    assert!(dead_letter_ids(&app, Queue::Registration).await.is_empty());
    wait_until(Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM preregistrations WHERE id = $1")
            .bind(replayable)
            .fetch_optional(app.db())
            .await
            .unwrap()
            .is_some_and(|s| s == "preregistered")
    })
    .await;
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE action LIKE 'dead_letters.%' ORDER BY action",
    )
    .fetch_all(app.db())
    .await
    .unwrap();
    assert_eq!(actions, ["dead_letters.discarded", "dead_letters.replayed"]);
    app.cleanup().await;
}
