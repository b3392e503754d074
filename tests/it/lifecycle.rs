//! Deletion, manual review, account facts ordering.

use chrono::Utc;
use prereg::{
    domain::{workdays::Calendar, AccountFacts},
    workers::{self, Outcome},
};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::Row;

use crate::common::*;

/// A partner with one customer rejected as `registered_over_7_days`.
async fn reviewable(app: &TestApp, p: &Partner, n: u32) -> uuid::Uuid {
    let upstream = app.upstream_key().await;
    let email = format!("old{n}@customer.example");
    let mobile = format!("+8613100000{n:03}");
    let registered = (Utc::now() - chrono::Duration::days(40)).to_rfc3339();
    app.account(&upstream, &format!("old-{n}"), json!({"email": email, "mobile": mobile, "registered_at": registered, "site": "intl", "country": "CN"}))
        .await;
    let id = app.prereg(p, &email, &mobile).await;
    let v = app.decided(p, id).await;
    assert_eq!(v["reason"]["code"], "registered_over_7_days");
    assert_eq!(v["manual_review_eligible"], true);
    id
}

async fn request_review(app: &TestApp, p: &Partner, id: uuid::Uuid) -> serde_json::Value {
    let (s, v) = app
        .post(&format!("/v1/preregistrations/{id}/review"), &p.key, json!({"justification": "Big migration planned", "expected_new_spend": 120000.0, "contact_record": "Met on 2026-11-18"}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    wait_until(std::time::Duration::from_secs(10), || async {
        app.get(&format!("/v1/preregistrations/{id}"), &p.key)
            .await
            .1["status"]
            == "under_review"
    })
    .await;
    app.get(&format!("/v1/preregistrations/{id}"), &p.key)
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_review_request_and_decisions() {
    let (app, p) = spawn_with_partner().await;
    let id = reviewable(&app, &p, 1).await;
    let v = request_review(&app, &p, id).await;
    assert_eq!(v["review"]["state"], "open");
    // Due in 2 working days by the 2026 calendar, from when the review opened.
    let row = sqlx::query("SELECT opened_at, due_at FROM reviews WHERE preregistration_id = $1")
        .bind(id)
        .fetch_one(app.db())
        .await
        .unwrap();
    let opened: chrono::DateTime<Utc> = row.get("opened_at");
    let due: chrono::DateTime<Utc> = row.get("due_at");
    assert_eq!(
        due,
        Calendar::cn_2026()
            .add_working_days(opened, 2, chrono_tz::Asia::Shanghai)
            .at
    );
    assert_eq!(v["review"]["due_at"], json!(due));
    // Counts toward the quota; cannot be deleted; a second request is refused.
    let (s, e) = app.delete_prereg(id, &p.key).await;
    assert_error(s, &e, StatusCode::CONFLICT, "cannot_delete");
    let (s, _) = app
        .ask_review(&p, id, json!({"justification": "again"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // The operator sees it and approves.
    let (s, list) = app.get("/v1/admin/reviews?state=open", OPERATOR).await;
    assert_eq!(s, StatusCode::OK);
    let review_id = list["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(list["items"][0]["preregistration_id"], id.to_string());
    let (s, r) = app
        .decide_review(&review_id, json!({"decision": "approve", "note": "ok"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["state"], "approved");
    let v = app
        .get(&format!("/v1/preregistrations/{id}"), &p.key)
        .await
        .1;
    assert_eq!(v["status"], "preregistered");
    let expires: chrono::DateTime<Utc> = serde_json::from_value(v["expires_at"].clone()).unwrap();
    let decided: chrono::DateTime<Utc> = serde_json::from_value(r["decided_at"].clone()).unwrap();
    assert!(
        (expires - decided - chrono::Duration::days(15))
            .num_seconds()
            .abs()
            <= 1
    );
    let (s, _) = app
        .decide_review(&review_id, json!({"decision": "reject", "note": "x"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // Rejection path, with the reviewer's note.
    let id2 = reviewable(&app, &p, 2).await;
    request_review(&app, &p, id2).await;
    let rid2: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM reviews WHERE preregistration_id = $1")
            .bind(id2)
            .fetch_one(app.db())
            .await
            .unwrap();
    let (s, e) = app.decide_review(rid2, json!({"decision": "reject"})).await;
    assert_eq!(
        s,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a rejection needs a note: {e}"
    );
    let (s, _) = app
        .decide_review(rid2, json!({"decision": "reject", "note": "Spend too low"}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let v = app
        .get(&format!("/v1/preregistrations/{id2}"), &p.key)
        .await
        .1;
    assert_eq!(v["status"], "review_rejected");
    assert_eq!(v["review"]["state"], "rejected");
    assert_eq!(v["review"]["note"], "Spend too low");
    // The timeline tells the story.
    let t = app
        .get(&format!("/v1/preregistrations/{id2}/timeline"), &p.key)
        .await
        .1;
    let changes = timeline_changes(&t);
    assert_eq!(
        changes,
        ["requested", "decided", "review_requested", "review_decided"]
    );
    assert!(t["items"][3]["actor"]
        .as_str()
        .unwrap()
        .starts_with("operator:"));
    // A claim that is not a reviewable rejection cannot be reviewed.
    let fresh = app
        .prereg(&p, "fresh@customer.example", "+8613100000999")
        .await;
    app.decided(&p, fresh).await;
    let (s, e) = app
        .ask_review(&p, fresh, json!({"justification": "x"}))
        .await;
    assert_error(s, &e, StatusCode::CONFLICT, "not_reviewable");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_rules_one_and_batch() {
    let (app, p) = spawn_with_partner().await;
    let other = app.create_partner(json!({"name": "Other"})).await;
    let claimed = app
        .claimed(&p, "del1@customer.example", "+8613000000001")
        .await;
    let rejected = app
        .prereg(&p, "del1@customer.example", "+8613000000001")
        .await; // already_preregistered
    app.decided(&p, rejected).await;
    let under_review = reviewable(&app, &p, 3).await;
    request_review(&app, &p, under_review).await;
    let others = app
        .prereg(&other, "del2@customer.example", "+8613000000002")
        .await;
    app.decided(&other, others).await;
    let (s, v) = app
        .post(
            "/v1/preregistrations/batch-delete",
            &p.key,
            json!({"ids": [claimed, under_review, others, rejected]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["status"], "deleted");
    assert_eq!(r[1]["error"]["code"], "cannot_delete");
    assert_eq!(r[2]["error"]["code"], "not_found");
    assert_eq!(r[3]["status"], "deleted");
    // The claim ended at once: another partner may claim the customer now.
    let id = app
        .claimed(&other, "DEL1@customer.example", "+8613000000001")
        .await;
    // Deleting again is harmless; bad batches are named.
    let (s, v) = app.delete_prereg(claimed, &p.key).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("deleted")));
    let (s, _) = app
        .post(
            "/v1/preregistrations/batch-delete",
            &p.key,
            json!({"ids": []}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = app
        .post(
            "/v1/preregistrations/batch-delete",
            &p.key,
            json!({"ids": ["nope"]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let t = app
        .get(&format!("/v1/preregistrations/{claimed}/timeline"), &p.key)
        .await
        .1;
    assert_eq!(
        t["items"].as_array().unwrap().last().unwrap()["change"],
        "deleted"
    );
    // Associated claims cannot be deleted either.
    sqlx::query("UPDATE preregistrations SET status = 'associated' WHERE id = $1")
        .bind(id)
        .execute(app.db())
        .await
        .unwrap();
    let (s, v) = app.delete_prereg(id, &other.key).await;
    assert_error(s, &v, StatusCode::CONFLICT, "cannot_delete");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_account_facts_never_overwrite_newer() {
    let app = spawn_app().await;
    let t1 = Utc::now() - chrono::Duration::hours(2);
    let t2 = Utc::now() - chrono::Duration::hours(1);
    let newer = AccountFacts {
        account_id: "acc-1".into(),
        has_contract: true,
        updated_at: Some(t2),
        ..Default::default()
    };
    let older = AccountFacts {
        account_id: "acc-1".into(),
        has_contract: false,
        updated_at: Some(t1),
        ..Default::default()
    };
    assert_eq!(
        workers::accounts::handle(&app.ctx, newer.clone())
            .await
            .unwrap(),
        Outcome::Done
    );
    assert_eq!(
        workers::accounts::handle(&app.ctx, older).await.unwrap(),
        Outcome::Skipped("older_than_stored")
    );
    let stored = prereg::store::accounts::get(app.db(), "acc-1")
        .await
        .unwrap()
        .unwrap();
    assert!(stored.has_contract);
    assert_eq!(stored.updated_at, Some(t2));
    let newest = AccountFacts {
        updated_at: Some(Utc::now()),
        has_contract: false,
        ..newer
    };
    assert_eq!(
        workers::accounts::handle(&app.ctx, newest).await.unwrap(),
        Outcome::Done
    );
    assert!(
        !prereg::store::accounts::get(app.db(), "acc-1")
            .await
            .unwrap()
            .unwrap()
            .has_contract
    );
    // Facts without a time are refused (they could not be ordered).
    let undated = AccountFacts {
        account_id: "acc-2".into(),
        ..Default::default()
    };
    assert!(matches!(
        workers::accounts::handle(&app.ctx, undated).await,
        Err(workers::JobError::Fatal { .. })
    ));
    app.cleanup().await;
}
