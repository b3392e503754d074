//! Liveness, readiness, metrics and the OpenAPI document.

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use super::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when Postgres, Redis and RabbitMQ all answer; details name each.
pub async fn readyz(State(st): State<AppState>) -> Response {
    let (code, details) = crate::app::readiness(&st.ctx).await;
    (code, Json(details)).into_response()
}

pub async fn metrics(State(st): State<AppState>) -> Response {
    crate::timekeeping::refresh_gauges(&st.ctx).await;
    let body = crate::telemetry::metrics().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub static OPENAPI: &str = include_str!("openapi.json");

pub async fn openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}
