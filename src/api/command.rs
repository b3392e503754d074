//! Accepting commands (SPEC §6, §8).
//!
//! - **Idempotency under concurrency**: [`replay`] *claims* the
//!   `Idempotency-Key` (an `INSERT … ON CONFLICT DO NOTHING` in the command's
//!   own transaction) before any work. A second request with the same key
//!   blocks on that row until the first commits — then it reads and returns
//!   the first answer — or rolls back — then the key is its own. So two
//!   requests sent at the same moment have one effect and the same answer.
//! - **Accepted is never lost**: the job is written to the transactional
//!   outbox in the same transaction as the state change (a grace period
//!   ahead), then published here with a confirm. Confirmed: the outbox row
//!   is deleted, 202. Certainly not taken by the broker (refused, unroutable,
//!   no connection): the change, the outbox row and the key are withdrawn in
//!   one transaction, 503, nothing done. No confirm in time (the broker may
//!   hold it): 202 — the outbox row stays and the relay publishes it after
//!   the grace period (duplicates are harmless: the job's id), because the
//!   work will happen either way. A crash after the commit leaves the outbox
//!   row for the relay: nothing stays `queued` forever.
//!
//! `POST /v1/preregistrations` goes through the intake's group commit
//! ([`crate::intake`]), which does the same per batch, except that the
//! `queued` row itself (not an outbox row) is what the relay republishes.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};

use super::{auth::PartnerAuth, error::ApiError, AppState, RequestId};
use crate::{
    intake::{Answer, IdemKey},
    mq::CloudEvent,
    publisher::{Fate, Outgoing},
    store::{
        idempotency::{self, Claim, Stored},
        undo::Undo,
    },
};

/// What a command handler takes, extracted in the order the handlers used
/// to list it (state, the caller's key `A`, request id, headers for the
/// `Idempotency-Key`, raw body); each rejection answers as it did then.
pub struct Command<A> {
    pub st: AppState,
    pub auth: A,
    pub rid: RequestId,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A partner's command.
pub type PartnerCommand = Command<PartnerAuth>;

impl<A> Command<A> {
    pub fn into_parts(self) -> (AppState, A, RequestId, HeaderMap, Bytes) {
        (self.st, self.auth, self.rid, self.headers, self.body)
    }
}

impl<A> FromRequest<AppState> for Command<A>
where
    A: FromRequestParts<AppState> + Send,
    A::Rejection: IntoResponse,
{
    type Rejection = Response;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let auth = A::from_request_parts(&mut parts, st)
            .await
            .map_err(IntoResponse::into_response)?;
        let Extension(rid) = Extension::<RequestId>::from_request_parts(&mut parts, st)
            .await
            .map_err(IntoResponse::into_response)?;
        let headers = parts.headers.clone();
        let body = Bytes::from_request(Request::from_parts(parts, body), st)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Self {
            st: st.clone(),
            auth,
            rid,
            headers,
            body,
        })
    }
}

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

    /// The key of a partner's `POST` to `path`.
    pub fn post(
        headers: &HeaderMap,
        principal: &crate::store::keys::Principal,
        path: &str,
        body: &[u8],
    ) -> Result<Option<Idem>, ApiError> {
        Idem::from_headers(headers, principal.label(), "POST", path, body)
    }

    /// The key as the intake's batcher takes it.
    pub fn to_key(&self) -> IdemKey {
        IdemKey {
            principal: self.principal.clone(),
            key: self.key.clone(),
            hash: self.hash.clone(),
        }
    }

    /// Stores the answer of the claimed key, in the command's transaction.
    pub async fn save(&self, conn: &mut PgConnection, answer: &Stored) -> Result<(), sqlx::Error> {
        idempotency::answer(conn, &self.principal, &self.key, answer).await
    }

    /// Releases the claimed key (the command was withdrawn).
    pub async fn forget(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        idempotency::forget(conn, &self.principal, &self.key).await
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

fn mismatch() -> ApiError {
    ApiError::unprocessable(
        "idempotency_key_reused",
        "this Idempotency-Key was used with a different request",
    )
}

/// Claims the key in `tx` (first use: `None`, go ahead and answer with
/// [`accept`] in the same transaction) or returns the first answer. A
/// concurrent first use blocks here until it commits or rolls back.
pub async fn replay(
    tx: &mut PgConnection,
    idem: Option<&Idem>,
) -> Result<Option<Response>, ApiError> {
    let Some(i) = idem else { return Ok(None) };
    match idempotency::claim(tx, &i.principal, &i.key, &i.hash).await? {
        Claim::New => Ok(None),
        Claim::Replay(s) => Ok(Some(respond(&s))),
        Claim::Mismatch => Err(mismatch()),
    }
}

/// A job written to the outbox in the command's transaction.
pub struct Staged {
    pub outbox_id: i64,
    pub job: CloudEvent,
    /// What undoes the command's change if the broker refuses the job.
    pub undo: Vec<Undo>,
}

/// Writes the jobs to the outbox (a grace period ahead: this process
/// publishes them itself; the relay only steps in later).
pub async fn stage(
    st: &AppState,
    conn: &mut PgConnection,
    jobs: Vec<(CloudEvent, Vec<Undo>)>,
) -> Result<Vec<Staged>, sqlx::Error> {
    let mut out = Vec::with_capacity(jobs.len());
    for (job, undo) in jobs {
        let outbox_id =
            crate::store::outbox::command_after(conn, &job, st.ctx.cfg.outbox_grace).await?;
        out.push(Staged {
            outbox_id,
            job,
            undo,
        });
    }
    Ok(out)
}

/// Publishes committed, staged jobs together. Returns, per job, whether it
/// was withdrawn (the broker certainly did not take it; its change undone),
/// and — when any was — the open transaction of the withdrawal, in which the
/// caller fixes or forgets its idempotency answer before committing. Every
/// job not withdrawn will run: confirmed now, or published by the relay.
pub async fn settle(
    st: &AppState,
    staged: &[Staged],
) -> (Vec<bool>, Option<Transaction<'static, Postgres>>) {
    let broker = st.ctx.publisher.broker();
    let msgs: Vec<Outgoing> = staged
        .iter()
        .map(|s| Outgoing::command(broker, &s.job))
        .collect();
    let fates = st.ctx.publisher.publish_all(&msgs).await;
    let confirmed: Vec<i64> = staged
        .iter()
        .zip(&fates)
        .filter(|(_, f)| f.is_confirmed())
        .map(|(s, _)| s.outbox_id)
        .collect();
    let refused: Vec<i64> = staged
        .iter()
        .zip(&fates)
        .filter(|(_, f)| matches!(f, Fate::NotTaken(_)))
        .map(|(s, _)| s.outbox_id)
        .collect();
    for (s, f) in staged.iter().zip(&fates) {
        if let Fate::NotTaken(why) | Fate::Unknown(why) = f {
            tracing::warn!(job_id = %s.job.id, job_type = %s.job.ty, reason = %why, "job not confirmed by the broker");
        }
    }
    let none = vec![false; staged.len()];
    if refused.is_empty() {
        if !confirmed.is_empty() {
            if let Err(e) = crate::store::outbox::delete(&st.ctx.db, &confirmed).await {
                tracing::warn!(error = %e, "could not delete published outbox rows; the relay will publish them again");
            }
        }
        return (none, None);
    }
    let result: Result<_, sqlx::Error> = async {
        let mut tx = st.ctx.db.begin().await?;
        if !confirmed.is_empty() {
            crate::store::outbox::delete_in(&mut tx, &confirmed).await?;
        }
        let gone = crate::store::outbox::withdraw(&mut tx, &refused).await?;
        let mut withdrawn = none.clone();
        for (i, s) in staged.iter().enumerate() {
            if gone.contains(&s.outbox_id) {
                for undo in &s.undo {
                    undo.apply(&mut tx).await?;
                }
                withdrawn[i] = true;
            }
        }
        Ok((withdrawn, tx))
    }
    .await;
    match result {
        Ok((w, tx)) => (w, Some(tx)),
        Err(e) => {
            // Nothing withdrawn: the relay publishes every job later.
            tracing::warn!(error = %e, "could not withdraw refused jobs; the relay will publish them");
            (none, None)
        }
    }
}

/// Answers `202` with `body` and `location` for a queued command: stores the
/// answer with the key, writes the job to the outbox, commits, publishes
/// with a confirm; if the broker refuses the job, undoes the change with
/// `undo` and answers 503.
pub async fn accept(
    st: &AppState,
    mut tx: Transaction<'static, Postgres>,
    idem: Option<&Idem>,
    job: &CloudEvent,
    undo: Option<Undo>,
    body: Value,
    location: String,
) -> Result<Response, ApiError> {
    let answer = accepted(body, Some(location));
    if let Some(i) = idem {
        i.save(&mut tx, &answer).await?;
    }
    let outbox_id =
        crate::store::outbox::command_after(&mut tx, job, st.ctx.cfg.outbox_grace).await?;
    tx.commit().await?;
    let staged = [Staged {
        outbox_id,
        job: job.clone(),
        undo: Vec::new(),
    }];
    let (withdrawn, wtx) = settle(st, &staged).await;
    let Some(mut wtx) = wtx else {
        return Ok(respond(&answer));
    };
    if !withdrawn[0] {
        let _ = wtx.commit().await;
        return Ok(respond(&answer));
    }
    let undone: Result<(), sqlx::Error> = async {
        if let Some(undo) = undo {
            undo.apply(&mut wtx).await?;
        }
        if let Some(i) = idem {
            i.forget(&mut wtx).await?;
        }
        wtx.commit().await
    }
    .await;
    match undone {
        Ok(()) => Err(ApiError::dependency_down(
            crate::deps::Dep::RabbitMq,
            "the message broker is unavailable; nothing was done, try again",
        )),
        // The withdrawal rolled back: the job stays in the outbox and runs.
        Err(e) => {
            tracing::warn!(error = %e, "could not withdraw a refused job; the relay will publish it");
            Ok(respond(&answer))
        }
    }
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

/// The response for an answer of the intake's group commit.
pub fn intake_response(answer: Answer) -> Result<Response, ApiError> {
    match answer {
        Answer::Respond(s) => Ok(respond(&s)),
        Answer::KeyMismatch => Err(mismatch()),
        Answer::Unavailable(why) => {
            tracing::warn!(reason = %why, "pre-registration not accepted: broker");
            Err(ApiError::dependency_down(
                crate::deps::Dep::RabbitMq,
                "the message broker is unavailable; nothing was done, try again",
            ))
        }
        Answer::Database(e) => Err(e.into()),
    }
}
