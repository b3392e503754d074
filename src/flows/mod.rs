//! State changes: one function per change of a pre-registration, a review,
//! an invitation, an association attempt, an export or the calendar. Each
//! writes its row, its timeline entry and its outbox event in one
//! transaction. HTTP handlers (`src/api/`), the CLI (`src/admin_cli.rs`) and
//! the job consumers (`workers/`) are adapters over these functions; the SQL
//! itself is in `src/store/`, the rules in `src/domain/`.

pub mod association;
pub mod calendar;
pub mod claims;
pub mod deadlines;
mod error;
pub mod exports;
pub mod invitations;
pub mod registration;
pub mod reviews;
pub mod runs;
pub mod sweeps;

pub use error::FlowError;

use crate::{jobs::Job, mq::CloudEvent};

/// The message for a job written to the outbox inside a transaction (an
/// encoding failure fails the transaction, as any failed write does).
pub fn outbox_job<J: Job>(id: impl Into<String>, job: &J) -> Result<CloudEvent, sqlx::Error> {
    CloudEvent::job(id, job).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// A duration in whole milliseconds, as SQL takes it (saturating).
pub(crate) fn millis(d: std::time::Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Ends one batch of reminders: the `marked` rows' email jobs go to the
/// outbox and the batch commits; a batch that marked nothing is rolled back.
/// Returns how many rows were marked.
pub(crate) async fn commit_reminders(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    marked: usize,
    emails: &[CloudEvent],
) -> Result<u64, sqlx::Error> {
    if marked == 0 {
        tx.rollback().await?;
        return Ok(0);
    }
    crate::store::outbox::commands(&mut tx, emails).await?;
    tx.commit().await?;
    Ok(marked as u64)
}
