//! What operators see of time without reading logs: the calendar's coverage
//! (`/readyz` details, `prereg_calendar_missing`), the age of the last
//! successful sweep and the number of overdue reviews (`/metrics`).
//!
//! `calendar_missing` is raised when
//! - an undecided review has a deadline computed through a year whose
//!   calendar is not loaded (weekends only there), or
//! - a review opened now would have such a deadline (with a working-day SLA):
//!   the calendar does not reach far enough ahead.
//!
//! It is a warning, not a readiness failure: deadlines are still computed.
//! `next_year_loaded` is shown as well, as an early hint to upload.

use std::time::Duration;

use chrono::{Datelike, Utc};
use serde::Serialize;

use crate::{config::ReviewSla, context::Ctx, store};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CalendarStatus {
    pub loaded_years: Vec<i32>,
    pub current_year: i32,
    pub current_year_loaded: bool,
    pub next_year_loaded: bool,
    /// Undecided reviews whose deadline was computed without a calendar.
    pub open_reviews_calendar_missing: i64,
    /// A review opened now would have its deadline computed without a calendar.
    pub new_deadlines_calendar_missing: bool,
    pub calendar_missing: bool,
}

pub async fn calendar_status(ctx: &Ctx) -> Result<CalendarStatus, sqlx::Error> {
    let cal = ctx.calendar().await?;
    let now = Utc::now();
    let current_year = now.with_timezone(&ctx.cfg.timezone).year();
    let loaded_years = cal.loaded_years();
    let flagged = store::reviews::count_calendar_missing(&ctx.db).await?;
    let new_missing = match ctx.cfg.review_sla {
        ReviewSla::WorkingDays(n) => {
            cal.add_working_days(now, n, ctx.cfg.timezone)
                .calendar_missing
        }
        ReviewSla::Plain(_) => false,
    };
    Ok(CalendarStatus {
        current_year_loaded: loaded_years.contains(&current_year),
        next_year_loaded: loaded_years.contains(&(current_year + 1)),
        loaded_years,
        current_year,
        open_reviews_calendar_missing: flagged,
        new_deadlines_calendar_missing: new_missing,
        calendar_missing: flagged > 0 || new_missing,
    })
}

/// Sets the time gauges from Postgres (a few index lookups; called on every
/// scrape of `/metrics`, so every process reports them).
pub async fn refresh_gauges(ctx: &Ctx) {
    let work = async {
        let now = Utc::now();
        for name in [store::calendar::SWEEP_RUN, store::calendar::DEADLINES_RUN] {
            if let Some((at, _)) = store::calendar::last_run(&ctx.db, name).await? {
                let age = (now - at).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::gauge!("prereg_sweep_last_success_age_seconds", "sweep" => name).set(age);
                metrics::gauge!("prereg_sweep_last_success_timestamp_seconds", "sweep" => name)
                    .set(at.timestamp() as f64);
            }
        }
        let overdue = store::reviews::count_overdue(&ctx.db).await?;
        metrics::gauge!("prereg_reviews_overdue").set(overdue as f64);
        let cal = calendar_status(ctx).await?;
        metrics::gauge!("prereg_calendar_missing").set(if cal.calendar_missing {
            1.0
        } else {
            0.0
        });
        Ok::<_, sqlx::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), work).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "time gauges not refreshed"),
        Err(_) => tracing::debug!("time gauges not refreshed: timeout"),
    }
}

pub use crate::flows::calendar::recompute_flagged;
