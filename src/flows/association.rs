//! Association attempts (SPEC §3): the outcome of an attempt, decided in
//! the order of the failure-cause table (each cause only for the association
//! model it names), recorded with the claim's change, the timeline entry,
//! the events and the partner's notification in one transaction.

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::outbox_job;
use crate::{
    context::Ctx,
    domain::{
        association::{self, AssociationType, AttemptInput, Causes, LinkState},
        eligibility::registration_limit,
        Status,
    },
    events::invitation_event,
    jobs::{EmailRequested, NoticeKind},
    mq::CloudEvent,
    store::{self, invitations, outbox, preregs, TimelineEntry},
};

/// What recording an attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The outcome is recorded.
    Done,
    /// Nothing to do (withdrawn, or decided before).
    Skipped(&'static str),
    /// Not decidable yet (the account's facts have not arrived): try again.
    NotYet(String),
}

const LINK_CAUSES: [&str; 4] = ["link_not_found", "link_expired", "link_used", "code_used"];

/// Decides and records the attempt `attempt_id`.
pub async fn record(ctx: &Ctx, attempt_id: Uuid) -> Result<Recorded, sqlx::Error> {
    let now = Utc::now();
    let mut tx = ctx.db.begin().await?;
    let Some(attempt) = invitations::get_attempt_for_update(&mut tx, attempt_id).await? else {
        return Ok(Recorded::Skipped("withdrawn"));
    };
    if attempt.status != "queued" {
        return Ok(Recorded::Skipped("already_decided"));
    }
    let by_code = attempt.code_hash.is_some();
    let inv = match (&attempt.token_hash, &attempt.code_hash) {
        (Some(h), _) => invitations::by_token_hash_for_update(&mut tx, h).await?,
        (_, Some(h)) => invitations::by_code_hash_for_update(&mut tx, h).await?,
        _ => None,
    };
    // SPEC §3: the link checks come first, so an unknown, expired or used
    // link is decided at once, whether or not the account's facts are known.
    let Some(inv) = inv else {
        return finish(tx, attempt.id, None, Some("link_not_found")).await;
    };
    let Some(p) = preregs::get_for_update(&mut tx, inv.preregistration_id).await? else {
        return finish(tx, attempt.id, None, Some("link_not_found")).await;
    };
    let partner = store::partners::get(&mut *tx, inv.partner_id).await?;
    let claim_live = p.status().expirable() && p.expires_at.is_none_or(|e| e > now);
    let link = LinkState::of(
        &inv.status,
        inv.link_expires_at,
        inv.activated_at.is_some(),
        claim_live,
        by_code,
        now,
    );
    let Some(account) = store::accounts::get(&mut *tx, &attempt.account_id).await? else {
        if let Some(code) = link.cause() {
            let known = Some((inv.id, p.id, p.partner_id));
            return finish(tx, attempt.id, known, Some(code)).await;
        }
        // The account system may not have told us about the account yet.
        return Ok(Recorded::NotYet(format!(
            "no facts yet for account {}",
            attempt.account_id
        )));
    };
    let waived = store::reviews::approved_for(&mut *tx, p.id).await?;
    let input = AttemptInput {
        link,
        association_type: AssociationType::parse(&inv.association_type)
            .unwrap_or(AssociationType::Reseller),
        partner_prepaid: partner
            .as_ref()
            .is_some_and(|p| p.billing_mode == "prepaid"),
        preregistered_email_norm: &p.email_norm,
        account: &account,
        now,
        registration_limit: registration_limit(),
        registration_time_waived: waived,
    };
    let cause = association::decide(Causes::shipped(), &input);
    // Only the account that associates is attached to the claim: a stranger's
    // failed attempt must not show up as the customer's information.
    if link == LinkState::Valid && cause.is_none() {
        preregs::set_account(
            &mut tx,
            p.id,
            &account.account_id,
            account.display_name.as_deref(),
        )
        .await?;
    }
    match cause.as_deref() {
        None => {
            invitations::set_status(&mut tx, inv.id, "accepted", None).await?;
            preregs::apply(
                &mut tx,
                &preregs::Change {
                    id: p.id,
                    status: Status::Associated,
                    reason: None,
                    manual_review_eligible: false,
                    existing_id: None,
                    preregistered_at: None,
                    expires_at: None,
                },
            )
            .await?;
            // Other live links of this claim stop working.
            invitations::end_all(&mut tx, p.id, "superseded").await?;
            timeline(
                &mut tx,
                p.id,
                p.status.as_str(),
                "associated",
                None,
                attempt.id,
                &attempt.account_id,
            )
            .await?;
            outbox::event(
                &mut tx,
                &invitation_event("invitation.accepted", inv.id, p.id, json!({})),
            )
            .await?;
        }
        Some(code) if LINK_CAUSES.contains(&code) => {}
        Some(code) => {
            let view = Causes::shipped().view(code, &ctx.cfg.provider_name);
            let message = view.map(|v| v.message).unwrap_or_default();
            preregs::apply(
                &mut tx,
                &preregs::Change {
                    id: p.id,
                    status: Status::AssociationFailed,
                    reason: Some((code, &message)),
                    manual_review_eligible: false,
                    existing_id: None,
                    preregistered_at: None,
                    expires_at: None,
                },
            )
            .await?;
            timeline(
                &mut tx,
                p.id,
                p.status.as_str(),
                "association_failed",
                Some(code),
                attempt.id,
                &attempt.account_id,
            )
            .await?;
        }
    }
    finish(
        tx,
        attempt.id,
        Some((inv.id, p.id, p.partner_id)),
        cause.as_deref(),
    )
    .await
}

async fn timeline(
    conn: &mut sqlx::PgConnection,
    prereg: Uuid,
    from: &str,
    to: &str,
    reason: Option<&str>,
    attempt: Uuid,
    account_id: &str,
) -> Result<(), sqlx::Error> {
    store::record(
        conn,
        TimelineEntry {
            preregistration_id: prereg,
            actor: "upstream:account-system",
            change: to,
            from_status: Some(from),
            to_status: Some(to),
            reason,
            details: Some(json!({"attempt_id": attempt, "account_id": account_id})),
        },
    )
    .await
}

/// Records the outcome, its event and (when the partner is known) the
/// partner's notification email, then commits.
async fn finish(
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    attempt: Uuid,
    known: Option<(Uuid, Uuid, Uuid)>,
    cause: Option<&str>,
) -> Result<Recorded, sqlx::Error> {
    invitations::decide_attempt(&mut tx, attempt, known.map(|k| k.0), cause).await?;
    let (ty, status) = if cause.is_none() {
        ("association.succeeded", "succeeded")
    } else {
        ("association.failed", "failed")
    };
    let ev = CloudEvent::with_id(
        format!("{ty}:{attempt}"),
        ty,
        json!({"attempt_id": attempt, "status": status, "cause": cause,
               "invitation_id": known.map(|k| k.0), "preregistration_id": known.map(|k| k.1), "partner_id": known.map(|k| k.2)}),
    );
    outbox::event(&mut tx, &ev).await?;
    if known.is_some() {
        let mail = outbox_job(
            format!("email:association_outcome:{attempt}"),
            &EmailRequested {
                kind: NoticeKind::AssociationOutcome,
                attempt_id: Some(attempt),
                review_id: None,
                preregistration_id: None,
            },
        )?;
        outbox::command(&mut tx, &mail).await?;
    }
    tx.commit().await?;
    metrics::counter!("prereg_associations_total", "outcome" => status, "cause" => cause.unwrap_or("").to_string()).increment(1);
    Ok(Recorded::Done)
}

/// Retries exhausted (e.g. the account's facts never arrived): `system_busy`.
pub async fn give_up(ctx: &Ctx, attempt_id: Uuid) -> Result<(), sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    let Some(a) = invitations::get_attempt_for_update(&mut tx, attempt_id).await? else {
        return Ok(());
    };
    if a.status != "queued" {
        return Ok(());
    }
    finish(tx, a.id, None, Some("system_busy"))
        .await
        .map(|_| ())
}
