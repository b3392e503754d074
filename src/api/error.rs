//! One error type for the API: `{"error": {"code", "message", "details"}}`.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use crate::domain::validate::FieldError;

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
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; it has been logged",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "details": self.details}});
        (self.status, Json(body)).into_response()
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
            _ => match e {
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                    tracing::error!(error = %e, "database unavailable");
                    ApiError::unavailable("the database is unavailable; try again")
                }
                _ => {
                    tracing::error!(error = %e, "database error");
                    ApiError::internal()
                }
            },
        }
    }
}

impl From<crate::mq::PublishError> for ApiError {
    fn from(e: crate::mq::PublishError) -> Self {
        tracing::error!(error = %e, "broker publish failed");
        ApiError::unavailable("the message broker is unavailable; nothing was done, try again")
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
