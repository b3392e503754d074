//! Registration: decides pre-registrations (SPEC §1) and opens manual reviews.
//!
//! The decision itself is [`crate::flows::registration`] (a batch of
//! commands in one transaction, with the customer locks of the batch); this
//! module maps its verdicts onto the worker runtime's outcomes. The runtime
//! hands it a batch of deliveries at a time ([`handle_batch`]); [`handle`]
//! decides one.

use std::time::Instant;

use chrono::Utc;
use rand::Rng;
use serde_json::json;

use super::{JobError, Outcome};
use crate::{
    context::Ctx,
    domain::Status,
    flows::registration::{self as flow, Failure, Request, Verdict},
    jobs::PreregistrationRequested,
    mq::CloudEvent,
    store::{self, outbox, preregs, TimelineEntry},
};

const ACTOR: &str = flow::ACTOR;

/// What became of one delivery of a batch.
#[derive(Debug)]
pub enum Step {
    /// Settle it: acknowledge, retry later or dead-letter.
    Settled(Result<Outcome, JobError>),
    /// Another worker holds this customer's lock right now: hold the
    /// delivery (unacknowledged) and offer it to a later batch.
    Busy,
}

/// Decides a batch of `preregistration.requested` deliveries, in their
/// order, and answers one step per delivery (in the same order).
pub async fn handle_batch(ctx: &Ctx, evs: &[&CloudEvent]) -> Vec<Step> {
    let mut steps: Vec<Option<Step>> = evs.iter().map(|_| None).collect();
    let mut reqs = Vec::with_capacity(evs.len());
    let mut at = Vec::with_capacity(evs.len());
    for (i, ev) in evs.iter().enumerate() {
        match super::payload::<PreregistrationRequested>(ev) {
            Ok(cmd) => {
                reqs.push(Request::from_event(cmd, ev));
                at.push(i);
            }
            Err(e) => steps[i] = Some(Step::Settled(Err(e))),
        }
    }
    if !reqs.is_empty() {
        for (i, v) in at.into_iter().zip(flow::decide_batch(ctx, &reqs).await) {
            steps[i] = Some(step(v));
        }
    }
    steps
        .into_iter()
        .map(|s| s.unwrap_or_else(|| Step::Settled(Err(JobError::Retryable("not decided".into())))))
        .collect()
}

fn step(v: Verdict) -> Step {
    Step::Settled(match v {
        Verdict::Decided(_) => Ok(Outcome::Done),
        Verdict::Skipped(why) => Ok(Outcome::Skipped(why)),
        Verdict::Busy => return Step::Busy,
        Verdict::Failed(Failure::Fatal { code, message }) => Err(JobError::Fatal { code, message }),
        Verdict::Failed(Failure::Retry(m)) => Err(JobError::Retryable(m)),
        Verdict::Failed(Failure::Db(e)) => Err(JobError::Db(e)),
    })
}

/// Decides one delivery, waiting up to `PREREG_LOCK_WAIT` for its
/// customer's locks.
pub async fn handle(ctx: &Ctx, ev: &CloudEvent) -> Result<Outcome, JobError> {
    let started = Instant::now();
    loop {
        match handle_batch(ctx, &[ev]).await.pop() {
            Some(Step::Settled(r)) => return r,
            Some(Step::Busy) if started.elapsed() < ctx.cfg.lock_wait => {
                let pause = rand::thread_rng().gen_range(2..15);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            _ => return Err(JobError::Retryable("customer lock busy".into())),
        }
    }
}

pub use crate::jobs::ReviewRequested;

pub async fn handle_review(ctx: &Ctx, cmd: ReviewRequested) -> Result<Outcome, JobError> {
    let mut tx = ctx.db.begin().await?;
    let Some(review) = store::reviews::get_for_update(&mut tx, cmd.review_id).await? else {
        return Err(JobError::fatal(
            "unknown_review",
            format!("review {} does not exist", cmd.review_id),
        ));
    };
    if review.state != "queued" {
        return Ok(Outcome::Skipped("already_opened"));
    }
    let Some(p) = preregs::get_for_update(&mut tx, review.preregistration_id).await? else {
        return Err(JobError::fatal(
            "unknown_preregistration",
            "the review's pre-registration does not exist",
        ));
    };
    let partner = store::partners::get_for_update(&mut tx, p.partner_id).await?;
    let refusal = if p.status() != Status::Rejected || !p.manual_review_eligible {
        Some("not_reviewable")
    } else if preregs::count_quota(&mut tx, p.partner_id).await? >= ctx.cfg.partner_quota {
        Some("quota_exceeded")
    } else if partner.is_none() {
        Some("unknown_partner")
    } else {
        None
    };
    if let Some(code) = refusal {
        store::reviews::refuse(&mut tx, review.id, code).await?;
        store::record(
            &mut tx,
            TimelineEntry {
                preregistration_id: p.id,
                actor: ACTOR,
                change: "review_refused",
                from_status: Some(p.status.as_str()),
                to_status: Some(p.status.as_str()),
                reason: Some(code),
                details: Some(json!({"review_id": review.id})),
            },
        )
        .await?;
        tx.commit().await?;
        return Ok(Outcome::Done);
    }
    let now = Utc::now();
    let due = ctx.review_due(now).await?;
    if due.calendar_missing {
        metrics::counter!("prereg_calendar_missing_total").increment(1);
        tracing::warn!(review_id = %review.id, "review deadline reaches past the loaded calendar (calendar_missing)");
    }
    store::reviews::open(&mut tx, review.id, due.at, due.calendar_missing).await?;
    preregs::set_status(&mut tx, p.id, Status::UnderReview).await?;
    store::record(
        &mut tx,
        TimelineEntry {
            preregistration_id: p.id,
            actor: &format!("partner:{}", p.partner_id),
            change: "review_requested",
            from_status: Some("rejected"),
            to_status: Some("under_review"),
            reason: p.reason_code.as_deref(),
            details: Some(json!({"review_id": review.id, "due_at": due.at})),
        },
    )
    .await?;
    let ev = CloudEvent::with_id(
        format!("review.submitted:{}", review.id),
        "review.submitted",
        json!({"review_id": review.id, "preregistration_id": p.id, "partner_id": p.partner_id, "due_at": due.at}),
    );
    outbox::event(&mut tx, &ev.subject(p.id)).await?;
    tx.commit().await?;
    Ok(Outcome::Done)
}
