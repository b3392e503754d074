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
#[cfg(test)]
mod openapi_check;
pub mod partner;
pub mod upstream;
pub mod views;

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderName, HeaderValue},
    middleware::{self, Next},
    response::Response,
    routing::{get, post, put},
    Router,
};
use tower_http::catch_panic::CatchPanicLayer;
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
        .route("/admin", get(dashboard::dashboard))
        .route(
            "/admin/login",
            get(dashboard::login_form).post(dashboard::login),
        )
        .route(
            "/admin/dead-letters/{queue}/replay",
            post(dashboard::replay),
        )
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
        .layer(middleware::from_fn_with_state(state.clone(), gate::gate))
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
    let method = req.method().to_string();
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

/// Parses a JSON body into a value, with our error shape on failure.
pub fn json_body(bytes: &[u8]) -> Result<serde_json::Value, error::ApiError> {
    if bytes.is_empty() {
        return Err(error::ApiError::bad_request(
            "invalid_json",
            "a JSON body is required",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        error::ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
    })
}

/// Parses a path id; an invalid one is simply not found.
pub fn parse_id(s: &str) -> Result<uuid::Uuid, error::ApiError> {
    uuid::Uuid::parse_str(s).map_err(|_| error::ApiError::not_found("resource"))
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
