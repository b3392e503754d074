//! Review deadlines (SPEC §1 "Manual review"): the state changes of one
//! `deadline.tick`.
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

use chrono::Utc;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use super::outbox_job;
use crate::{
    context::Ctx,
    jobs::{EmailRequested, NoticeKind},
    mq::CloudEvent,
    store,
};

/// The name of this job in `sweep_runs`.
pub const NAME: &str = store::calendar::DEADLINES_RUN;
const ACTOR: &str = "system:deadlines";

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeadlineStats {
    pub overdue: u64,
    pub reminded: u64,
    pub duration_ms: u64,
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
    super::runs::record(ctx, NAME, started_at, &stats).await?;
    metrics::counter!("prereg_reviews_escalated_total").increment(stats.overdue);
    metrics::counter!("prereg_review_reminders_total").increment(stats.reminded);
    let overdue = store::reviews::count_overdue(&ctx.db).await?;
    metrics::gauge!("prereg_reviews_overdue").set(overdue as f64);
    Ok(stats)
}

async fn overdue_batch(ctx: &Ctx, batch: i64) -> Result<u64, sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    let rows = store::reviews::mark_overdue(&mut tx, batch, ACTOR).await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let mut events = Vec::with_capacity(rows.len());
    let mut emails = Vec::with_capacity(rows.len());
    for r in &rows {
        let (id, prereg) = (r.id, r.preregistration_id);
        events.push(
            CloudEvent::with_id(
                format!("review.overdue:{id}"),
                "review.overdue",
                json!({"review_id": id, "preregistration_id": prereg, "partner_id": r.partner_id,
                       "due_at": r.due_at, "overdue_at": r.overdue_at}),
            )
            .subject(prereg),
        );
        emails.push(review_email(NoticeKind::ReviewEscalation, id, prereg)?);
        tracing::warn!(review_id = %id, "review overdue; escalated");
    }
    store::outbox::events(&mut tx, &events).await?;
    store::outbox::commands(&mut tx, &emails).await?;
    tx.commit().await?;
    Ok(rows.len() as u64)
}

async fn remind_batch(ctx: &Ctx, batch: i64) -> Result<u64, sqlx::Error> {
    let before_ms = super::millis(ctx.cfg.review_reminder_before);
    let mut tx = ctx.db.begin().await?;
    let rows = store::reviews::mark_reminders(&mut tx, batch, before_ms).await?;
    let emails = rows
        .iter()
        .map(|r| review_email(NoticeKind::ReviewReminder, r.id, r.preregistration_id))
        .collect::<Result<Vec<CloudEvent>, sqlx::Error>>()?;
    super::commit_reminders(tx, rows.len(), &emails).await
}

/// The email job of a review notice (one per review and kind).
fn review_email(kind: NoticeKind, id: Uuid, prereg: Uuid) -> Result<CloudEvent, sqlx::Error> {
    Ok(outbox_job(
        format!("email:{}:{id}", kind.as_str()),
        &EmailRequested {
            kind,
            attempt_id: None,
            review_id: Some(id),
            preregistration_id: Some(prereg),
        },
    )?
    .subject(prereg))
}
