//! `association.requested`: an adapter over [`crate::flows::association`].

use super::{JobError, Outcome};
use crate::{
    context::Ctx,
    flows::association::{self, Recorded},
};

pub use crate::jobs::AssociationRequested;

pub async fn handle(ctx: &Ctx, job: AssociationRequested) -> Result<Outcome, JobError> {
    match association::record(ctx, job.attempt_id).await? {
        Recorded::Done => Ok(Outcome::Done),
        Recorded::Skipped(why) => Ok(Outcome::Skipped(why)),
        Recorded::NotYet(why) => Err(JobError::Retryable(why)),
    }
}

/// Retries exhausted (e.g. the account's facts never arrived): `system_busy`.
pub async fn give_up(ctx: &Ctx, job: AssociationRequested) -> Result<(), sqlx::Error> {
    association::give_up(ctx, job.attempt_id).await
}
