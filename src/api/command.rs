//! Accepting commands: store what must be stored, publish the job with a
//! publisher confirm, answer 202. If the broker cannot take the job, what was
//! stored is undone and the answer is 503. An `Idempotency-Key` makes a
//! retried command return the first answer.

use axum::{
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};

use super::{error::ApiError, AppState};
use crate::{
    mq::CloudEvent,
    store::idempotency::{self, Claim, Stored},
};

pub struct Idem {
    principal: String,
    key: String,
    hash: Vec<u8>,
}

impl Idem {
    pub fn from_headers(
        headers: &HeaderMap,
        principal: String,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Option<Idem>, ApiError> {
        let Some(v) = headers.get("idempotency-key") else {
            return Ok(None);
        };
        let key = v
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|k| !k.is_empty() && k.len() <= 255)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_idempotency_key",
                    "Idempotency-Key must be 1 to 255 visible characters",
                )
            })?;
        Ok(Some(Idem {
            principal,
            key: key.to_string(),
            hash: idempotency::request_hash(method, path, body),
        }))
    }
}

impl Idem {
    /// Stores the answer outside a command transaction (batch endpoints,
    /// whose answer is known only after publishing).
    pub async fn save(&self, conn: &mut PgConnection, answer: &Stored) -> Result<(), sqlx::Error> {
        idempotency::save(conn, &self.principal, &self.key, &self.hash, answer).await
    }
}

pub fn respond(s: &Stored) -> Response {
    let status = StatusCode::from_u16(s.status).unwrap_or(StatusCode::ACCEPTED);
    let mut resp = (status, Json(s.body.clone())).into_response();
    if let Some(loc) = s
        .location
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

/// Returns the stored first answer if this key was seen before.
pub async fn replay(
    tx: &mut PgConnection,
    idem: Option<&Idem>,
) -> Result<Option<Response>, ApiError> {
    let Some(i) = idem else { return Ok(None) };
    match idempotency::check(tx, &i.principal, &i.key, &i.hash).await? {
        Claim::New => Ok(None),
        Claim::Replay(s) => Ok(Some(respond(&s))),
        Claim::Mismatch => Err(ApiError::unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request",
        )),
    }
}

/// Commits the transaction (with the idempotency record), publishes the job,
/// and undoes with `undo` (one SQL statement taking `$1 = undo_id`) if the
/// broker does not confirm.
pub async fn accept(
    st: &AppState,
    mut tx: Transaction<'static, Postgres>,
    idem: Option<&Idem>,
    answer: Stored,
    job: &CloudEvent,
    undo: Option<(&str, uuid::Uuid)>,
) -> Result<Response, ApiError> {
    if let Some(i) = idem {
        if let Err(e) = idempotency::save(&mut tx, &i.principal, &i.key, &i.hash, &answer).await {
            if crate::store::is_unique_violation(&e) {
                // A concurrent request with the same key won: give its answer.
                tx.rollback().await?;
                let mut conn = st.ctx.db.acquire().await?;
                if let Some(r) = replay(&mut conn, Some(i)).await? {
                    return Ok(r);
                }
            }
            return Err(e.into());
        }
    }
    tx.commit().await?;
    if let Err(e) = st.ctx.broker.publish_command(job).await {
        let mut tx = st.ctx.db.begin().await?;
        if let Some((sql, id)) = undo {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
            // The message may still reach the broker (a confirm that timed
            // out): its worker must not recreate what was undone.
            sqlx::query("INSERT INTO withdrawn_commands (id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(i) = idem {
            idempotency::forget(&mut tx, &i.principal, &i.key).await?;
        }
        tx.commit().await?;
        return Err(e.into());
    }
    Ok(respond(&answer))
}

/// The message for one of our jobs; failing to encode it is an internal
/// error (never a `null` payload).
pub fn job<J: crate::jobs::Job>(id: impl Into<String>, job: &J) -> Result<CloudEvent, ApiError> {
    CloudEvent::job(id, job).map_err(|e| {
        tracing::error!(error = %e, job_type = J::TYPE, "could not encode a job");
        ApiError::internal()
    })
}

pub fn accepted(body: Value, location: Option<String>) -> Stored {
    Stored {
        status: 202,
        body,
        location,
    }
}
