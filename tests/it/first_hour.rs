//! The first hour (issue 12): links decided at once, the invitation link page.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_link_is_link_not_found_at_once_without_account_facts() {
    // Long retry delays: an attempt that waits for the account's facts would
    // take minutes (and end `system_busy`); the link check must not wait.
    let app = spawn_with(|c| {
        c.retry_delays = vec![Duration::from_secs(120); 3];
    })
    .await;
    let upstream = app.upstream_key().await;
    for body in [
        json!({"token": "no-such-token", "account_id": "acct-never-seen"}),
        json!({"code": "NOSUCHCODE", "account_id": "acct-never-seen-2"}),
    ] {
        let a = app
            .associate_within(&upstream, body, Duration::from_secs(10))
            .await;
        assert_eq!(a["status"], "failed", "{a}");
        assert_eq!(a["cause"]["code"], "link_not_found", "{a}");
        assert_eq!(a["cause"]["message"], "The invitation link does not exist.");
    }
    app.cleanup().await;
}

/// A claimed pre-registration and a fresh offline link: (claim id, token).
async fn offline_link(app: &TestApp, p: &Partner, n: u32) -> (uuid::Uuid, String) {
    let id = app
        .claimed(
            p,
            &format!("link{n}@customer.example"),
            &format!("+8613900000{n:03}"),
        )
        .await;
    let token = new_offline_token(app, p, id).await;
    (id, token)
}

async fn new_offline_token(app: &TestApp, p: &Partner, id: uuid::Uuid) -> String {
    let v = app.offline_link(p, id).await;
    let url = v["url"].as_str().unwrap();
    assert!(url.starts_with("https://partners.example/i/"), "{url}");
    url.rsplit('/').next().unwrap().to_string()
}

/// Opens `/i/{token}` as a browser would (without following redirects).
async fn open_link(app: &TestApp, token: &str, lang: Option<&str>) -> (StatusCode, String, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut req = client.get(format!("{}/i/{token}", app.addr));
    if let Some(l) = lang {
        req = req.header("accept-language", l);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let location = header_or_empty(&resp, "location");
    assert_eq!(
        resp.headers().get("referrer-policy").unwrap(),
        "no-referrer",
        "the token must not leak to the next site"
    );
    (status, location, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitation_link_redirects_while_valid_and_explains_otherwise() {
    let app = spawn_with(|c| {
        c.public_url = "https://partners.example".into();
        c.signup_url = "https://signup.example/register?src=invite".into();
    })
    .await;
    let upstream = app.upstream_key().await;
    let en = app.create_partner(json!({"locale": "en"})).await;
    let zh = app
        .create_partner(json!({"name": "Zhong Partner", "locale": "zh-CN"}))
        .await;

    // Valid: to the registration page, carrying the token.
    let (id, token) = offline_link(&app, &en, 1).await;
    let (s, location, _) = open_link(&app, &token, None).await;
    assert_eq!(s, StatusCode::FOUND);
    assert_eq!(
        location,
        format!("https://signup.example/register?src=invite&token={token}")
    );

    // Superseded by a newer link: the cause `link_expired`, in English.
    let newer = new_offline_token(&app, &en, id).await;
    let (s, _, html) = open_link(&app, &token, None).await;
    assert_eq!(s, StatusCode::GONE);
    assert!(html.contains(r#"lang="en""#), "{html}");
    assert!(html.contains("The invitation link has expired."), "{html}");
    assert!(html.contains("Send the invitation email again."), "{html}");

    // Used: after a successful association.
    app.account(
        &upstream,
        "acct-link-1",
        json!({"email": "link1@customer.example"}),
    )
    .await;
    app.attempt(
        &upstream,
        json!({"token": newer, "account_id": "acct-link-1"}),
    )
    .await;
    wait_until(Duration::from_secs(10), || async {
        open_link(&app, &newer, None).await.0 == StatusCode::GONE
    })
    .await;
    let (_, _, html) = open_link(&app, &newer, None).await;
    assert!(
        html.contains("The invitation link has been used."),
        "{html}"
    );

    // Expired with its claim, for a Chinese-speaking partner's invitation.
    let (zid, ztoken) = offline_link(&app, &zh, 2).await;
    assert_eq!(open_link(&app, &ztoken, None).await.0, StatusCode::FOUND);
    app.set_expiry(zid, "now() - interval '1 second'").await;
    let (s, _, html) = open_link(&app, &ztoken, Some("en-GB")).await;
    assert_eq!(s, StatusCode::GONE);
    assert!(html.contains(r#"lang="zh-CN""#), "{html}");
    assert!(html.contains("邀请链接已过期。"), "{html}");

    // Unknown: the browser's language decides.
    let (s, _, html) = open_link(&app, "no-such-token", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        html.contains("The invitation link does not exist."),
        "{html}"
    );
    let (_, _, html) = open_link(&app, "no-such-token", Some("zh-CN,zh;q=0.9")).await;
    assert!(html.contains("邀请链接不存在。"), "{html}");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_ids_and_status_filter_have_one_name_and_old_spellings_still_work() {
    let app = spawn_with(|c| c.public_url = "https://partners.example".into()).await;
    let p = app.create_partner(json!({})).await;
    // History: the record's field is `status`, like the filter (and `state`
    // stays as the deprecated spelling).
    let (invited, _) = offline_link(&app, &p, 7).await;
    let (s, v) = app.get("/v1/history?status=invited", &p.key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["preregistration_id"], invited.to_string());
    assert_eq!(items[0]["status"], "invited");
    assert_eq!(items[0]["state"], "invited");
    // Batch delete: `preregistration_ids` as in every batch, `ids` still accepted.
    let ids = app.decided_preregs(&p, 1..3, "batch", 13_700_000_000).await;
    let (a, b) = (ids[0], ids[1]);
    for (field, id) in [("preregistration_ids", a), ("ids", b)] {
        let (s, v) = app
            .post(
                "/v1/preregistrations/batch-delete",
                &p.key,
                json!({ field: [id] }),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{field}: {v}");
        assert_eq!(v["results"][0]["preregistration_id"], id.to_string(), "{v}");
        assert_ne!(v["results"][0]["status"], "error", "{field}: {v}");
    }
    let (s, v) = app
        .post("/v1/preregistrations/batch-delete", &p.key, json!({}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v.to_string().contains("preregistration_ids"), "{v}");
    app.cleanup().await;
}

/// An upstream team's first hour (issue 12 item 7): the AsyncAPI document is
/// served without a key, names this deployment's exchanges, and describes
/// every job type the code knows with a payload schema and an example; an
/// upstream command taken from it is accepted as it stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncapi_document_is_served_and_its_example_command_works() {
    let app = spawn_app().await;
    let resp = reqwest::get(format!("{}/asyncapi.json", app.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "content-type").starts_with("application/json"));
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["asyncapi"], "3.0.0");
    let prefix = &app.ctx.cfg.amqp_prefix;
    for c in prereg::jobs::CONTRACTS {
        let chan = if c.upstream {
            format!("commands.{}", c.ty)
        } else {
            format!("internal.{}", c.ty)
        };
        let exchange = &doc["channels"][&chan]["bindings"]["amqp"]["exchange"]["name"];
        let want = if c.upstream {
            format!("{prefix}.commands")
        } else {
            format!("{prefix}.internal")
        };
        assert_eq!(exchange.as_str(), Some(want.as_str()), "{chan}");
    }
    // The example of `preregistration.requested`, sent as an upstream system
    // would (for a real partner, with a fresh id), is decided.
    let p = app
        .create_partner(json!({"name": "From the document"}))
        .await;
    let mut example =
        doc["components"]["messages"]["PreregistrationRequested"]["examples"][0]["payload"].clone();
    let id = uuid::Uuid::now_v7();
    example["id"] = json!(format!("doc-example-{id}"));
    example["data"]["id"] = json!(id);
    example["data"]["partner_id"] = json!(p.id);
    let ev: prereg::mq::CloudEvent = serde_json::from_value(example).unwrap();
    app.ctx.broker.publish_command(&ev).await.unwrap();
    // Upstream commands create the record when the worker takes them.
    wait_until(Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM preregistrations WHERE id = $1")
            .bind(id)
            .fetch_one(app.db())
            .await
            .unwrap()
            == 1
    })
    .await;
    // The example asks for an invitation: the claim is granted and the
    // invitation may already be on its way.
    let v = app.decided(&p, id).await;
    assert!(
        v["status"] == "preregistered" || v["status"] == "invited",
        "{v}"
    );
    assert!(v["expires_at"].is_string(), "a claim was granted: {v}");
    app.cleanup().await;
}
