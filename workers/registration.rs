//! Registration: decides pre-registrations (SPEC §1) and opens manual reviews.
//!
//! Concurrency: Redis locks on the normalised email and mobile keep two
//! workers from deciding the same customer at once; inside the transaction the
//! partner row is locked (quota) and the partial unique indexes on active
//! claims are the final guarantee, so a Redis outage costs speed only.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{JobError, Outcome};
use crate::{
    context::Ctx,
    domain::{self, mask, Decision, EligibilityInput, Status},
    locks::LockError,
    mq::CloudEvent,
    store::{self, outbox, preregs, preregs::NewPrereg, TimelineEntry},
};

const ACTOR: &str = "system:registration";

pub async fn handle(ctx: &Ctx, cmd: NewPrereg, ev: &CloudEvent) -> Result<Outcome, JobError> {
    // Commands may come straight from upstream systems: check them as the intake does.
    let as_json = serde_json::to_value(&cmd).unwrap_or_default();
    if let Err(errors) = domain::validate::prereg_request(&as_json) {
        let fields: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        return Err(JobError::fatal("invalid_payload", fields.join("; ")));
    }
    match preregs::get(&ctx.db, cmd.id).await? {
        Some(p) if p.partner_id != cmd.partner_id => {
            return Err(JobError::fatal(
                "id_conflict",
                "the id names another partner's pre-registration",
            ));
        }
        Some(p) if p.status() != Status::Queued => return Ok(Outcome::Skipped("already_decided")),
        Some(_) => {}
        None => {
            let partner = store::partners::get(&ctx.db, cmd.partner_id).await?;
            let Some(partner) = partner else {
                return Err(JobError::fatal(
                    "unknown_partner",
                    format!("partner {} does not exist", cmd.partner_id),
                ));
            };
            if !partner.customer_development {
                return Err(JobError::fatal(
                    "customer_development_disabled",
                    "the partner may not pre-register customers",
                ));
            }
            let mut conn = ctx.db.acquire().await?;
            preregs::insert_queued(&mut conn, &cmd, ev.correlationid.as_deref()).await?;
        }
    }

    let email_norm = domain::normalize_email(&cmd.email);
    let mobile_norm = domain::normalize_mobile(&cmd.mobile);
    let keys = [
        format!("email:{email_norm}"),
        format!("mobile:{mobile_norm}"),
    ];
    let guard = match ctx.locks.acquire(&keys).await {
        Ok(g) => Some(g),
        Err(LockError::Unavailable(e)) => {
            metrics::counter!("prereg_lock_unavailable_total").increment(1);
            tracing::warn!(error = %e, "deciding without Redis lock; Postgres constraints still hold");
            None
        }
        Err(LockError::Busy) => return Err(JobError::Retryable("customer lock busy".into())),
    };
    let result = decide_with_retries(ctx, cmd.id).await;
    if let Some(g) = guard {
        ctx.locks.release(g).await;
    }
    if let Ok(Outcome::Done) = &result {
        tracing::info!(preregistration_id = %cmd.id, email = %mask::pii_email(&cmd.email), "pre-registration decided");
    }
    result
}

/// A unique violation means another worker's claim won a race Redis did not
/// prevent: run the decision again, it will now see that claim.
async fn decide_with_retries(ctx: &Ctx, id: Uuid) -> Result<Outcome, JobError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match decide(ctx, id).await {
            Err(Failure::Db(e))
                if attempt < 5 && (store::is_unique_violation(&e) || store::is_transient(&e)) =>
            {
                metrics::counter!("prereg_claim_conflicts_total").increment(1);
                tracing::debug!(error = %e, attempt, "decision conflicted; deciding again");
            }
            Err(Failure::Db(e)) => return Err(e.into()),
            Err(Failure::Job(e)) => return Err(e),
            Ok(o) => return Ok(o),
        }
    }
}

enum Failure {
    Db(sqlx::Error),
    Job(JobError),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Db(e)
    }
}

async fn decide(ctx: &Ctx, id: Uuid) -> Result<Outcome, Failure> {
    let mut tx = ctx.db.begin().await?;
    let Some(p) = preregs::get_for_update(&mut tx, id).await? else {
        return Err(Failure::Job(JobError::Retryable(
            "pre-registration row not visible yet".into(),
        )));
    };
    if p.status() != Status::Queued {
        return Ok(Outcome::Skipped("already_decided"));
    }
    let Some(partner) = store::partners::get_for_update(&mut tx, p.partner_id).await? else {
        return Err(Failure::Job(JobError::fatal(
            "unknown_partner",
            "partner vanished",
        )));
    };
    let now = Utc::now();
    let mut claims = preregs::claims_on(&mut tx, &p.email_norm, &p.mobile_norm).await?;
    // A claim past its validity that the sweep has not reached yet frees the
    // customer now.
    for c in claims.iter_mut().filter(|c| c.lapsed(now)) {
        expire_claim(&mut tx, c.id, c.status, ACTOR).await?;
        c.status = Status::Expired;
    }
    let accounts = store::accounts::for_customer(&mut tx, &p.email_norm, &p.mobile_norm).await?;
    let active = preregs::count_quota(&mut tx, partner.id).await?;
    let decision = domain::decide(&EligibilityInput {
        partner_id: partner.id,
        partner_country: &partner.country,
        now,
        claims: &claims,
        accounts: &accounts,
        partner_active: active,
        quota: ctx.cfg.partner_quota,
    });
    let (change, event) = match decision {
        Decision::Preregistered => {
            let expires_at = now + ctx.claim_validity();
            if p.send_invitation {
                queue_invitation(ctx, &mut tx, &p, &partner, expires_at).await?;
            }
            preregs::apply(
                &mut tx,
                &preregs::Change {
                    id,
                    status: Status::Preregistered,
                    reason: None,
                    manual_review_eligible: false,
                    existing_id: None,
                    preregistered_at: Some(now),
                    expires_at: Some(expires_at),
                },
            )
            .await?;
            (
                (Status::Preregistered, None),
                CloudEvent::with_id(
                    format!("preregistration.accepted:{id}"),
                    "preregistration.accepted",
                    json!({"preregistration_id": id, "partner_id": partner.id, "status": "preregistered", "expires_at": expires_at}),
                ),
            )
        }
        Decision::AlreadyPreregistered { existing_id } => {
            let reason = domain::Reason::AlreadyPreregistered;
            preregs::apply(
                &mut tx,
                &preregs::Change {
                    id,
                    status: Status::Rejected,
                    reason: Some((reason.code(), reason.message())),
                    manual_review_eligible: false,
                    existing_id: Some(existing_id),
                    preregistered_at: None,
                    expires_at: None,
                },
            )
            .await?;
            (
                (Status::Rejected, Some(reason)),
                rejected_event(id, partner.id, reason, Some(existing_id)),
            )
        }
        Decision::Rejected { reason } => {
            preregs::apply(
                &mut tx,
                &preregs::Change {
                    id,
                    status: Status::Rejected,
                    reason: Some((reason.code(), reason.message())),
                    manual_review_eligible: reason.manual_review_eligible(),
                    existing_id: None,
                    preregistered_at: None,
                    expires_at: None,
                },
            )
            .await?;
            (
                (Status::Rejected, Some(reason)),
                rejected_event(id, partner.id, reason, None),
            )
        }
    };
    store::record(
        &mut tx,
        TimelineEntry {
            preregistration_id: id,
            actor: ACTOR,
            change: "decided",
            from_status: Some("queued"),
            to_status: Some(change.0.as_str()),
            reason: change.1.map(|r| r.code()),
            details: None,
        },
    )
    .await?;
    // The decision event carries the request id of the HTTP call (or the
    // upstream command) that asked for it.
    let event = event.subject(id).correlation(p.request_id.clone());
    outbox::event(&mut tx, &event).await?;
    tx.commit().await?;
    metrics::counter!("prereg_decisions_total", "status" => change.0.as_str(), "reason" => change.1.map(|r| r.code()).unwrap_or("")).increment(1);
    Ok(Outcome::Done)
}

/// `send_invitation`: the first invitation goes out as soon as the claim is
/// granted (its job is written to the outbox with the decision).
async fn queue_invitation(
    ctx: &Ctx,
    conn: &mut PgConnection,
    p: &preregs::Prereg,
    partner: &store::partners::Partner,
    claim_expires: chrono::DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let kind = p.association_type.as_deref().unwrap_or("reseller");
    if kind == "referral" && !partner.referral {
        tracing::warn!(preregistration_id = %p.id, "send_invitation with referral but no permission; not sent");
        return Ok(());
    }
    let id = Uuid::now_v7();
    let nonce = crate::links::new_nonce();
    let token = crate::links::token(ctx.cfg.link_secret.as_bytes(), id, &nonce);
    let validity = chrono::Duration::from_std(ctx.cfg.invitation_validity)
        .unwrap_or(chrono::Duration::days(7));
    store::invitations::insert(
        conn,
        &store::invitations::NewInvitation {
            id,
            preregistration_id: p.id,
            partner_id: partner.id,
            association_type: kind,
            method: "email",
            locale: p.locale.as_deref().unwrap_or(&partner.locale),
            status: "queued",
            nonce: &nonce,
            token_hash: &crate::links::hash(&token),
            code_hash: None,
            link_expires_at: Some((Utc::now() + validity).min(claim_expires)),
            request_id: p.request_id.as_deref(),
        },
    )
    .await?;
    let job = CloudEvent::with_id(
        id.to_string(),
        "invitation.requested",
        json!({"invitation_id": id}),
    )
    .subject(p.id);
    outbox::command(conn, &job).await
}

fn rejected_event(
    id: Uuid,
    partner_id: Uuid,
    reason: domain::Reason,
    existing_id: Option<Uuid>,
) -> CloudEvent {
    CloudEvent::with_id(
        format!("preregistration.rejected:{id}"),
        "preregistration.rejected",
        json!({"preregistration_id": id, "partner_id": partner_id, "status": "rejected",
               "reason": reason.code(), "manual_review_eligible": reason.manual_review_eligible(), "existing_id": existing_id}),
    )
}

/// Ends a lapsed claim: `expired`, with its timeline entry and event.
///
/// Conditional, like the sweep: if a sweep (or another worker) expired the
/// claim first, nothing is written twice. Returns whether this call expired it.
pub async fn expire_claim(
    conn: &mut PgConnection,
    id: Uuid,
    from: Status,
    actor: &str,
) -> Result<bool, sqlx::Error> {
    let row: Option<(Uuid, Option<chrono::DateTime<Utc>>)> = sqlx::query_as(
        "UPDATE preregistrations SET status = 'expired', updated_at = now()
         WHERE id = $1 AND status IN ('preregistered', 'invited', 'association_failed')
         RETURNING partner_id, expires_at",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((partner_id, expires_at)) = row else {
        return Ok(false);
    };
    store::record(
        conn,
        TimelineEntry {
            preregistration_id: id,
            actor,
            change: "expired",
            from_status: Some(from.as_str()),
            to_status: Some("expired"),
            reason: Some("claim_validity_passed"),
            details: None,
        },
    )
    .await?;
    let ev = super::sweeps::expired_event(id, partner_id, from.as_str(), expires_at);
    outbox::event(conn, &ev).await?;
    Ok(true)
}

/// `review.requested`: the partner asks for a manual review of a rejection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReviewRequested {
    pub review_id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
}

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
