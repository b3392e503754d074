//! The intake's HTTP API (axum).

pub mod admin;
pub mod auth;
pub mod calendar;
pub mod command;
pub mod dashboard;
pub mod error;
pub mod gate;
pub mod health;
pub mod history;
pub mod invitations;
pub mod link;
#[cfg(test)]
mod openapi_check;
pub mod partner;
pub mod serve;
pub mod upstream;
pub mod views;

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    http::{header, HeaderName, HeaderValue, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Router,
};
use tower_http::{catch_panic::CatchPanicLayer, timeout::TimeoutLayer};
use tracing::Instrument;

use crate::context::Ctx;

#[derive(Clone)]
pub struct AppState {
    pub ctx: Arc<Ctx>,
    pub keys: Arc<auth::KeyCache>,
}

/// The request id of this request (from `X-Request-Id`, or generated).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(ctx: Arc<Ctx>) -> Router {
    let state = AppState {
        ctx,
        keys: Arc::new(auth::KeyCache::default()),
    };
    health_routes()
        .route("/openapi.json", get(health::openapi))
        .route("/asyncapi.json", get(health::asyncapi))
        .route("/i/{token}", get(link::open))
        .route("/admin", get(dashboard::dashboard))
        .route("/admin/mail", get(dashboard::mail_list))
        .route("/admin/mail/{id}", get(dashboard::mail_one))
        .route(
            "/admin/login",
            get(dashboard::login_form).post(dashboard::login),
        )
        .route(
            "/admin/dead-letters/{queue}/replay",
            post(dashboard::replay),
        )
        .route(
            "/admin/dead-letters/{queue}/discard",
            post(dashboard::discard),
        )
        .route("/admin/logout", post(dashboard::logout))
        .route("/admin/reviews/{id}/decision", post(dashboard::decide))
        // partner
        .route("/v1/partner", get(partner::profile))
        .route("/v1/partner/contact", put(partner::set_contact))
        .route(
            "/v1/preregistrations",
            post(partner::create).get(partner::list),
        )
        .route(
            "/v1/preregistrations/batch-delete",
            post(partner::batch_delete),
        )
        .route(
            "/v1/preregistrations/{id}",
            get(partner::get_one).delete(partner::delete_one),
        )
        .route("/v1/preregistrations/{id}/timeline", get(partner::timeline))
        .route(
            "/v1/preregistrations/{id}/review",
            post(partner::request_review),
        )
        .route(
            "/v1/preregistrations/{id}/offline-link",
            post(invitations::offline_link),
        )
        .route(
            "/v1/preregistrations/{id}/offline-link/qr.png",
            get(invitations::offline_qr),
        )
        .route("/v1/invitations", post(invitations::invite))
        .route("/v1/invitations/resend", post(invitations::resend))
        .route("/v1/invitations/preview", get(invitations::preview))
        .route("/v1/invitations/{id}", get(invitations::get_one))
        .route("/v1/history", get(history::list))
        .route("/v1/exports", post(history::create_export))
        .route("/v1/exports/{id}", get(history::get_export))
        .route("/v1/exports/{id}/download", get(history::download))
        // upstream
        .route("/v1/associations", post(invitations::submit_association))
        .route("/v1/associations/{id}", get(invitations::get_association))
        .route(
            "/v1/accounts/{account_id}",
            put(upstream::put_account).get(upstream::get_account),
        )
        // operator
        .route("/v1/admin/partners", post(admin::create_partner))
        .route(
            "/v1/admin/partners/{id}",
            get(admin::get_partner).patch(admin::patch_partner),
        )
        .route("/v1/admin/partners/{id}/keys", post(admin::rotate_key))
        .route("/v1/admin/upstream-keys", post(admin::upstream_key))
        .route("/v1/admin/reviews", get(admin::list_reviews))
        .route(
            "/v1/admin/reviews/{id}/decision",
            post(admin::decide_review),
        )
        .route(
            "/v1/admin/calendar/{year}",
            put(calendar::put_year).get(calendar::get_year),
        )
        .route("/v1/admin/sweeps", post(calendar::request_sweep))
        .route("/v1/admin/queues", get(admin::queues))
        .route("/v1/admin/dead-letters/{queue}", get(admin::dead_letters))
        .route("/v1/admin/dead-letters/{queue}/replay", post(admin::replay))
        .fallback(|| async { error::ApiError::not_found("route") })
        // Reading the body and answering; `wire` turns the bare 408 into the
        // one error shape. The head has its own limit (`serve`).
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.ctx.cfg.http_request_timeout,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), gate::gate))
        .layer(middleware::from_fn(wire))
        .layer(middleware::from_fn(observe))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(error::ApiError::internal())
        }))
        .with_state(state)
}

/// Request id, a span carrying it, and HTTP metrics.
async fn observe(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("http", request_id = %id, %method, %route);
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, elapsed, "request failed");
        } else {
            tracing::debug!(status, elapsed, "request");
        }
    });
    metrics::counter!("prereg_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("prereg_http_request_duration_seconds", "route" => route).record(elapsed);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    resp
}

/// The HTTP method as a metric label: one of a fixed set, `other` for any
/// invented method (labels must not grow without bound).
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The largest request body the API reads.
pub const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// Paths that answer HTML (the dashboard and invitation links) keep their
/// own content types; everything else is the JSON API.
fn is_json_api(path: &str) -> bool {
    !(path == "/admin" || path.starts_with("/admin/") || path.starts_with("/i/"))
}

/// `application/json` (any parameters) or a `+json` type.
fn is_json_type(v: &str) -> bool {
    let essence = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Wire hygiene: JSON bodies must say `application/json` (415), bodies
/// above 2 MiB are refused (413), and every 4xx/5xx the framework produces
/// itself (bad query, 405, 413, ...) gets the one error shape.
async fn wire(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !is_json_api(path) {
        return next.run(req).await;
    }
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        let h = req.headers();
        let length = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let has_body = length.is_some_and(|n| n > 0) || h.contains_key(header::TRANSFER_ENCODING);
        if length.is_some_and(|n| n > BODY_LIMIT as u64) {
            return too_large().into_response();
        }
        let json = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json_type);
        if has_body && !json {
            return error::ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON sent as Content-Type: application/json",
            )
            .into_response();
        }
    }
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| is_json_type(v) || v.starts_with("text/csv") || v.starts_with("image/"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = crate::domain::mask::text(String::from_utf8_lossy(&text).trim());
    let err = match status {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        StatusCode::METHOD_NOT_ALLOWED => error::ApiError::new(
            status,
            "method_not_allowed",
            "this method is not allowed on this path",
        ),
        StatusCode::NOT_FOUND => error::ApiError::not_found("route"),
        StatusCode::REQUEST_TIMEOUT => error::ApiError::new(
            status,
            "request_timeout",
            "the request body did not arrive in time; nothing was done, send it again",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => error::ApiError::new(
            status,
            "unsupported_media_type",
            "the body must be JSON sent as Content-Type: application/json",
        ),
        s if s.is_client_error() => {
            let code = if s == StatusCode::BAD_REQUEST {
                "bad_request"
            } else {
                "invalid_request"
            };
            let message = if text.is_empty() {
                s.canonical_reason().unwrap_or("bad request").to_string()
            } else {
                text
            };
            error::ApiError::new(s, code, message)
        }
        _ => error::ApiError::internal(),
    };
    let mut out = err.into_response();
    *out.status_mut() = status;
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

fn too_large() -> error::ApiError {
    error::ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body exceeds the limit of 2 MiB ({BODY_LIMIT} bytes)"),
    )
}

/// Replaces each JSON `\uXXXX` escape of a lone surrogate by `\u0000`, which
/// every text field refuses with a 422 naming the field (instead of a 400
/// for the whole body).
fn neutralize_lone_surrogates(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    fn hex4(b: &[u8]) -> Option<u16> {
        let s = std::str::from_utf8(b.get(..4)?).ok()?;
        u16::from_str_radix(s, 16).ok()
    }
    let is_high = |u: u16| (0xD800..0xDC00).contains(&u);
    let is_low = |u: u16| (0xDC00..0xE000).contains(&u);
    if !bytes.windows(2).any(|w| w == b"\\u") {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = bytes.to_vec();
    let mut i = 0;
    while i + 1 < out.len() {
        if out[i] != b'\\' {
            i += 1;
            continue;
        }
        if out[i + 1] != b'u' {
            i += 2;
            continue;
        }
        let Some(u) = hex4(&out[i + 2..]) else {
            i += 2;
            continue;
        };
        if is_high(u) {
            let next = (out.get(i + 6) == Some(&b'\\') && out.get(i + 7) == Some(&b'u'))
                .then(|| hex4(&out[i + 8..]))
                .flatten();
            if next.is_some_and(is_low) {
                i += 12;
                continue;
            }
        } else if !is_low(u) {
            i += 6;
            continue;
        }
        out[i + 2..i + 6].copy_from_slice(b"0000");
        i += 6;
    }
    std::borrow::Cow::Owned(out)
}

/// Parses a JSON body into a value, with our error shape on failure.
pub fn json_body(bytes: &[u8]) -> Result<serde_json::Value, error::ApiError> {
    if bytes.is_empty() {
        return Err(error::ApiError::bad_request(
            "invalid_json",
            "a JSON body is required",
        ));
    }
    serde_json::from_slice(&neutralize_lone_surrogates(bytes)).map_err(|e| {
        error::ApiError::bad_request(
            "invalid_json",
            crate::domain::mask::text(&format!("the body is not valid JSON: {e}")),
        )
    })
}

/// Parses a path id; an invalid one is simply not found.
pub fn parse_id(s: &str) -> Result<uuid::Uuid, error::ApiError> {
    uuid::Uuid::parse_str(s).map_err(|_| error::ApiError::not_found("resource"))
}

/// The `{id}` of a route, parsed as [`parse_id`] does (not a UUID: 404).
pub struct PathId(pub uuid::Uuid);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathId {
    type Rejection = axum::response::Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &S,
    ) -> Result<Self, Self::Rejection> {
        use axum::response::IntoResponse;
        let axum::extract::Path(id) = axum::extract::Path::<String>::from_request_parts(parts, st)
            .await
            .map_err(IntoResponse::into_response)?;
        parse_id(&id)
            .map(PathId)
            .map_err(IntoResponse::into_response)
    }
}

/// Health and metrics only (worker and scheduler processes).
pub fn health_router(ctx: Arc<Ctx>) -> Router {
    let state = AppState {
        ctx,
        keys: Arc::new(auth::KeyCache::default()),
    };
    health_routes().with_state(state)
}

/// Liveness, readiness and metrics: served by every process.
fn health_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
}
