//! The expiry sweep (SPEC §5), run on `sweep.requested`: an adapter over
//! [`crate::flows::sweeps`], which expires claims and links and reminds
//! partners of expiring claims.

use super::{JobError, Outcome};
use crate::{context::Ctx, flows};

pub use crate::flows::claims::expired_event;
pub use crate::flows::sweeps::{expire_links, run, run_with_budget, SweepStats, NAME};
pub use crate::jobs::SweepRequested;

/// The statement that expires one batch of claims (for the benchmark's query plan).
pub fn expire_claims_sql() -> &'static str {
    crate::store::preregs::expire_claims_sql()
}

pub async fn handle(ctx: &Ctx, cmd: SweepRequested) -> Result<Outcome, JobError> {
    if flows::runs::already_ran(ctx, NAME, cmd.scheduled_at).await? {
        return Ok(Outcome::Skipped("already_swept"));
    }
    let stats = run(ctx).await?;
    if stats.claims_expired + stats.links_expired + stats.reminders > 0 {
        tracing::info!(
            claims_expired = stats.claims_expired,
            links_expired = stats.links_expired,
            reminders = stats.reminders,
            duration_ms = stats.duration_ms,
            "expiry sweep"
        );
    }
    Ok(Outcome::Done)
}
