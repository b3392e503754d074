//! One module per job kind, each a small `handle(ctx, job)` over its typed
//! contract from [`crate::jobs`]; the shared runtime maps outcomes to ack,
//! delayed retry or dead letter.
//!
//! This folder sits at the top of the repository (next to `src/`), as the
//! project's layout requires; `src/lib.rs` mounts it with `#[path]`.

pub mod accounts;
pub mod association;
pub mod deadlines;
pub mod email;
pub mod export;
pub mod registration;
pub mod reviews;
pub mod runtime;
pub mod sweeps;

use thiserror::Error;

use crate::{
    context::Ctx,
    jobs::{
        self, AccountUpserted, AssociationRequested, DeadlineTick, EmailRequested, ExportRequested,
        InvitationRequested, Job, PreregistrationRequested, ReviewRequested, SweepRequested,
    },
    mq::{CloudEvent, Queue},
};

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

/// Why a job did not succeed. Errors from the database and the broker keep
/// their source; [`JobError::disposition`] decides retry or dead letter.
#[derive(Debug, Error)]
pub enum JobError {
    /// Try again later (service down, lock busy, conflict).
    #[error("retryable: {0}")]
    Retryable(String),
    /// Never going to work: dead-letter with this reason.
    #[error("fatal ({code}): {message}")]
    Fatal { code: &'static str, message: String },
    /// A database error, classified by [`classify_db`].
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The broker did not take a message (always worth a retry).
    #[error("broker: {0}")]
    Broker(#[from] crate::mq::PublishError),
}

/// What the runtime does with a failed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Retry(String),
    DeadLetter { code: &'static str, message: String },
}

impl Disposition {
    /// The same, with email addresses and phone numbers masked in the message.
    pub fn masked(self) -> Self {
        match self {
            Disposition::Retry(m) => Disposition::Retry(crate::domain::mask::text(&m)),
            Disposition::DeadLetter { code, message } => Disposition::DeadLetter {
                code,
                message: crate::domain::mask::text(&message),
            },
        }
    }
}

impl JobError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        JobError::Fatal {
            code,
            message: message.into(),
        }
    }

    pub fn disposition(&self) -> Disposition {
        match self {
            JobError::Retryable(m) => Disposition::Retry(m.clone()),
            JobError::Fatal { code, message } => Disposition::DeadLetter {
                code,
                message: message.clone(),
            },
            JobError::Db(e) => classify_db(e),
            JobError::Broker(e) => Disposition::Retry(format!("broker: {e}")),
        }
    }
}

/// Database errors: a serialization failure, deadlock, lock or statement
/// timeout, shutdown or lost connection is worth a retry; a constraint
/// (`23…`) or data (`22…`) violation will fail the same way every time and is
/// dead-lettered at once, naming the constraint. Anything else is retried
/// (bounded by the retry schedule), as before this classification.
pub fn classify_db(e: &sqlx::Error) -> Disposition {
    if let sqlx::Error::Database(db) = e {
        let state = db.code().map(|c| c.into_owned()).unwrap_or_default();
        let constraint = db
            .constraint()
            .map(|c| format!(" (constraint {c})"))
            .unwrap_or_default();
        let message = format!("database: {}{constraint} [{state}]", db.message());
        return match state.get(..2) {
            Some("23") => Disposition::DeadLetter {
                code: "constraint_violation",
                message,
            },
            Some("22") => Disposition::DeadLetter {
                code: "data_exception",
                message,
            },
            _ => Disposition::Retry(message),
        };
    }
    Disposition::Retry(format!("database: {e}"))
}

/// The message for a job written to the outbox inside a transaction.
pub use crate::flows::outbox_job;

/// Reads a job's payload; one that does not fit is a poison message.
pub fn payload<J: Job>(ev: &CloudEvent) -> Result<J, JobError> {
    ev.decode::<J>()
        .map_err(|e| JobError::fatal("invalid_payload", format!("{}: {e}", ev.ty)))
}

/// Routes a job to its handler by message type, only if that type is bound to
/// the queue it arrived on (anything else is dead-lettered with its reason).
pub async fn dispatch(ctx: &Ctx, q: Queue, ev: &CloudEvent) -> Result<Outcome, JobError> {
    let Some(contract) = jobs::contract_of(&ev.ty) else {
        return Err(JobError::fatal(
            "unknown_type",
            format!("no handler for message type `{}`", ev.ty),
        ));
    };
    if contract.queue != q {
        return Err(JobError::fatal(
            "wrong_queue",
            format!(
                "message type `{}` is not bound to the {} queue",
                ev.ty,
                q.short()
            ),
        ));
    }
    match ev.ty.as_str() {
        PreregistrationRequested::TYPE => registration::handle(ctx, ev).await,
        ReviewRequested::TYPE => reviews::handle(ctx, payload(ev)?).await,
        AccountUpserted::TYPE => accounts::handle(ctx, payload::<AccountUpserted>(ev)?.0).await,
        InvitationRequested::TYPE => email::handle_invitation(ctx, payload(ev)?).await,
        EmailRequested::TYPE => email::handle_notice(ctx, payload(ev)?, ev).await,
        AssociationRequested::TYPE => association::handle(ctx, payload(ev)?).await,
        ExportRequested::TYPE => export::handle(ctx, payload(ev)?).await,
        SweepRequested::TYPE => sweeps::handle(ctx, payload(ev)?).await,
        DeadlineTick::TYPE => deadlines::handle(ctx, payload(ev)?).await,
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
        InvitationRequested::TYPE => match ev.decode::<InvitationRequested>() {
            Ok(job) => email::give_up_invitation(ctx, job.invitation_id, last_error).await,
            Err(_) => Ok(()),
        },
        AssociationRequested::TYPE => match ev.decode::<AssociationRequested>() {
            Ok(job) => association::give_up(ctx, job).await,
            Err(_) => Ok(()),
        },
        ExportRequested::TYPE => match ev.decode::<ExportRequested>() {
            Ok(job) => export::give_up(ctx, job, last_error).await,
            Err(_) => Ok(()),
        },
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "could not record the final failure");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct FakeDb {
        code: &'static str,
        constraint: Option<&'static str>,
    }
    impl std::fmt::Display for FakeDb {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fake {}", self.code)
        }
    }
    impl std::error::Error for FakeDb {}
    impl sqlx::error::DatabaseError for FakeDb {
        fn message(&self) -> &str {
            "fake failure"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.code.into())
        }
        fn constraint(&self) -> Option<&str> {
            self.constraint
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }
    fn db(code: &'static str, constraint: Option<&'static str>) -> JobError {
        JobError::from(sqlx::Error::Database(Box::new(FakeDb { code, constraint })))
    }

    #[test]
    fn transient_database_errors_are_retried() {
        for code in ["40001", "40P01", "55P03", "57014", "57P01", "08006"] {
            assert!(
                matches!(db(code, None).disposition(), Disposition::Retry(_)),
                "{code}"
            );
        }
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        ] {
            assert!(matches!(
                JobError::from(e).disposition(),
                Disposition::Retry(_)
            ));
        }
    }

    #[test]
    fn constraint_and_data_violations_are_fatal_and_name_the_constraint() {
        let d = db("23514", Some("preregistrations_status_check")).disposition();
        let Disposition::DeadLetter { code, message } = d else {
            panic!("{d:?}")
        };
        assert_eq!(code, "constraint_violation");
        assert!(
            message.contains("preregistrations_status_check"),
            "{message}"
        );
        for c in ["23505", "23503", "23502"] {
            assert!(matches!(
                db(c, Some("k")).disposition(),
                Disposition::DeadLetter {
                    code: "constraint_violation",
                    ..
                }
            ));
        }
        assert!(matches!(
            db("22P02", None).disposition(),
            Disposition::DeadLetter {
                code: "data_exception",
                ..
            }
        ));
    }

    #[test]
    fn the_source_error_is_kept() {
        let e = db("23514", Some("c"));
        assert!(std::error::Error::source(&e).is_some());
    }
}
