//! Review deadlines (SPEC §1 "Manual review"), run on `deadline.tick`: an
//! adapter over [`crate::flows::deadlines`], which marks overdue reviews
//! (with their escalation) and sends due reminders.

use super::{JobError, Outcome};
use crate::{context::Ctx, flows};

pub use crate::flows::deadlines::{run, DeadlineStats, NAME};
pub use crate::jobs::DeadlineTick;
pub use crate::timekeeping::recompute_flagged;

pub async fn handle(ctx: &Ctx, tick: DeadlineTick) -> Result<Outcome, JobError> {
    if flows::runs::already_ran(ctx, NAME, tick.scheduled_at).await? {
        return Ok(Outcome::Skipped("already_checked"));
    }
    let stats = run(ctx).await?;
    if stats.overdue + stats.reminded > 0 {
        tracing::info!(
            overdue = stats.overdue,
            reminded = stats.reminded,
            "review deadlines"
        );
    }
    Ok(Outcome::Done)
}
