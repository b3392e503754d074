//! The pre-registration pipeline end to end.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_customer_is_preregistered_and_resubmission_is_safe() {
    let (app, p) = spawn_with_partner().await;
    let id = app
        .prereg(&p, "Zhang.San@Example.com", "+8613800000001")
        .await;
    let v = app.decided(&p, id).await;
    assert_eq!(v["status"], "preregistered", "{v}");
    assert!(v["expires_at"].is_string());
    // Masked by default; stored as given.
    assert_eq!(v["email"], "Z***@Example.com");
    let (_, full) = app
        .get(&format!("/v1/preregistrations/{id}?reveal=true"), &p.key)
        .await;
    assert_eq!(full["email"], "Zhang.San@Example.com");

    // Same customer (normalised email), same partner: already_preregistered naming the first.
    let again = app
        .prereg(&p, "  zhang.san@example.COM ", "+8613800000999")
        .await;
    let v = app.decided(&p, again).await;
    assert_eq!(v["status"], "rejected");
    assert_eq!(v["reason"]["code"], "already_preregistered");
    assert_eq!(v["existing_id"], id.to_string());
    assert_eq!(v["manual_review_eligible"], false);

    // The timeline records both changes of the first with actor and reason.
    let (s, t) = app
        .get(&format!("/v1/preregistrations/{id}/timeline"), &p.key)
        .await;
    assert_eq!(s, StatusCode::OK);
    let changes = timeline_changes(&t);
    assert_eq!(changes, ["requested", "decided"]);
    assert_eq!(t["items"][1]["to_status"], "preregistered");
    assert_eq!(t["items"][1]["actor"], "system:registration");
    app.cleanup().await;
}

/// Every eligibility rule of SPEC §1 through the real pipeline, each with the
/// account facts that trigger it, and the order between overlapping rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_eligibility_rule_through_the_pipeline() {
    let app = spawn_app().await;
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({"country": "CN"})).await;
    let other = app.create_partner(json!({"name": "Other"})).await;
    let now = chrono::Utc::now();
    let recent = (now - chrono::Duration::days(1)).to_rfc3339();
    let old = (now - chrono::Duration::days(30)).to_rfc3339();
    // (facts, expected reason: rejected if any, manual_review_eligible)
    let cases = [
        (json!({}), None, false),
        (
            json!({"associated_with_partner": true}),
            Some("associated_with_partner"),
            false,
        ),
        (json!({"site": "cn"}), Some("registered_cn_site"), false),
        (json!({"has_contract": true}), Some("has_contract"), false),
        (
            json!({"has_cash_expenditure": true}),
            Some("cash_expenditure_not_followed"),
            false,
        ),
        (
            json!({"enterprise_master_unified_accounting": true}),
            Some("enterprise_master_unified_accounting"),
            false,
        ),
        (
            json!({"registered_at": old}),
            Some("registered_over_7_days"),
            true,
        ),
        (
            json!({"has_cash_expenditure": true, "followed_by_direct_sales": true}),
            Some("registered_over_7_days"),
            true,
        ),
        (json!({"country": "SG"}), Some("country_mismatch"), true),
        (
            json!({"online_sales_team": true}),
            Some("online_sales_team"),
            true,
        ),
        // Order: a blocking rule beats a reviewable one.
        (
            json!({"has_contract": true, "online_sales_team": true, "country": "SG"}),
            Some("has_contract"),
            false,
        ),
        (
            json!({"registered_at": old, "country": "SG", "online_sales_team": true}),
            Some("registered_over_7_days"),
            true,
        ),
    ];
    for (i, (facts, reason, reviewable)) in cases.iter().enumerate() {
        let status = if reason.is_some() {
            "rejected"
        } else {
            "preregistered"
        };
        let email = format!("rule{i}@customer.example");
        let mobile = format!("+86139000000{i:02}");
        let mut f = json!({"email": email, "mobile": mobile, "site": "intl", "country": "CN", "registered_at": recent});
        for (k, v) in facts.as_object().unwrap() {
            f[k] = v.clone();
        }
        app.account(&upstream, &format!("acct-{i}"), f).await;
        let id = app.prereg(&p, &email, &mobile).await;
        let v = app.decided(&p, id).await;
        assert_eq!(v["status"], status, "case {i}: {v}");
        assert_eq!(v["reason"]["code"].as_str(), *reason, "case {i}: {v}");
        assert_eq!(v["manual_review_eligible"], *reviewable, "case {i}");
        if reason.is_some() {
            assert!(!v["reason"]["message"].as_str().unwrap().is_empty());
        }
    }
    // Another partner's active claim beats every account fact.
    let id = app
        .prereg(&other, "rule0@customer.example", "+8613900000000")
        .await;
    let v = app.decided(&other, id).await;
    assert_eq!(v["reason"]["code"], "preregistered_by_other_partner");
    // Matching by mobile alone names the same customer.
    let id = app
        .prereg(&other, "someone-else@customer.example", "+8613900000000")
        .await;
    assert_eq!(
        app.decided(&other, id).await["reason"]["code"],
        "preregistered_by_other_partner"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_101st_claim_exceeds_the_quota() {
    let app = spawn_app().await;
    assert_eq!(app.cfg.partner_quota, 100);
    let p = app.create_partner(json!({})).await;
    let ids = app
        .preregs(&p, 0..100, |i| {
            (format!("q{i}@quota.example"), format!("+861370000{i:04}"))
        })
        .await;
    app.all_granted(&p, &ids).await;
    let id = app.prereg(&p, "q100@quota.example", "+8613700000100").await;
    let v = app.decided(&p, id).await;
    assert_eq!(v["status"], "rejected");
    assert_eq!(v["reason"]["code"], "quota_exceeded");
    assert_eq!(v["manual_review_eligible"], false);
    // Deleting one frees a place.
    let (s, _) = app
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/preregistrations/{}", ids[0]),
            Some(&p.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let id = app.prereg(&p, "q101@quota.example", "+8613700000101").await;
    assert_eq!(app.decided(&p, id).await["status"], "preregistered");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_errors_are_all_named() {
    let (app, p) = spawn_with_partner().await;
    let (s, v) = app.submit(&p, json!({"full_name": "", "email": "not-an-email", "mobile": "13800000000", "tags": "x", "association_type": "partner"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["code"], "validation_failed");
    let mut fields: Vec<&str> = v["error"]["details"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        ["association_type", "email", "full_name", "mobile", "tags"]
    );
    // Not JSON at all.
    let resp = app
        .http
        .post(format!("{}/v1/preregistrations", app.addr))
        .bearer_auth(&p.key)
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_json");
    // Nothing was stored.
    let n = app.count("SELECT count(*) FROM preregistrations").await;
    assert_eq!(n, 0);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_are_isolated_and_roles_enforced() {
    let app = spawn_app().await;
    let a = app.create_partner(json!({})).await;
    let b = app.create_partner(json!({"name": "B"})).await;
    let id = app
        .claimed(&a, "iso@customer.example", "+8613600000001")
        .await;
    // No key, unknown key: 401.
    let (s, v) = app
        .request(
            reqwest::Method::GET,
            &format!("/v1/preregistrations/{id}"),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "unauthorized");
    let (s, _) = app
        .get(&format!("/v1/preregistrations/{id}"), "prereg_pk_forged")
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Another partner's resource: 404, also for its timeline, review and delete.
    for path in [
        format!("/v1/preregistrations/{id}"),
        format!("/v1/preregistrations/{id}/timeline"),
    ] {
        let (s, _) = app.get(&path, &b.key).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    let (s, _) = app.ask_review(&b, id, json!({"justification": "x"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.delete_prereg(id, &b.key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, list) = app.get("/v1/preregistrations", &b.key).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    // A partner key on operator paths: 403; the operator on partner paths: 403.
    let (s, v) = app
        .post(
            "/v1/admin/partners",
            &a.key,
            json!({"name": "x", "country": "CN"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "wrong_role");
    let (s, _) = app.get("/v1/preregistrations", OPERATOR).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Permission and contact checks answer at once, nothing queued.
    let no_cd = app
        .create_partner(json!({"customer_development": false}))
        .await;
    let (s, v) = app
        .submit(
            &no_cd,
            json!({"full_name": "A", "email": "a@b.co", "mobile": "+8613600000002"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "customer_development_disabled");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("ecosystem manager"));
    let no_contact = app.create_partner(json!({"contact_email": null})).await;
    let (s, v) = app
        .submit(
            &no_contact,
            json!({"full_name": "A", "email": "a@b.co", "mobile": "+8613600000002"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["code"], "partner_contact_missing");
    // Key rotation: the old key stops working.
    let (s, v) = app
        .post(
            &format!("/v1/admin/partners/{}/keys", a.id),
            OPERATOR,
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let new_key = v["api_key"].as_str().unwrap();
    let (s, _) = app.get("/v1/partner", new_key).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = app.get("/v1/partner", &a.key).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Keys are stored hashed only: 32-byte SHA-256 values, none equal to a key.
    let hashes: Vec<Vec<u8>> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_all(app.db())
        .await
        .unwrap();
    assert!(hashes.len() >= 4);
    for h in &hashes {
        assert_eq!(h.len(), 32);
        assert!(!h.windows(7).any(|w| w == b"prereg_"));
    }
    assert!(hashes.contains(&prereg::store::keys::hash_token(new_key)));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_first_answer() {
    let (app, p) = spawn_with_partner().await;
    let body =
        json!({"full_name": "Li Si", "email": "li@customer.example", "mobile": "+8613500000001"});
    let send = |key: &'static str, body: serde_json::Value| {
        app.http
            .post(format!("{}/v1/preregistrations", app.addr))
            .bearer_auth(&p.key)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let first = send("k-1", body.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let loc1 = first.headers()["location"].to_str().unwrap().to_string();
    let v1: serde_json::Value = first.json().await.unwrap();
    let second = send("k-1", body.clone()).await.unwrap();
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    assert_eq!(second.headers()["location"].to_str().unwrap(), loc1);
    let v2: serde_json::Value = second.json().await.unwrap();
    assert_eq!(v1, v2);
    // Same key, other request: refused.
    let third = send(
        "k-1",
        json!({"full_name": "Other", "email": "o@customer.example", "mobile": "+8613500000002"}),
    )
    .await
    .unwrap();
    assert_eq!(third.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Only one pre-registration exists.
    let n = app.count("SELECT count(*) FROM preregistrations").await;
    assert_eq!(n, 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_answers_503_and_leaves_nothing() {
    let app = spawn_with(|c| c.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into()).await;
    let p = app.create_partner(json!({})).await;
    let resp = app
        .http
        .post(format!("{}/v1/preregistrations", app.addr))
        .bearer_auth(&p.key)
        .header("Idempotency-Key", "down-1")
        .json(&json!({"full_name": "Wang Wu", "email": "wang@customer.example", "mobile": "+8613400000001"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "service_unavailable");
    let n = app.count("SELECT count(*) FROM preregistrations").await;
    assert_eq!(n, 0, "no half-done pre-registration");
    let n = app.count("SELECT count(*) FROM idempotency_keys").await;
    assert_eq!(n, 0, "the key is free for a retry");
    let (s, v) = app
        .request(reqwest::Method::GET, "/readyz", None, None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["checks"]["rabbitmq"]["ok"], false);
    assert_eq!(v["checks"]["postgres"]["ok"], true);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let (s, v) = app
        .request(reqwest::Method::GET, "/healthz", None, None)
        .await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, v) = app
        .request(reqwest::Method::GET, "/readyz", None, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for check in ["postgres", "redis", "rabbitmq"] {
        assert_eq!(v["checks"][check]["ok"], true, "{check}");
    }
    let (s, v) = app
        .request(reqwest::Method::GET, "/openapi.json", None, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["openapi"].as_str().unwrap().starts_with("3."));
    // Prometheus metrics: jobs, HTTP, queues (the monitor reports at start).
    let p = app.create_partner(json!({})).await;
    let id = app
        .prereg(&p, "metrics@customer.example", "+8613900009999")
        .await;
    app.decided(&p, id).await;
    let text = app.metrics_text().await;
    for name in [
        "prereg_jobs_total{queue=\"registration\",outcome=\"done\"}",
        "prereg_job_duration_seconds_bucket",
        "prereg_http_requests_total",
        "prereg_queue_depth{queue=\"registration\"}",
        "prereg_dead_letters{queue=\"email\"}",
        "prereg_queue_consumers{queue=\"registration\"}",
        "prereg_queue_oldest_message_age_seconds{queue=\"registration\"}",
        "prereg_reviews_overdue",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    app.cleanup().await;
}
