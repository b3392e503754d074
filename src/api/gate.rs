//! The health gate: while Postgres is known to be down, API requests are
//! answered `503` with `Retry-After` at once (no request waits out a pool
//! timeout); every 503 carries the configured `Retry-After`, and a 503
//! caused by a dependency wakes the health probe.

use axum::{
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{error::ApiError, AppState};
use crate::deps::Dep;

/// Paths that need Postgres (everything but health, metrics and the API
/// document).
fn needs_database(path: &str) -> bool {
    path.starts_with("/v1/") || path.starts_with("/admin") || path.starts_with("/i/")
}

pub async fn gate(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let health = &st.ctx.health;
    let retry_after = HeaderValue::from(health.retry_after_secs);
    if needs_database(req.uri().path()) && health.is_down(Dep::Postgres) {
        metrics::counter!("prereg_http_fast_unavailable_total", "dependency" => "postgres")
            .increment(1);
        let mut resp = ApiError::dependency_down(
            Dep::Postgres,
            "the database is unavailable; nothing was done, try again",
        )
        .into_response();
        resp.headers_mut().insert(header::RETRY_AFTER, retry_after);
        return resp;
    }
    let mut resp = next.run(req).await;
    if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
        if let Some(dep) = resp.extensions().get::<Dep>() {
            health.suspect(*dep);
        }
        resp.headers_mut().insert(header::RETRY_AFTER, retry_after);
    }
    resp
}
