//! Wire hygiene (SPEC §8, issue 10): media types, unknown fields, the one
//! error shape for every 4xx, the body limit, and text fields that refuse
//! control characters, bidi overrides and lone surrogates (never a 500).

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::*;

/// Sends a raw body with a content type; the status and the parsed answer.
async fn raw(
    app: &TestApp,
    method: Method,
    path: &str,
    key: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.addr))
        .bearer_auth(key)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text:?}"));
    (status, v)
}

/// A POST with `Transfer-Encoding: chunked` (no length announced), over a
/// plain socket; the raw answer.
async fn chunked_post(app: &TestApp, path: &str, key: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.addr.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(64 * 1024) {
        let sent = async {
            sock.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            sock.write_all(chunk).await?;
            sock.write_all(b"\r\n").await
        };
        if sent.await.is_err() {
            break; // the server answered and closed early
        }
    }
    let _ = sock.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn assert_shape(v: &Value, code: &str) {
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.as_object().unwrap().contains_key("details"), "{v}");
}

fn named_fields(v: &Value) -> Vec<String> {
    v["error"]["details"]["fields"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| f["field"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framework_errors_have_the_one_error_shape() {
    let (app, p) = spawn_with_partner().await;
    let body = json!({"full_name": "Zhang San", "email": "a@customer.example", "mobile": "+8613800000001"})
        .to_string();
    // A raw `POST /v1/preregistrations` with this content type.
    let submit = |content_type: Option<&'static str>, body: String| {
        raw(
            &app,
            Method::POST,
            "/v1/preregistrations",
            &p.key,
            content_type,
            body,
        )
    };

    // 415: text/plain is refused, as is a missing content type.
    let (s, v) = submit(Some("text/plain"), body.clone()).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_shape(&v, "unsupported_media_type");
    let (s, _) = submit(None, body.clone()).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (s, v) = submit(Some("application/json; charset=utf-8"), body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");

    // 405
    let (s, v) = raw(
        &app,
        Method::PATCH,
        "/v1/preregistrations",
        &p.key,
        None,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_shape(&v, "method_not_allowed");

    // 404
    let (s, v) = raw(&app, Method::GET, "/v1/nothing-here", &p.key, None, "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_shape(&v, "not_found");

    // 400: a query the framework cannot read.
    let (s, v) = raw(
        &app,
        Method::GET,
        "/v1/admin/reviews?limit=many",
        OPERATOR,
        None,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_shape(&v, "bad_request");

    // 413, stating the limit; also when the length is not announced.
    let big = format!("{{\"remarks\": \"{}\"}}", "x".repeat(2 * 1024 * 1024 + 10));
    let (s, v) = submit(Some("application/json"), big.clone()).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_shape(&v, "payload_too_large");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("2 MiB"),
        "{v}"
    );
    let answer = chunked_post(&app, "/v1/preregistrations", &p.key, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("2 MiB"), "{answer}");

    // 400: not JSON at all.
    let (s, v) = submit(Some("application/json"), "{".into()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_shape(&v, "invalid_json");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_a_422_naming_them() {
    let (app, p) = spawn_with_partner().await;
    let (s, v) = app
        .submit(
            &p,
            json!({"full_name": "Zhang San", "email": "a@customer.example",
                   "mobile": "+8613800000001", "send_invitaton": true}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(named_fields(&v), ["send_invitaton"]);
    assert_eq!(v["error"]["details"]["fields"][0]["code"], "unknown_field");

    let (s, v) = app
        .post(
            "/v1/invitations/resend",
            &p.key,
            json!({"preregistration_ids": [uuid::Uuid::new_v4()], "locale": "en"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(named_fields(&v), ["locale"]);

    let (s, v) = app
        .post(
            "/v1/admin/partners",
            OPERATOR,
            json!({"name": "P", "country": "CN", "referal": true,
                   "account_managers": [{"name": "A", "email": "a@p.example", "phone": "1"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let mut fields = named_fields(&v);
    fields.sort();
    assert_eq!(fields, ["account_managers[0].phone", "referal"]);

    let upstream = app.upstream_key().await;
    let (s, v) = app
        .put_account(
            &upstream,
            "acct-1",
            json!({"email": "a@customer.example", "has_contrat": true}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(named_fields(&v), ["has_contrat"]);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_bidi_overrides_and_lone_surrogates_are_a_422_never_a_500() {
    let (app, p) = spawn_with_partner().await;
    let base = json!({"full_name": "Zhang San", "email": "a@customer.example", "mobile": "+8613800000001"});
    for (field, value) in [
        ("full_name", "Zhang\u{0}San"),
        ("full_name", "Zhang\nSan"),
        ("full_name", "Zhang \u{202E}naS"),
        ("full_name", "Visit https://evil.example now"),
        ("remarks", "nul \u{0} here"),
        ("tags", "tag\u{7}"),
    ] {
        let mut body = base.clone();
        body[field] = if field == "tags" {
            json!([value])
        } else {
            json!(value)
        };
        let (s, v) = app.post("/v1/preregistrations", &p.key, body).await;
        assert_eq!(
            s,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}={value:?}: {v}"
        );
        assert_eq!(named_fields(&v), [field], "{v}");
    }
    // Remarks may hold line breaks.
    let mut ok = base.clone();
    ok["remarks"] = json!("line one\nline two");
    let (s, v) = app.post("/v1/preregistrations", &p.key, ok).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");

    // A lone surrogate escape (not representable in a Rust string).
    let raw_body = r#"{"full_name": "Zhang \ud800 San", "email": "a@customer.example", "mobile": "+8613800000001"}"#;
    let resp = app
        .http
        .post(format!("{}/v1/preregistrations", app.addr))
        .bearer_auth(&p.key)
        .header("content-type", "application/json")
        .body(raw_body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(named_fields(&v), ["full_name"], "{v}");

    // U+0000 in a search and in the operator's partner endpoints.
    let (s, v) = app.get("/v1/preregistrations?q=a%00b", &p.key).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(named_fields(&v), ["q"]);
    let (s, v) = app.get("/v1/history?q=a%00b", &p.key).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = app
        .post(
            "/v1/admin/partners",
            OPERATOR,
            json!({"name": "Bad\u{0}Name", "country": "CN"}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(named_fields(&v), ["name"]);
    let (s, v) = app
        .request(
            Method::PATCH,
            &format!("/v1/admin/partners/{}", p.id),
            Some(OPERATOR),
            Some(json!({"name": "Bad\u{0}Name"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(named_fields(&v), ["name"]);
    let upstream = app.upstream_key().await;
    let (s, v) = app
        .put_account(&upstream, "acct-1", json!({"display_name": "x\u{0}y"}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(named_fields(&v), ["display_name"]);
    app.cleanup().await;
}

/// Reads from `sock` until the server closes it; the bytes read, or `None`
/// if it is still open after `limit`.
async fn until_closed(sock: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    match tokio::time::timeout(limit, sock.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

/// Slow clients (slowloris) cannot hold connections open: a request head
/// that never ends and a silent connection are closed after
/// `PREREG_HTTP_HEADER_TIMEOUT`; a body that never arrives is answered `408`
/// in the one error shape after `PREREG_HTTP_REQUEST_TIMEOUT`. Without the
/// limits each of these connections stays open indefinitely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_by_the_header_and_request_timeouts() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_with(|c| {
        c.http_header_timeout = Duration::from_millis(400);
        c.http_request_timeout = Duration::from_millis(600);
    })
    .await;
    let p = app.create_partner(json!({})).await;
    let addr = app.addr.trim_start_matches("http://").to_string();
    let limit = Duration::from_secs(5);

    // 1. A head trickled and never finished.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    sock.write_all(b"GET /v1/preregistrations HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let closed = until_closed(&mut sock, limit).await;
    assert!(
        closed.is_some(),
        "an unfinished request head kept its connection open for {limit:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed before the timeout"
    );

    // 2. A connection that never says anything.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let closed = until_closed(&mut sock, limit).await;
    assert!(
        closed.is_some(),
        "a silent connection stayed open for {limit:?}"
    );

    // 3. A body announced but never sent: 408 in the error shape, and
    //    nothing was recorded.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/preregistrations HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 400\r\nConnection: close\r\n\r\n{{\"customer\":",
        p.key
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let answer = until_closed(&mut sock, limit)
        .await
        .unwrap_or_else(|| panic!("a stalled body kept its request open for {limit:?}"));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").expect("a complete answer") + 4..];
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {answer}"));
    assert_shape(&v, "request_timeout");
    let rows: (i64,) = sqlx::query_as("SELECT count(*) FROM preregistrations")
        .fetch_one(app.db())
        .await
        .unwrap();
    assert_eq!(rows.0, 0);

    // A normal request on the same server still works.
    let (status, _) = app.get("/v1/preregistrations", &p.key).await;
    assert_eq!(status, StatusCode::OK);
    app.cleanup().await;
}
