//! Scheduled runs (the expiry sweep, review deadlines): "skip if already
//! ran" and "record a complete run", once for all of them.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{context::Ctx, store};

/// A tick scheduled at `scheduled_at` is redundant if a run that started at
/// or after that time already completed (another node, or a redelivery).
/// A tick without a schedule (an operator's request) always runs.
pub async fn already_ran(
    ctx: &Ctx,
    name: &str,
    scheduled_at: Option<DateTime<Utc>>,
) -> Result<bool, sqlx::Error> {
    let Some(at) = scheduled_at else {
        return Ok(false);
    };
    Ok(store::calendar::last_run(&ctx.db, name)
        .await?
        .is_some_and(|(last, _)| last >= at))
}

/// Records a complete run that started at `started_at`, and its gauge.
pub async fn record(
    ctx: &Ctx,
    name: &'static str,
    started_at: DateTime<Utc>,
    stats: &impl Serialize,
) -> Result<(), sqlx::Error> {
    let stats = serde_json::to_value(stats).unwrap_or_default();
    store::calendar::record_run(&ctx.db, name, started_at, &stats).await?;
    metrics::gauge!("prereg_sweep_last_success_timestamp_seconds", "sweep" => name)
        .set(started_at.timestamp() as f64);
    Ok(())
}
