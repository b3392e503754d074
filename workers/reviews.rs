//! `review.requested`: an adapter over [`crate::flows::reviews::open`].

use super::{JobError, Outcome};
use crate::{
    context::Ctx,
    flows::{self, reviews::Opened, FlowError},
    jobs::ReviewRequested,
};

const ACTOR: &str = "system:registration";

pub async fn handle(ctx: &Ctx, cmd: ReviewRequested) -> Result<Outcome, JobError> {
    match flows::reviews::open(ctx, &cmd, ACTOR).await {
        Ok(Opened::AlreadyOpened) => Ok(Outcome::Skipped("already_opened")),
        Ok(Opened::Open | Opened::Refused(_)) => Ok(Outcome::Done),
        Err(FlowError::NotFound("review")) => Err(JobError::fatal(
            "unknown_review",
            format!("review {} does not exist", cmd.review_id),
        )),
        Err(FlowError::NotFound(_)) => Err(JobError::fatal(
            "unknown_preregistration",
            "the review's pre-registration does not exist",
        )),
        Err(FlowError::Conflict(code, message)) => Err(JobError::fatal(code, message)),
        Err(FlowError::Db(e)) => Err(e.into()),
    }
}
