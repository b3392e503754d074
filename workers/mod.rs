//! One module per job kind, each a small `handle(ctx, payload)`; the shared
//! runtime maps outcomes to ack, delayed retry or dead letter.

pub mod accounts;
pub mod association;
pub mod deadlines;
pub mod email;
pub mod export;
pub mod registration;
pub mod runtime;
pub mod sweeps;

use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::{context::Ctx, mq::CloudEvent};

/// What a handler did with a job; either way the message is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Nothing to do (already handled: redelivery or replay).
    Skipped(&'static str),
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Skipped(_) => "skipped",
        }
    }
}

#[derive(Debug, Error)]
pub enum JobError {
    /// Try again later (service down, lock busy, conflict).
    #[error("retryable: {0}")]
    Retryable(String),
    /// Never going to work: dead-letter with this reason.
    #[error("fatal ({code}): {message}")]
    Fatal { code: &'static str, message: String },
}

impl JobError {
    /// The same error with email addresses and phone numbers masked.
    pub fn masked(self) -> Self {
        match self {
            JobError::Retryable(m) => JobError::Retryable(crate::domain::mask::text(&m)),
            JobError::Fatal { code, message } => JobError::Fatal {
                code,
                message: crate::domain::mask::text(&message),
            },
        }
    }
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        JobError::Fatal {
            code,
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Retryable(format!("database: {e}"))
    }
}

impl From<crate::mq::PublishError> for JobError {
    fn from(e: crate::mq::PublishError) -> Self {
        JobError::Retryable(format!("broker: {e}"))
    }
}

/// Reads a job's payload; one that does not fit is a poison message.
pub fn payload<T: DeserializeOwned>(ev: &CloudEvent) -> Result<T, JobError> {
    serde_json::from_value(ev.data.clone())
        .map_err(|e| JobError::fatal("invalid_payload", format!("{}: {e}", ev.ty)))
}

/// Like [`payload`], for jobs whose fields are all optional: an absent
/// (`null`) payload is the default one.
pub fn payload_or_default<T: DeserializeOwned + Default>(ev: &CloudEvent) -> Result<T, JobError> {
    if ev.data.is_null() {
        return Ok(T::default());
    }
    payload(ev)
}

/// Routes a job to its handler by message type.
pub async fn dispatch(ctx: &Ctx, ev: &CloudEvent) -> Result<Outcome, JobError> {
    match ev.ty.as_str() {
        "preregistration.requested" => registration::handle(ctx, payload(ev)?, ev).await,
        "review.requested" => registration::handle_review(ctx, payload(ev)?).await,
        "account.upserted" => accounts::handle(ctx, payload(ev)?).await,
        "invitation.requested" => email::handle_invitation(ctx, payload(ev)?).await,
        "email.requested" => email::handle_notice(ctx, payload(ev)?, ev).await,
        "association.requested" => association::handle(ctx, payload(ev)?).await,
        "export.requested" => export::handle(ctx, payload(ev)?).await,
        "sweep.requested" => sweeps::handle(ctx, payload_or_default(ev)?).await,
        "deadline.tick" => deadlines::handle(ctx, payload_or_default(ev)?).await,
        other => Err(JobError::fatal(
            "unknown_type",
            format!("no handler for message type `{other}`"),
        )),
    }
}

/// Called once when a job has used up its retries, before it is dead-lettered,
/// so the handler can record the final failure.
pub async fn exhausted(ctx: &Ctx, ev: &CloudEvent, last_error: &str) {
    let result = match ev.ty.as_str() {
        "invitation.requested" => match payload::<email::InvitationJob>(ev) {
            Ok(job) => email::fail_invitation(ctx, job.invitation_id, last_error).await,
            Err(_) => Ok(()),
        },
        "association.requested" => match payload::<association::AssociationRequested>(ev) {
            Ok(job) => association::give_up(ctx, job).await,
            Err(_) => Ok(()),
        },
        "export.requested" => match payload::<export::ExportRequested>(ev) {
            Ok(job) => export::give_up(ctx, job, last_error).await,
            Err(_) => Ok(()),
        },
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "could not record the final failure");
    }
}
