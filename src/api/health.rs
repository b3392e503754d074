//! Liveness, readiness, metrics and the OpenAPI document.

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use super::AppState;
use crate::context::Ctx;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when Postgres, Redis and RabbitMQ all answer; details name each.
pub async fn readyz(State(st): State<AppState>) -> Response {
    let (code, details) = readiness(&st.ctx).await;
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

/// `GET /asyncapi.json` (unauthenticated, like `/openapi.json`): the
/// messages of this deployment, with its exchange prefix.
pub async fn asyncapi(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        Json(crate::asyncapi::document(&st.ctx.cfg.amqp_prefix)),
    )
        .into_response()
}

/// Checks Postgres, Redis and RabbitMQ; 503 when any is down.
pub async fn readiness(ctx: &Ctx) -> (StatusCode, Value) {
    let timeout = std::time::Duration::from_secs(2);
    // A known outage is reported at once (no pool wait).
    let pg_down = ctx.health.down_reason(crate::deps::Dep::Postgres);
    let pg = match &pg_down {
        Some(reason) => json!({"ok": false, "error": reason}),
        None => match tokio::time::timeout(timeout, crate::store::ping(&ctx.db)).await {
            Ok(Ok(_)) => json!({"ok": true}),
            Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
            Err(_) => json!({"ok": false, "error": "timeout"}),
        },
    };
    let redis = match ctx.locks.ping().await {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    let amqp = match tokio::time::timeout(timeout, ctx.broker.ping()).await {
        Ok(Ok(())) => json!({"ok": true}),
        Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
        Err(_) => json!({"ok": false, "error": "timeout"}),
    };
    let all = [&pg, &redis, &amqp].iter().all(|v| v["ok"] == json!(true));
    // A warning only: deadlines are still computed (weekends only).
    let calendar = if pg_down.is_some() {
        json!({"error": "database unavailable"})
    } else {
        match tokio::time::timeout(timeout, crate::timekeeping::calendar_status(ctx)).await {
            Ok(Ok(c)) => {
                metrics::gauge!("prereg_calendar_missing").set(if c.calendar_missing {
                    1.0
                } else {
                    0.0
                });
                json!(c)
            }
            Ok(Err(e)) => json!({"error": e.to_string()}),
            Err(_) => json!({"error": "timeout"}),
        }
    };
    let code = if all {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        json!({"status": if all { "ready" } else { "not_ready" }, "checks": {"postgres": pg, "redis": redis, "rabbitmq": amqp},
               "details": {"calendar": calendar}}),
    )
}
