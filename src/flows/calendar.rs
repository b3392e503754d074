//! The working-day calendar: loading a year (API and CLI alike) and the
//! review deadlines it changes.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::{config::ReviewSla, context::Ctx, domain::workdays::CalendarEntry, store};

/// Stores a year (replacing what it had, audited) and recomputes the
/// deadlines of open reviews that were computed without a calendar.
/// Returns when it was loaded and how many deadlines changed.
pub async fn load_year(
    ctx: &Ctx,
    actor: &str,
    year: i32,
    entries: &[CalendarEntry],
) -> Result<(DateTime<Utc>, u64), sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    let loaded_at = store::calendar::replace_year(&mut tx, year, entries).await?;
    store::audit(
        &mut tx,
        actor,
        "calendar.loaded",
        Some(&year.to_string()),
        Some(json!({"entries": entries.len()})),
    )
    .await?;
    tx.commit().await?;
    ctx.invalidate_calendar();
    let recomputed = recompute_flagged(ctx).await?;
    Ok((loaded_at, recomputed))
}

/// After a calendar upload: open reviews whose deadline was computed through
/// a year that was not loaded get their deadline computed again. Returns how
/// many changed.
pub async fn recompute_flagged(ctx: &Ctx) -> Result<u64, sqlx::Error> {
    if !matches!(ctx.cfg.review_sla, ReviewSla::WorkingDays(_)) {
        return Ok(0);
    }
    ctx.invalidate_calendar();
    let mut changed = 0;
    for (id, opened_at) in store::reviews::open_calendar_missing(&ctx.db).await? {
        let due = ctx.review_due(opened_at).await?;
        changed += store::reviews::redate(&ctx.db, id, due.at, due.calendar_missing).await?;
    }
    Ok(changed)
}
