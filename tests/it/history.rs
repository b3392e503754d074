//! History records (search, filters, pagination, masking) and CSV exports.

use std::time::Duration;

use prereg_devtools::smtp_sink::SmtpSink;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_search_filters_pagination_masking_and_export() {
    let sink = SmtpSink::start().await.unwrap();
    let url = sink.url();
    let app = spawn_with(move |c| c.smtp_url = url).await;
    let upstream = app.upstream_key().await;
    let p = app
        .create_partner(json!({"account_managers": [{"name": "Wang Manager", "email": "wang@partner.example"}]}))
        .await;
    let other = app.create_partner(json!({"name": "Other"})).await;
    let (_, profile) = app.get("/v1/partner", &p.key).await;
    let manager = profile["account_managers"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let mut ids = Vec::new();
    for (i, (name, tags, remarks)) in [
        ("Alice Chen", json!(["vip"]), "met at expo"),
        ("Bob Li", json!(["smb"]), ""),
        ("Carol Wu", json!(["vip", "north"]), "migrating from rival"),
        ("Dan Zhao", json!([]), ""),
        ("Eve Sun", json!([]), "not invited"),
    ]
    .iter()
    .enumerate()
    {
        let mut body = json!({"full_name": name, "email": format!("h{i}@customer.example"), "mobile": format!("+8616000000{i:03}"), "tags": tags, "remarks": remarks});
        if i == 2 {
            body["account_manager_id"] = json!(manager);
        }
        let (s, v) = app.post("/v1/preregistrations", &p.key, body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let id: Uuid = v["id"].as_str().unwrap().parse().unwrap();
        assert_eq!(app.decided(&p, id).await["status"], "preregistered");
        ids.push(id);
    }
    // Email invitations for 0..=2, an offline link for 3; 4 is never invited.
    let (s, _) = app
        .post(
            "/v1/invitations",
            &p.key,
            json!({"preregistration_ids": &ids[0..3]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _) = app
        .post(
            &format!("/v1/preregistrations/{}/offline-link", ids[3]),
            &p.key,
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    for id in &ids[0..3] {
        app.wait_status(&p, *id, "invited", Duration::from_secs(15))
            .await;
    }
    // 0 associates (its account is "Globex Ltd"); 1 fails (overdue payment).
    app.account(
        &upstream,
        "acct-globex",
        json!({"email": "h0@customer.example", "display_name": "Globex Ltd"}),
    )
    .await;
    app.account(
        &upstream,
        "acct-bob",
        json!({"email": "h1@customer.example", "overdue_payment": true}),
    )
    .await;
    for (i, account) in [(0usize, "acct-globex"), (1, "acct-bob")] {
        let inv: Uuid =
            sqlx::query_scalar("SELECT id FROM invitations WHERE preregistration_id = $1")
                .bind(ids[i])
                .fetch_one(app.db())
                .await
                .unwrap();
        let token = app.link_token(inv).await;
        app.attempt(&upstream, json!({"token": token, "account_id": account}))
            .await;
    }
    app.wait_status(&p, ids[0], "associated", Duration::from_secs(15))
        .await;
    app.wait_status(&p, ids[1], "association_failed", Duration::from_secs(15))
        .await;
    // 2's link runs out.
    sqlx::query(
        "UPDATE preregistrations SET link_expires_at = now() - interval '1 minute' WHERE id = $1",
    )
    .bind(ids[2])
    .execute(app.db())
    .await
    .unwrap();

    let get = |q: &str| {
        let path = format!("/v1/history{q}");
        let key = p.key.clone();
        let app = &app;
        async move {
            let (s, v) = app.get(&path, &key).await;
            assert_eq!(s, StatusCode::OK, "{path}: {v}");
            v
        }
    };
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["preregistration_id"].as_str().unwrap().to_string())
            .collect()
    };
    let id_str = |i: usize| ids[i].to_string();

    // Every invited customer, newest invitation first, masked.
    let all = get("").await;
    // Newest invitation first (email jobs run concurrently, so compare times).
    let mut listed = names(&all);
    let times: Vec<String> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["invited_at"].as_str().unwrap().to_string())
        .collect();
    let parsed: Vec<chrono::DateTime<chrono::Utc>> =
        times.iter().map(|t| t.parse().unwrap()).collect();
    assert!(parsed.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    listed.sort();
    let mut want: Vec<String> = (0..4).map(id_str).collect();
    want.sort();
    assert_eq!(listed, want);
    let items = all["items"].as_array().unwrap();
    let by_id = |i: usize| {
        items
            .iter()
            .find(|r| r["preregistration_id"] == id_str(i))
            .unwrap()
            .clone()
    };
    assert_eq!(by_id(0)["state"], "associated");
    assert_eq!(by_id(0)["full_name"], "A**");
    assert_eq!(by_id(0)["email"], "h***@customer.example");
    assert_eq!(by_id(0)["mobile"], "+86*******0000");
    assert_eq!(by_id(1)["state"], "association_failed");
    assert_eq!(by_id(1)["cause"]["code"], "overdue_payment");
    assert!(by_id(1)["cause"]["suggestion"]
        .as_str()
        .unwrap()
        .starts_with("Remind the customer"));
    assert_eq!(by_id(2)["state"], "link_expired");
    assert_eq!(by_id(3)["state"], "invited");
    assert_eq!(by_id(3)["method"], "offline");
    assert!(
        !names(&all).contains(&id_str(4)),
        "never invited: not in history"
    );

    // Search: case-insensitive substrings over name, email, tag, remarks,
    // account manager and customer information.
    assert_eq!(names(&get("?q=ALICE").await), [id_str(0)]);
    assert_eq!(names(&get("?q=h3@customer").await), [id_str(3)]);
    assert_eq!(names(&get("?q=rival").await), [id_str(2)]);
    assert_eq!(names(&get("?q=wang%20man").await), [id_str(2)]);
    assert_eq!(names(&get("?q=globex").await), [id_str(0)]);
    assert_eq!(names(&get("?q=acct-glo").await), [id_str(0)]);
    assert_eq!(names(&get("?q=north").await), [id_str(2)]);
    assert!(
        names(&get("?q=100%25").await).is_empty(),
        "LIKE wildcards are literal"
    );
    // Filters.
    let mut vip = names(&get("?tag=vip").await);
    vip.sort();
    let mut want_vip = vec![id_str(0), id_str(2)];
    want_vip.sort();
    assert_eq!(vip, want_vip);
    assert_eq!(names(&get("?method=offline").await), [id_str(3)]);
    assert_eq!(
        names(&get("?method=email&status=association_failed").await),
        [id_str(1)]
    );
    assert_eq!(
        names(&get(&format!("?account_manager={manager}")).await),
        [id_str(2)]
    );
    assert_eq!(names(&get("?status=link_expired").await), [id_str(2)]);
    let (s, v) = app
        .get("/v1/history?status=bogus&method=fax&limit=0", &p.key)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["details"]["fields"].as_array().unwrap().len(), 3);
    // Cursor pagination covers everything once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = get(&format!("?limit=3{cursor}")).await;
        seen.extend(names(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, names(&all));
    // Reveal shows the data and is audited.
    let revealed = get("?q=alice&reveal=true").await;
    assert_eq!(revealed["items"][0]["email"], "h0@customer.example");
    assert_eq!(revealed["items"][0]["full_name"], "Alice Chen");
    let audits = app.audits("history.revealed").await;
    assert_eq!(audits, 1);
    // Another partner sees nothing of it.
    assert!(app.get("/v1/history", &other.key).await.1["items"]
        .as_array()
        .unwrap()
        .is_empty());

    // Export: pending → completed, a masked CSV of the same rows.
    let (s, v) = app.post("/v1/exports", &p.key, json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "pending");
    let export = v["id"].as_str().unwrap().to_string();
    let (s, _) = app.get(&format!("/v1/exports/{export}"), &other.key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    wait_until(Duration::from_secs(10), || async {
        app.get(&format!("/v1/exports/{export}"), &p.key).await.1["status"] == "completed"
    })
    .await;
    let (_, e) = app.get(&format!("/v1/exports/{export}"), &p.key).await;
    assert_eq!(e["rows"], 4);
    let resp = app
        .http
        .get(format!(
            "{}{}",
            app.addr,
            e["download_url"].as_str().unwrap()
        ))
        .bearer_auth(&p.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "content-type").starts_with("text/csv"));
    let csv = resp.text().await.unwrap();
    let lines: Vec<&str> = csv.trim_end().split("\r\n").collect();
    assert_eq!(lines.len(), 5);
    assert!(lines[0].starts_with("preregistration_id,full_name,email,mobile,state"));
    assert!(
        !csv.contains("h0@customer.example")
            && !csv.contains("Alice")
            && !csv.contains("+8616000000000")
    );
    assert!(
        csv.contains("A**")
            && csv.contains("h***@customer.example")
            && csv.contains("'+86*******0000")
    );
    assert!(csv.contains("association_failed,overdue_payment,email"));
    // After its retention the file is gone.
    sqlx::query("UPDATE exports SET expires_at = now() - interval '1 second' WHERE id = $1::uuid")
        .bind(&export)
        .execute(app.db())
        .await
        .unwrap();
    assert_eq!(
        prereg::store::history::expire_exports(app.db())
            .await
            .unwrap(),
        1
    );
    let (s, v) = app
        .get(&format!("/v1/exports/{export}/download"), &p.key)
        .await;
    assert_error(s, &v, StatusCode::GONE, "export_expired");
    app.cleanup().await;
}
