//! A customer's claim: granted, rejected, expired. Registration (the
//! eligibility decision) and an operator's review decision grant through the
//! same [`grant`]; the sweep and a lapsed claim found at registration expire
//! through the same event ([`expired_event`]).

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::FlowError;
use crate::{
    domain::{Reason, Status},
    mq::CloudEvent,
    store::{self, preregs, TimelineEntry},
};

/// The claim granted from `now` for `validity`: the row becomes
/// `preregistered` with its expiry. The one home of what a grant writes,
/// for a registration batch (`decisions::write`) and for [`grant`].
pub fn granted(
    id: Uuid,
    now: DateTime<Utc>,
    validity: chrono::Duration,
) -> preregs::Change<'static> {
    preregs::Change {
        id,
        status: Status::Preregistered,
        reason: None,
        manual_review_eligible: false,
        existing_id: None,
        preregistered_at: Some(now),
        expires_at: Some(now + validity),
    }
}

/// A pre-registration rejected for an eligibility reason (naming the
/// partner's own earlier one as `existing_id`).
pub fn rejection(id: Uuid, reason: Reason, existing_id: Option<Uuid>) -> preregs::Change<'static> {
    preregs::Change {
        id,
        status: Status::Rejected,
        reason: Some((reason.code(), reason.message())),
        manual_review_eligible: reason.manual_review_eligible(),
        existing_id,
        preregistered_at: None,
        expires_at: None,
    }
}

/// Grants one claim ([`granted`]) through the registration batch's own
/// statement ([`preregs::apply`]). Returns the expiry. A unique violation
/// means another partner holds an active claim on the customer (the partial
/// unique indexes are the final guard).
pub async fn grant(
    conn: &mut PgConnection,
    id: Uuid,
    now: DateTime<Utc>,
    validity: chrono::Duration,
) -> Result<DateTime<Utc>, sqlx::Error> {
    let change = granted(id, now, validity);
    preregs::apply(conn, &change).await?;
    Ok(now + validity)
}

/// The partner deletes its pre-registration (anything but a review in
/// progress or an association): `deleted`, its live links end, with the
/// timeline entry and `preregistration.deleted`. Deleting a deleted one
/// changes nothing. Runs in the caller's transaction.
pub async fn delete(
    conn: &mut PgConnection,
    partner_id: Uuid,
    id: Uuid,
    actor: &str,
) -> Result<(), FlowError> {
    let p = match preregs::get_for_update(conn, id).await? {
        Some(p) if p.partner_id == partner_id => p,
        _ => return Err(FlowError::NotFound("pre-registration")),
    };
    let status = p.status();
    if status == Status::Deleted {
        return Ok(());
    }
    if !status.deletable() {
        return Err(FlowError::Conflict(
            "cannot_delete",
            format!("a pre-registration that is {status} cannot be deleted"),
        ));
    }
    preregs::set_status(conn, id, Status::Deleted).await?;
    store::invitations::end_all(conn, id, "expired").await?;
    store::record(
        conn,
        TimelineEntry {
            preregistration_id: id,
            actor,
            change: "deleted",
            from_status: Some(status.as_str()),
            to_status: Some("deleted"),
            reason: None,
            details: None,
        },
    )
    .await?;
    let ev = CloudEvent::with_id(
        format!("preregistration.deleted:{id}"),
        "preregistration.deleted",
        json!({"preregistration_id": id, "partner_id": partner_id, "status": "deleted", "previous_status": status}),
    )
    .subject(id);
    store::outbox::event(conn, &ev).await?;
    Ok(())
}

/// An operator rejected the review: `review_rejected` with the note.
pub async fn reject_by_review(
    conn: &mut PgConnection,
    id: Uuid,
    note: &str,
) -> Result<(), sqlx::Error> {
    preregs::apply(
        conn,
        &preregs::Change {
            id,
            status: Status::ReviewRejected,
            reason: Some(("review_rejected", note)),
            manual_review_eligible: false,
            existing_id: None,
            preregistered_at: None,
            expires_at: None,
        },
    )
    .await
}

/// The event of a rejected pre-registration.
pub fn rejected_event(
    id: Uuid,
    partner_id: Uuid,
    reason: Reason,
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
pub async fn expire(
    conn: &mut PgConnection,
    id: Uuid,
    from: Status,
    actor: &str,
) -> Result<bool, sqlx::Error> {
    let Some((partner_id, expires_at)) = preregs::expire_one(conn, id).await? else {
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
    let ev = expired_event(id, partner_id, from.as_str(), expires_at);
    store::outbox::event(conn, &ev).await?;
    Ok(true)
}

/// The event of an expired claim (the same id whichever path expired it; the
/// sweep's statement builds the same JSON in SQL).
pub fn expired_event(
    id: Uuid,
    partner_id: Uuid,
    previous_status: &str,
    expires_at: Option<DateTime<Utc>>,
) -> CloudEvent {
    CloudEvent::with_id(
        format!("preregistration.expired:{id}"),
        "preregistration.expired",
        json!({"preregistration_id": id, "partner_id": partner_id, "status": "expired",
               "previous_status": previous_status, "expires_at": expires_at}),
    )
    .subject(id)
}
