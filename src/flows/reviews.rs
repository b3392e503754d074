//! Manual reviews (SPEC §1 "Manual review"): opened by the registration
//! worker on `review.requested`, decided by an operator (API, dashboard).

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::{claims, FlowError};
use crate::{
    context::Ctx,
    domain::{eligibility::quota_reached, status::ReviewState, Status},
    jobs::ReviewRequested,
    mq::CloudEvent,
    store::{self, preregs, reviews, TimelineEntry},
};

/// What opening a review did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The review is open with its deadline; the claim is `under_review`.
    Open,
    /// The review was refused with this code (not reviewable, quota, partner).
    Refused(&'static str),
    /// It was opened (or refused) before: a redelivery.
    AlreadyOpened,
}

/// Opens a queued review: checks it may be reviewed, computes its deadline,
/// puts the pre-registration `under_review`, writes the timeline entry and
/// `review.submitted`, all in one transaction. A refusal is recorded too.
pub async fn open(ctx: &Ctx, cmd: &ReviewRequested, actor: &str) -> Result<Opened, FlowError> {
    let mut tx = ctx.db.begin().await?;
    let review = reviews::get_for_update(&mut tx, cmd.review_id)
        .await?
        .ok_or(FlowError::NotFound("review"))?;
    if review.state != ReviewState::Queued {
        return Ok(Opened::AlreadyOpened);
    }
    let p = preregs::get_for_update(&mut tx, review.preregistration_id)
        .await?
        .ok_or(FlowError::NotFound("pre-registration"))?;
    let partner = store::partners::get_for_update(&mut tx, p.partner_id).await?;
    let refusal = if p.status() != Status::Rejected || !p.manual_review_eligible {
        Some("not_reviewable")
    } else if quota_reached(
        preregs::count_quota(&mut tx, p.partner_id).await?,
        ctx.cfg.partner_quota,
    ) {
        Some("quota_exceeded")
    } else if partner.is_none() {
        Some("unknown_partner")
    } else {
        None
    };
    if let Some(code) = refusal {
        reviews::refuse(&mut tx, review.id, code).await?;
        store::record(
            &mut tx,
            TimelineEntry {
                preregistration_id: p.id,
                actor,
                change: "review_refused",
                from_status: Some(p.status.as_str()),
                to_status: Some(p.status.as_str()),
                reason: Some(code),
                details: Some(json!({"review_id": review.id})),
            },
        )
        .await?;
        tx.commit().await?;
        return Ok(Opened::Refused(code));
    }
    let opened_at = Utc::now();
    let due = ctx.review_due(opened_at).await?;
    if due.calendar_missing {
        metrics::counter!("prereg_calendar_missing_total").increment(1);
        tracing::warn!(review_id = %review.id, "review deadline reaches past the loaded calendar (calendar_missing)");
    }
    reviews::open(&mut tx, review.id, opened_at, due.at, due.calendar_missing).await?;
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
    store::outbox::event(&mut tx, &ev.subject(p.id)).await?;
    tx.commit().await?;
    Ok(Opened::Open)
}

/// An operator decides an open or overdue review: approval grants the claim
/// (through the same [`claims::grant`] as registration), rejection ends it
/// as `review_rejected` with the note. Row, timeline entry and
/// `review.decided` in one transaction. Returns the decided review.
pub async fn decide(
    ctx: &Ctx,
    actor: &str,
    id: Uuid,
    approve: bool,
    note: Option<&str>,
) -> Result<reviews::Review, FlowError> {
    let mut tx = ctx.db.begin().await?;
    let review = reviews::get_for_update(&mut tx, id)
        .await?
        .ok_or(FlowError::NotFound("review"))?;
    match Some(review.state) {
        Some(s) if s.undecided() => {}
        Some(ReviewState::Queued) => {
            return Err(FlowError::Conflict(
                "review_not_open",
                "the review request is still being processed".into(),
            ))
        }
        _ => {
            return Err(FlowError::Conflict(
                "already_decided",
                "this review has already been decided".into(),
            ))
        }
    }
    let p = preregs::get_for_update(&mut tx, review.preregistration_id)
        .await?
        .ok_or(FlowError::NotFound("pre-registration"))?;
    let (to, state) = if approve {
        if let Err(e) = claims::grant(&mut tx, p.id, Utc::now(), ctx.claim_validity()).await {
            if store::is_unique_violation(&e) {
                return Err(FlowError::Conflict(
                    "customer_claimed",
                    "another partner holds an active claim on this customer; reject the review instead"
                        .into(),
                ));
            }
            return Err(e.into());
        }
        (Status::Preregistered, ReviewState::Approved)
    } else {
        claims::reject_by_review(&mut tx, p.id, note.unwrap_or_default()).await?;
        (Status::ReviewRejected, ReviewState::Rejected)
    };
    let state = state.as_str();
    reviews::decide(&mut tx, id, state, actor, note).await?;
    store::record(
        &mut tx,
        TimelineEntry {
            preregistration_id: p.id,
            actor,
            change: "review_decided",
            from_status: Some(p.status.as_str()),
            to_status: Some(to.as_str()),
            reason: Some(state),
            details: Some(json!({"review_id": id, "note": note})),
        },
    )
    .await?;
    let ev = CloudEvent::with_id(
        format!("review.decided:{id}"),
        "review.decided",
        json!({"review_id": id, "preregistration_id": p.id, "partner_id": p.partner_id, "decision": state, "status": to}),
    )
    .subject(p.id);
    store::outbox::event(&mut tx, &ev).await?;
    tx.commit().await?;
    reviews::get(&ctx.db, id)
        .await?
        .ok_or(FlowError::NotFound("review"))
}
