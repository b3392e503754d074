//! SPEC §8: offline codes are stored as a keyed hash, guessing is locked
//! (per invitation and per upstream key, 429 until a cool-down), and a
//! stranger's failed attempt leaves the claim as it was.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::common::*;

async fn attempt(app: &TestApp, key: &str, body: Value) -> (StatusCode, Value) {
    app.post("/v1/associations", key, body).await
}

async fn outcome(app: &TestApp, key: &str, body: Value) -> Value {
    let (s, v) = attempt(app, key, body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let path = format!("/v1/associations/{}", v["id"].as_str().unwrap());
    wait_until(Duration::from_secs(15), || async {
        app.get(&path, key).await.1["status"] != "queued"
    })
    .await;
    app.get(&path, key).await.1
}

async fn claim_state(app: &TestApp, id: Uuid) -> (Option<String>, String) {
    sqlx::query_as("SELECT account_id, search_text FROM preregistrations WHERE id = $1")
        .bind(id)
        .fetch_one(app.db())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_code_guessing_is_locked_and_strangers_leave_no_trace() {
    let app = spawn_with(|c| {
        c.attempt_limit = 2;
        c.attempt_cooldown = Duration::from_secs(3);
        c.attempt_key_limit = 1_000;
    })
    .await;
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({})).await;
    let id = app
        .claimed(&p, "real.customer@customer.example", "+8613800000123")
        .await;
    let link = app.offline_link(&p, id).await;
    let code = link["code"].as_str().unwrap().to_string();

    // Keyed hash: not the plain SHA-256 of the code.
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT code_hash FROM invitations WHERE preregistration_id = $1")
            .bind(id)
            .fetch_one(app.db())
            .await
            .unwrap();
    assert_ne!(stored, Sha256::digest(code.as_bytes()).to_vec());

    let before = claim_state(&app, id).await;
    app.account(
        &upstream,
        "acct-stranger",
        json!({"email": "someone.else@customer.example", "display_name": "Stranger Things"}),
    )
    .await;
    for _ in 0..2 {
        let a = outcome(
            &app,
            &upstream,
            json!({"code": code, "account_id": "acct-stranger"}),
        )
        .await;
        assert_eq!(a["status"], "failed", "{a}");
        assert_eq!(a["cause"]["code"], "email_mismatch", "{a}");
    }
    // The stranger is not attached, and the search text did not grow.
    assert_eq!(claim_state(&app, id).await, before);

    // Locked: the third attempt on this invitation is refused.
    let (s, v) = attempt(
        &app,
        &upstream,
        json!({"code": code, "account_id": "acct-stranger"}),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "too_many_attempts");

    // After the cool-down the real customer gets in.
    app.account(
        &upstream,
        "acct-real",
        json!({"email": "real.customer@customer.example", "display_name": "Real Customer"}),
    )
    .await;
    wait_until(Duration::from_secs(10), || async {
        // Probe without submitting: the lock lifts when the failures age out.
        let n = app.count("SELECT count(*) FROM association_attempts WHERE status = 'failed' AND decided_at > now() - interval '3 seconds'").await;
        n < 2
    })
    .await;
    let a = outcome(
        &app,
        &upstream,
        json!({"code": code.to_lowercase(), "account_id": "acct-real"}),
    )
    .await;
    assert_eq!(a["status"], "succeeded", "{a}");
    let (account, search) = claim_state(&app, id).await;
    assert_eq!(account.as_deref(), Some("acct-real"));
    assert!(search.contains("acct-real") && !search.contains("stranger"));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_key_is_refused_after_too_many_unsuccessful_attempts() {
    let app = spawn_with(|c| {
        c.attempt_key_limit = 3;
        c.attempt_window = Duration::from_secs(60);
    })
    .await;
    let guesser = app.upstream_key().await;
    let honest = app.upstream_key().await;
    for n in 0..3 {
        let (s, v) = attempt(
            &app,
            &guesser,
            json!({"code": format!("GUESS{n:05}"), "account_id": "acct-x"}),
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    }
    let resp = app
        .http
        .post(format!("{}/v1/associations", app.addr))
        .bearer_auth(&guesser)
        .json(&json!({"code": "GUESS99999", "account_id": "acct-x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    // Another key is not affected.
    let (s, v) = attempt(
        &app,
        &honest,
        json!({"code": "GUESS00000", "account_id": "acct-x"}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    app.cleanup().await;
}
