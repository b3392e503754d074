//! Review deadlines (SPEC §1 "Manual review"), run on `deadline.tick`.
//!
//! - At the deadline an undecided review becomes `overdue`: in one
//!   transaction its state, `overdue_at` and `escalated_at` are set, a
//!   timeline entry is written, `review.overdue` is published and one
//!   escalation email to `PREREG_ESCALATION_EMAIL` is queued (outbox). The
//!   conditional `UPDATE … WHERE state = 'open'` over rows locked with
//!   `SKIP LOCKED` makes that exactly once, on any number of nodes, across
//!   restarts: a deadline that passed while every worker was down is found
//!   by the first tick after restart, and only once.
//! - `PREREG_REVIEW_REMINDER_BEFORE` ahead of the deadline one reminder goes
//!   to the reviewers (`PREREG_REVIEWER_EMAIL`), marked by `reminder_sent_at`.
//!   A review whose deadline has already passed is escalated, not reminded.
//!
//! Emails are `email.requested` commands (`kind` `review_reminder` or
//! `review_escalation`) consumed by the email worker.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use uuid::Uuid;

use super::{JobError, Outcome};
use crate::{
    config::ReviewSla,
    context::Ctx,
    jobs::{EmailRequested, NoticeKind},
    mq::CloudEvent,
    store,
};

/// The name of this job in `sweep_runs`.
pub const NAME: &str = "deadlines";
const ACTOR: &str = "system:deadlines";

pub use crate::jobs::DeadlineTick;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeadlineStats {
    pub overdue: u64,
    pub reminded: u64,
    pub duration_ms: u64,
}

pub async fn handle(ctx: &Ctx, tick: DeadlineTick) -> Result<Outcome, JobError> {
    if let Some(at) = tick.scheduled_at {
        if let Some((last, _)) = store::calendar::last_run(&ctx.db, NAME).await? {
            if last >= at {
                return Ok(Outcome::Skipped("already_checked"));
            }
        }
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

/// Marks overdue reviews (with their escalation), then sends due reminders.
pub async fn run(ctx: &Ctx) -> Result<DeadlineStats, sqlx::Error> {
    let started_at = Utc::now();
    let t0 = Instant::now();
    let batch = ctx.cfg.sweep_batch.clamp(1, 1000);
    let mut stats = DeadlineStats::default();
    loop {
        let n = overdue_batch(ctx, batch).await?;
        stats.overdue += n;
        if (n as i64) < batch {
            break;
        }
    }
    loop {
        let n = remind_batch(ctx, batch).await?;
        stats.reminded += n;
        if (n as i64) < batch {
            break;
        }
    }
    stats.duration_ms = t0.elapsed().as_millis() as u64;
    store::calendar::record_run(
        &ctx.db,
        NAME,
        started_at,
        &serde_json::to_value(&stats).unwrap_or_default(),
    )
    .await?;
    metrics::counter!("prereg_reviews_escalated_total").increment(stats.overdue);
    metrics::counter!("prereg_review_reminders_total").increment(stats.reminded);
    metrics::gauge!("prereg_sweep_last_success_timestamp_seconds", "sweep" => NAME)
        .set(started_at.timestamp() as f64);
    let overdue: i64 = sqlx::query_scalar("SELECT count(*) FROM reviews WHERE state = 'overdue'")
        .fetch_one(&ctx.db)
        .await?;
    metrics::gauge!("prereg_reviews_overdue").set(overdue as f64);
    Ok(stats)
}

async fn overdue_batch(ctx: &Ctx, batch: i64) -> Result<u64, sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    let rows = sqlx::query(
        "WITH due AS (
            SELECT id FROM reviews
            WHERE state = 'open' AND due_at <= now()
            ORDER BY due_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         ), marked AS (
            UPDATE reviews r SET state = 'overdue', overdue_at = now(), escalated_at = now()
            FROM due WHERE r.id = due.id AND r.state = 'open'
            RETURNING r.id, r.preregistration_id, r.partner_id, r.due_at, r.overdue_at
         ), timeline AS (
            INSERT INTO preregistration_events (preregistration_id, actor, change, from_status, to_status, reason, details)
            SELECT preregistration_id, $2, 'review_overdue', 'under_review', 'under_review', 'review_deadline_passed',
                   jsonb_build_object('review_id', id, 'due_at', due_at)
            FROM marked
         )
         SELECT id, preregistration_id, partner_id, due_at, overdue_at FROM marked",
    )
    .bind(batch)
    .bind(ACTOR)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let mut events = Vec::with_capacity(rows.len());
    let mut emails = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: Uuid = r.get("id");
        let prereg: Uuid = r.get("preregistration_id");
        let partner: Uuid = r.get("partner_id");
        let due_at: Option<DateTime<Utc>> = r.get("due_at");
        let overdue_at: Option<DateTime<Utc>> = r.get("overdue_at");
        events.push(
            CloudEvent::with_id(
                format!("review.overdue:{id}"),
                "review.overdue",
                json!({"review_id": id, "preregistration_id": prereg, "partner_id": partner,
                       "due_at": due_at, "overdue_at": overdue_at}),
            )
            .subject(prereg),
        );
        emails.push(
            super::outbox_job(
                format!("email:review_escalation:{id}"),
                &EmailRequested {
                    kind: NoticeKind::ReviewEscalation,
                    attempt_id: None,
                    review_id: Some(id),
                    preregistration_id: Some(prereg),
                },
            )?
            .subject(prereg),
        );
        tracing::warn!(review_id = %id, "review overdue; escalated");
    }
    store::outbox::events(&mut tx, &events).await?;
    store::outbox::commands(&mut tx, &emails).await?;
    tx.commit().await?;
    Ok(rows.len() as u64)
}

async fn remind_batch(ctx: &Ctx, batch: i64) -> Result<u64, sqlx::Error> {
    let before_ms = ctx
        .cfg
        .review_reminder_before
        .as_millis()
        .min(i64::MAX as u128) as i64;
    let mut tx = ctx.db.begin().await?;
    let rows = sqlx::query(
        "WITH due AS (
            SELECT id FROM reviews
            WHERE state = 'open' AND reminder_sent_at IS NULL
              AND due_at > now() AND due_at <= now() + $2 * interval '1 millisecond'
            ORDER BY due_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
         )
         UPDATE reviews r SET reminder_sent_at = now()
         FROM due WHERE r.id = due.id AND r.state = 'open' AND r.reminder_sent_at IS NULL
         RETURNING r.id, r.preregistration_id, r.partner_id, r.due_at",
    )
    .bind(batch)
    .bind(before_ms)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let emails = rows
        .iter()
        .map(|r| {
            let id: Uuid = r.get("id");
            let prereg: Uuid = r.get("preregistration_id");
            Ok(super::outbox_job(
                format!("email:review_reminder:{id}"),
                &EmailRequested {
                    kind: NoticeKind::ReviewReminder,
                    attempt_id: None,
                    review_id: Some(id),
                    preregistration_id: Some(prereg),
                },
            )?
            .subject(prereg))
        })
        .collect::<Result<Vec<CloudEvent>, sqlx::Error>>()?;
    store::outbox::commands(&mut tx, &emails).await?;
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// After a calendar upload: open reviews whose deadline was computed through
/// a year that was not loaded get their deadline computed again. Returns how
/// many changed.
pub async fn recompute_flagged(ctx: &Ctx) -> Result<u64, sqlx::Error> {
    if !matches!(ctx.cfg.review_sla, ReviewSla::WorkingDays(_)) {
        return Ok(0);
    }
    ctx.invalidate_calendar();
    let rows = sqlx::query(
        "SELECT id, opened_at FROM reviews WHERE state = 'open' AND calendar_missing AND opened_at IS NOT NULL",
    )
    .fetch_all(&ctx.db)
    .await?;
    let mut changed = 0;
    for r in rows {
        let id: Uuid = r.get("id");
        let opened_at: DateTime<Utc> = r.get("opened_at");
        let due = ctx.review_due(opened_at).await?;
        let n = sqlx::query(
            "UPDATE reviews SET due_at = $2, calendar_missing = $3
             WHERE id = $1 AND state = 'open' AND calendar_missing",
        )
        .bind(id)
        .bind(due.at)
        .bind(due.calendar_missing)
        .execute(&ctx.db)
        .await?
        .rows_affected();
        changed += n;
    }
    Ok(changed)
}
