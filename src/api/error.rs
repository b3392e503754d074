//! One error type for the API: `{"error": {"code", "message", "details"}}`.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use crate::{deps::Dep, domain::validate::FieldError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_string(),
            message: message.into(),
            details: None,
        }
    }
    pub fn details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required: Authorization: Bearer <key>",
        )
    }
    pub fn forbidden(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }
    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unprocessable(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
    /// 422 naming every bad field.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let n = errors.len();
        Self::unprocessable(
            "validation_failed",
            format!(
                "{n} field{} failed validation",
                if n == 1 { "" } else { "s" }
            ),
        )
        .details(json!({ "fields": errors }))
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
    }
    /// 503 naming the dependency that is down (`details.dependency`); the
    /// answer carries `Retry-After`.
    pub fn dependency_down(dep: Dep, message: impl Into<String>) -> Self {
        Self::unavailable(message).details(json!({ "dependency": dep.name() }))
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; it has been logged",
        )
    }
}

/// `Retry-After` of a 503 when nothing else set it (the health gate sets the
/// configured value).
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 2;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let dep = self
            .details
            .as_ref()
            .and_then(|d| d.get("dependency"))
            .and_then(Value::as_str)
            .and_then(Dep::parse);
        let body =
            json!({"error": {"code": self.code, "message": self.message, "details": self.details}});
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(DEFAULT_RETRY_AFTER_SECS),
            );
        }
        if let Some(dep) = dep {
            // The health gate probes this dependency at once.
            resp.extensions_mut().insert(dep);
        }
        resp
    }
}

impl From<crate::flows::FlowError> for ApiError {
    fn from(e: crate::flows::FlowError) -> Self {
        use crate::flows::FlowError;
        match e {
            FlowError::NotFound(what) => ApiError::not_found(what),
            FlowError::Conflict(code, message) => ApiError::conflict(code, message),
            FlowError::Db(e) => e.into(),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match crate::store::sqlstate(&e).as_deref() {
            Some("23505") => {
                ApiError::conflict("conflict", "the resource conflicts with an existing one")
            }
            Some("23503") => {
                ApiError::unprocessable("invalid_reference", "a referenced resource does not exist")
            }
            Some("23514" | "22P02" | "22001") => {
                ApiError::unprocessable("invalid_value", "a value is not allowed")
            }
            _ if crate::deps::db_unavailable(&e) => {
                // Shut down, restarting, unreachable, out of connections, or a
                // statement past statement_timeout: nothing was committed.
                tracing::warn!(error = %e, "database unavailable");
                ApiError::dependency_down(
                    Dep::Postgres,
                    "the database is unavailable; nothing was done, try again",
                )
            }
            _ => {
                tracing::error!(error = %e, "database error");
                ApiError::internal()
            }
        }
    }
}

impl From<crate::mq::PublishError> for ApiError {
    fn from(e: crate::mq::PublishError) -> Self {
        tracing::warn!(error = %e, "broker publish failed");
        ApiError::dependency_down(
            Dep::RabbitMq,
            "the message broker is unavailable; nothing was done, try again",
        )
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
