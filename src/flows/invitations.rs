//! Invitations (SPEC §3): created (email or offline), activated when the
//! email goes out (superseding the earlier links of the claim), sent,
//! failed, expired.

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use uuid::Uuid;

use super::FlowError;
use crate::{
    context::Ctx,
    events::invitation_event,
    links,
    mq::CloudEvent,
    store::{self, invitations, outbox, preregs, TimelineEntry},
};

/// `invitation.expired` of a link (past its own validity, or its claim's).
pub fn expired_event(id: Uuid, prereg: Uuid, reason: &str) -> CloudEvent {
    invitation_event(
        "invitation.expired",
        id,
        prereg,
        json!({"status": "expired", "reason": reason}),
    )
}

/// A new email invitation, `queued` until the email worker sends it.
pub struct NewEmail<'a> {
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    pub association_type: &'a str,
    pub locale: &'a str,
    pub link_expires_at: DateTime<Utc>,
    pub request_id: Option<&'a str>,
}

/// Writes a queued email invitation with a fresh link. Returns its id; the
/// caller writes its `invitation.requested` job in the same transaction.
pub async fn create_email(
    conn: &mut sqlx::PgConnection,
    link_secret: &[u8],
    n: &NewEmail<'_>,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    let nonce = links::new_nonce();
    let token = links::token(link_secret, id, &nonce);
    invitations::insert(
        conn,
        &invitations::NewInvitation {
            id,
            preregistration_id: n.preregistration_id,
            partner_id: n.partner_id,
            association_type: n.association_type,
            method: "email",
            locale: n.locale,
            status: "queued",
            nonce: &nonce,
            token_hash: &links::hash(&token),
            code_hash: None,
            link_expires_at: Some(n.link_expires_at),
            request_id: n.request_id,
        },
    )
    .await?;
    Ok(id)
}

/// An offline link handed out to the partner.
pub struct Offline {
    pub invitation_id: Uuid,
    pub token: String,
    pub code: String,
    pub claim_expires_at: Option<DateTime<Utc>>,
}

/// Creates an offline link and one-time code for the partner's claim; the
/// earlier links of the claim stop working, the claim becomes `invited`.
/// Row, timeline entry and `invitation.sent` in one transaction.
pub async fn create_offline(
    ctx: &Ctx,
    partner: &store::partners::Partner,
    prereg_id: Uuid,
    association_type: &str,
    actor: &str,
    request_id: &str,
) -> Result<Offline, FlowError> {
    let mut tx = ctx.db.begin().await?;
    let p = match preregs::get_for_update(&mut tx, prereg_id).await? {
        Some(p) if p.partner_id == partner.id => p,
        _ => return Err(FlowError::NotFound("pre-registration")),
    };
    if !p.status().invitable() {
        return Err(FlowError::Conflict(
            "not_invitable",
            format!("a pre-registration that is {} cannot be invited", p.status),
        ));
    }
    let secret = ctx.cfg.link_secret.as_bytes();
    let inv_id = Uuid::now_v7();
    let nonce = links::new_nonce();
    let token = links::token(secret, inv_id, &nonce);
    let code = links::new_code();
    invitations::insert(
        &mut tx,
        &invitations::NewInvitation {
            id: inv_id,
            preregistration_id: prereg_id,
            partner_id: partner.id,
            association_type,
            method: "offline",
            locale: &partner.locale,
            status: "sent",
            nonce: &nonce,
            token_hash: &links::hash(&token),
            code_hash: Some(&links::code_hash(secret, &code)),
            link_expires_at: None,
            request_id: Some(request_id),
        },
    )
    .await?;
    invitations::sent_now(&mut tx, inv_id).await?;
    invitations::supersede_others(&mut tx, prereg_id, inv_id).await?;
    preregs::mark_invited(&mut tx, prereg_id, "offline", None).await?;
    store::record(
        &mut tx,
        TimelineEntry {
            preregistration_id: prereg_id,
            actor,
            change: "invited",
            from_status: Some(p.status.as_str()),
            to_status: Some("invited"),
            reason: None,
            details: Some(json!({"invitation_id": inv_id, "method": "offline"})),
        },
    )
    .await?;
    let ev = invitation_event(
        "invitation.sent",
        inv_id,
        prereg_id,
        json!({"method": "offline"}),
    );
    outbox::event(&mut tx, &ev).await?;
    tx.commit().await?;
    Ok(Offline {
        invitation_id: inv_id,
        token,
        code,
        claim_expires_at: p.expires_at,
    })
}

/// What the email worker may do with a queued invitation.
pub enum Activation {
    /// Leased for sending: send to this pre-registration.
    Send(Box<invitations::Invitation>, Box<preregs::Prereg>),
    /// Nothing to send (reason for the log).
    Skip(&'static str),
    /// Another worker holds a fresh lease.
    Busy,
    /// A stale lease: a worker stopped during the SMTP exchange; the
    /// invitation is now failed with this reason.
    Unknown(&'static str),
}

const UNKNOWN: &str = "delivery outcome unknown: a worker stopped during the SMTP exchange; resend if the customer did not receive it";

/// Takes the delivery of an invitation (one short transaction): an
/// invitation sent for the first time supersedes the claim's earlier links
/// and makes the claim `invited` (with its timeline entry); then the lease
/// is taken. No transaction is held across SMTP.
pub async fn activate(ctx: &Ctx, id: Uuid, lease: Duration) -> Result<Activation, sqlx::Error> {
    let now = Utc::now();
    let mut tx = ctx.db.begin().await?;
    let Some(inv) = invitations::get_for_update(&mut tx, id).await? else {
        return Ok(Activation::Skip("withdrawn"));
    };
    match inv.status.as_str() {
        "queued" => {}
        "sent" => return Ok(Activation::Skip("already_sent")),
        _ => return Ok(Activation::Skip("no_longer_live")),
    }
    if let Some(since) = inv.sending_since {
        if now - since < lease {
            return Ok(Activation::Busy);
        }
        drop(tx);
        fail(ctx, id, UNKNOWN).await?;
        return Ok(Activation::Unknown(UNKNOWN));
    }
    let Some(p) = preregs::get_for_update(&mut tx, inv.preregistration_id).await? else {
        return Ok(Activation::Skip("withdrawn"));
    };
    if !p.status().invitable() {
        invitations::set_status(
            &mut tx,
            id,
            "expired",
            Some(&format!("the pre-registration is {}", p.status)),
        )
        .await?;
        tx.commit().await?;
        return Ok(Activation::Skip("not_invitable"));
    }
    if inv.activated_at.is_none() {
        // A newer invitation already went out: this one is superseded.
        if invitations::newer_activated(&mut tx, p.id, id, inv.created_at).await? {
            invitations::set_status(&mut tx, id, "superseded", None).await?;
            tx.commit().await?;
            return Ok(Activation::Skip("superseded"));
        }
        for old in invitations::supersede_others(&mut tx, p.id, id).await? {
            tracing::debug!(invitation_id = %old, "superseded");
        }
        preregs::mark_invited(&mut tx, p.id, "email", inv.link_expires_at).await?;
        store::record(
            &mut tx,
            TimelineEntry {
                preregistration_id: p.id,
                actor: "system:email",
                change: "invited",
                from_status: Some(p.status.as_str()),
                to_status: Some("invited"),
                reason: None,
                details: Some(
                    json!({"invitation_id": id, "association_type": inv.association_type}),
                ),
            },
        )
        .await?;
    }
    invitations::begin_sending(&mut tx, id).await?;
    tx.commit().await?;
    Ok(Activation::Send(Box::new(inv), Box::new(p)))
}

/// The mail server accepted the email: `sent`, and `invitation.sent`.
pub async fn sent(
    ctx: &Ctx,
    inv: &invitations::Invitation,
    prereg_id: Uuid,
) -> Result<(), sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    invitations::mark_sent(&mut tx, inv.id).await?;
    outbox::event(
        &mut tx,
        &invitation_event(
            "invitation.sent",
            inv.id,
            prereg_id,
            json!({"link_expires_at": inv.link_expires_at}),
        ),
    )
    .await?;
    tx.commit().await
}

/// Marks a live invitation failed with the server's reply and publishes
/// `invitation.failed`. Returns whether it was still live.
pub async fn fail(ctx: &Ctx, id: Uuid, reason: &str) -> Result<bool, sqlx::Error> {
    fail_where(ctx, id, reason, None).await
}

/// Gives up on a job's invitation after its retries ran out — unless another
/// worker holds a live delivery lease (it is in the SMTP exchange right now):
/// that worker settles the invitation (sent, or `delivery_unknown` once its
/// lease runs out), so a duplicate job that only ever found it busy must not
/// mark it failed.
pub async fn give_up(
    ctx: &Ctx,
    id: Uuid,
    reason: &str,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    fail_where(ctx, id, reason, Some(lease)).await
}

async fn fail_where(
    ctx: &Ctx,
    id: Uuid,
    reason: &str,
    unless_leased: Option<Duration>,
) -> Result<bool, sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    let Some(inv) = invitations::get_for_update(&mut tx, id).await? else {
        return Ok(false);
    };
    if inv.status != "queued" {
        return Ok(false);
    }
    if let (Some(lease), Some(since)) = (unless_leased, inv.sending_since) {
        if Utc::now() - since < lease {
            return Ok(false);
        }
    }
    invitations::set_status(&mut tx, id, "failed", Some(reason)).await?;
    outbox::event(
        &mut tx,
        &invitation_event(
            "invitation.failed",
            id,
            inv.preregistration_id,
            json!({"failure": reason}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}
