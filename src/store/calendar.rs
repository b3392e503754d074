//! The working-day calendar operators upload, one year at a time, and the
//! record of each sweep's last successful run.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, Row};

/// The run names `sweep_runs` records: the expiry sweep and the review
/// deadline check.
pub const SWEEP_RUN: &str = "expiry";
pub const DEADLINES_RUN: &str = "deadlines";

use crate::domain::workdays::{CalendarEntry, DayKind};

/// Replaces one year's overrides (the caller has validated them: every date
/// in `year`, no date twice). Loading an empty list marks the year loaded
/// with no overrides.
pub async fn replace_year(
    conn: &mut PgConnection,
    year: i32,
    entries: &[CalendarEntry],
) -> Result<DateTime<Utc>, sqlx::Error> {
    let loaded_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO calendar_years (year, loaded_at) VALUES ($1, now())
         ON CONFLICT (year) DO UPDATE SET loaded_at = now() RETURNING loaded_at",
    )
    .bind(year)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM calendar_days WHERE year = $1")
        .bind(year)
        .execute(&mut *conn)
        .await?;
    let dates: Vec<NaiveDate> = entries.iter().map(|e| e.date).collect();
    let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    sqlx::query(
        "INSERT INTO calendar_days (date, year, kind, name)
         SELECT d, $1, k, n FROM unnest($2::date[], $3::text[], $4::text[]) AS t(d, k, n)",
    )
    .bind(year)
    .bind(&dates)
    .bind(&kinds)
    .bind(&names)
    .execute(&mut *conn)
    .await?;
    Ok(loaded_at)
}

/// An uploaded year: when it was loaded and its overrides by date.
pub async fn get_year<'e>(
    db: impl PgExecutor<'e> + Copy,
    year: i32,
) -> Result<Option<(DateTime<Utc>, Vec<CalendarEntry>)>, sqlx::Error> {
    let loaded_at: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT loaded_at FROM calendar_years WHERE year = $1")
            .bind(year)
            .fetch_optional(db)
            .await?;
    let Some(loaded_at) = loaded_at else {
        return Ok(None);
    };
    let rows =
        sqlx::query("SELECT date, kind, name FROM calendar_days WHERE year = $1 ORDER BY date")
            .bind(year)
            .fetch_all(db)
            .await?;
    let entries = rows
        .into_iter()
        .map(|r| CalendarEntry {
            date: r.get("date"),
            kind: DayKind::parse(r.get::<&str, _>("kind")).unwrap_or(DayKind::Holiday),
            name: r.get("name"),
        })
        .collect();
    Ok(Some((loaded_at, entries)))
}

/// Records a successful run of the sweep `name` that started at `started_at`
/// (a run covers everything due when it started). Never moves backwards.
pub async fn record_run<'e>(
    db: impl PgExecutor<'e>,
    name: &str,
    started_at: DateTime<Utc>,
    stats: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sweep_runs (name, last_success_at, last_stats) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET last_success_at = GREATEST(sweep_runs.last_success_at, EXCLUDED.last_success_at),
            last_stats = EXCLUDED.last_stats",
    )
    .bind(name)
    .bind(started_at)
    .bind(stats)
    .execute(db)
    .await?;
    Ok(())
}

/// When the sweep `name` last succeeded, with its statistics.
pub async fn last_run<'e>(
    db: impl PgExecutor<'e>,
    name: &str,
) -> Result<Option<(DateTime<Utc>, Option<Value>)>, sqlx::Error> {
    let row = sqlx::query("SELECT last_success_at, last_stats FROM sweep_runs WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await?;
    Ok(row.map(|r| (r.get("last_success_at"), r.get("last_stats"))))
}

/// Every uploaded year with its overrides (a year may have none), by year.
pub async fn all_years<'e>(
    db: impl PgExecutor<'e>,
) -> Result<std::collections::BTreeMap<i32, Vec<CalendarEntry>>, sqlx::Error> {
    let rows = sqlx::query("SELECT y.year, d.date, d.kind, d.name FROM calendar_years y LEFT JOIN calendar_days d ON d.year = y.year ORDER BY y.year, d.date")
        .fetch_all(db)
        .await?;
    let mut years: std::collections::BTreeMap<i32, Vec<CalendarEntry>> = Default::default();
    for r in rows {
        let year: i32 = r.get("year");
        let entries = years.entry(year).or_default();
        if let Some(date) = r.get::<Option<chrono::NaiveDate>, _>("date") {
            let kind = if r.get::<&str, _>("kind") == "workday" {
                DayKind::Workday
            } else {
                DayKind::Holiday
            };
            entries.push(CalendarEntry {
                date,
                kind,
                name: r.get("name"),
            });
        }
    }
    Ok(years)
}
