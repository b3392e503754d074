//! Email delivery: invitation emails and notices, over pooled SMTP.
//!
//! A job never sends an email the server already accepted: before the SMTP
//! exchange the job takes a lease in Postgres (`sending_since`), released on
//! a transient failure and replaced by `sent` on success, each in its own
//! short transaction (no transaction is held across SMTP). A redelivered job
//! finds `sent` and stops; one that finds a lease older than the job timeout
//! (the worker died mid-exchange, outcome unknown) marks the delivery failed
//! instead of risking a second email.

use chrono::{Duration, Utc};
use uuid::Uuid;

use super::{JobError, Outcome};
use crate::{
    context::Ctx,
    domain::mask,
    flows::{self, invitations::Activation},
    links,
    locks::LockError,
    mail::{self, InvitationVars, Rendered, SendError},
    mq::CloudEvent,
    store::{self, deliveries, invitations, preregs},
};

pub use crate::jobs::{EmailRequested, InvitationRequested, NoticeKind};

fn lease(ctx: &Ctx) -> Duration {
    Duration::from_std(ctx.cfg.job_timeout).unwrap_or(Duration::seconds(30)) + Duration::seconds(5)
}

fn count(outcome: &'static str) {
    metrics::counter!("prereg_emails_total", "outcome" => outcome).increment(1);
}

pub use crate::events::invitation_event;

/// Marks a live invitation failed with the server's reply and publishes
/// `invitation.failed`.
pub async fn fail_invitation(ctx: &Ctx, id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
    if flows::invitations::fail(ctx, id, reason).await? {
        count("failed");
    }
    Ok(())
}

/// The job's retries ran out: fail the invitation unless another worker is
/// sending it right now (see [`flows::invitations::give_up`]).
pub async fn give_up_invitation(ctx: &Ctx, id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
    if flows::invitations::give_up(ctx, id, reason, lease(ctx)).await? {
        count("failed");
    }
    Ok(())
}

pub async fn handle_invitation(ctx: &Ctx, job: InvitationRequested) -> Result<Outcome, JobError> {
    let id = job.invitation_id;
    // 1. Claim the delivery (short transaction).
    let (inv, p) = match flows::invitations::activate(ctx, id, lease(ctx)).await? {
        Activation::Send(inv, p) => (inv, p),
        Activation::Skip(why) => return Ok(Outcome::Skipped(why)),
        Activation::Busy => {
            return Err(JobError::Retryable(
                "another worker is sending this invitation".into(),
            ))
        }
        Activation::Unknown(reason) => {
            count("failed");
            return Err(JobError::fatal("delivery_unknown", reason));
        }
    };

    // 2. The partner's send rate. Over the rate, the job waits for a slot
    // (a burst is spread out, not failed); only when no slot comes within
    // two thirds of the job timeout is it handed back, and then the attempt
    // is not counted: it never reached the mail server.
    if ctx.cfg.partner_email_rate > 0 {
        let give_up = tokio::time::Instant::now() + ctx.cfg.job_timeout * 2 / 3;
        loop {
            match ctx
                .locks
                .rate_allow(
                    &format!("email:{}", inv.partner_id),
                    ctx.cfg.partner_email_rate,
                )
                .await
            {
                Ok(true) => break,
                Ok(false) => {
                    count("rate_limited");
                    // The rate's windows are whole seconds: try again soon
                    // after the next one opens (jittered).
                    let now = Utc::now();
                    let to_next = 1000 - i64::from(now.timestamp_subsec_millis()).min(999);
                    let jitter = rand::random::<u64>() % 100;
                    let wait = std::time::Duration::from_millis(to_next as u64 + jitter);
                    if tokio::time::Instant::now() + wait > give_up {
                        invitations::release_sending(&ctx.db, id, true).await?;
                        return Err(JobError::Retryable(
                            "partner send rate limit reached".into(),
                        ));
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(LockError::Unavailable(e)) => {
                    tracing::warn!(error = %e, "rate limit unavailable; sending");
                    break;
                }
                Err(LockError::Busy) => break,
            }
        }
    }

    // 3. Render and send, outside any transaction.
    let partner = store::partners::get(&ctx.db, inv.partner_id).await?;
    let partner_name = partner.map(|p| p.name).unwrap_or_default();
    let rendered = render_invitation(ctx, &inv, &p.full_name, &partner_name)?;
    match ctx.mailer.send(&p.email, &rendered, &id.to_string()).await {
        Ok(reply) => {
            flows::invitations::sent(ctx, &inv, p.id).await?;
            count("sent");
            tracing::info!(invitation_id = %id, to = %mask::pii_email(&p.email), %reply, "invitation sent");
            Ok(Outcome::Done)
        }
        Err(SendError::Transient(e)) => {
            invitations::release_sending(&ctx.db, id, false).await?;
            count("transient_failure");
            Err(JobError::Retryable(format!("smtp: {}", mask::text(&e))))
        }
        Err(SendError::Unknown(e)) => {
            // The server may have taken the message: like a worker that died
            // mid-exchange, never send it again.
            let reason = format!(
                "delivery outcome unknown: the mail server connection failed during the SMTP exchange ({}); resend if the customer did not receive it",
                mask::text(&e)
            );
            fail_invitation(ctx, id, &reason).await?;
            Err(JobError::fatal("delivery_unknown", reason))
        }
        Err(SendError::Permanent(e)) | Err(SendError::Invalid(e)) => {
            // The reply may quote the customer's address: masked before it
            // is stored, logged or put in a dead-letter header.
            let e = mask::text(&e);
            fail_invitation(ctx, id, &e).await?;
            Err(JobError::fatal("smtp_permanent", e))
        }
    }
}

pub fn render_invitation(
    ctx: &Ctx,
    inv: &invitations::Invitation,
    customer_name: &str,
    partner_name: &str,
) -> Result<Rendered, JobError> {
    let token = links::token(ctx.cfg.link_secret.as_bytes(), inv.id, &inv.nonce);
    let link = links::link_url(&ctx.cfg.public_url, &token);
    mail::render_invitation(&InvitationVars {
        locale: &inv.locale,
        customer_name,
        partner_name,
        provider: &ctx.cfg.provider_name,
        association_type: &inv.association_type,
        link: &link,
        expires_at: inv.link_expires_at,
        timezone: ctx.cfg.timezone,
    })
    .map_err(|e| JobError::fatal("template", e.to_string()))
}

pub async fn handle_notice(
    ctx: &Ctx,
    job: EmailRequested,
    ev: &CloudEvent,
) -> Result<Outcome, JobError> {
    let Some((to, rendered)) = build_notice(ctx, &job).await? else {
        return Ok(Outcome::Skipped("no_recipient"));
    };
    // Claim the delivery by job id.
    let claimed = deliveries::claim(&ctx.db, &ev.id, job.kind.as_str()).await?;
    if claimed.is_none() {
        let (state, since) = deliveries::state(&ctx.db, &ev.id).await?;
        match (state.as_str(), since) {
            ("sending", Some(t)) if Utc::now() - t < lease(ctx) => {
                return Err(JobError::Retryable(
                    "another worker is sending this email".into(),
                ))
            }
            ("sending", _) => {
                let reason = "delivery outcome unknown: a worker stopped during the SMTP exchange";
                mark_notice(ctx, &ev.id, "failed", Some(reason)).await?;
                return Err(JobError::fatal("delivery_unknown", reason));
            }
            _ => return Ok(Outcome::Skipped("already_handled")),
        }
    }
    match ctx
        .mailer
        .send(&to, &rendered, &ev.id.replace(':', "."))
        .await
    {
        Ok(_) => {
            mark_notice(ctx, &ev.id, "sent", None).await?;
            count("sent");
            Ok(Outcome::Done)
        }
        Err(SendError::Transient(e)) => {
            deliveries::release(&ctx.db, &ev.id).await?;
            count("transient_failure");
            Err(JobError::Retryable(format!("smtp: {}", mask::text(&e))))
        }
        Err(SendError::Unknown(e)) => {
            let reason = format!(
                "delivery outcome unknown: the mail server connection failed during the SMTP exchange ({})",
                mask::text(&e)
            );
            mark_notice(ctx, &ev.id, "failed", Some(&reason)).await?;
            count("failed");
            Err(JobError::fatal("delivery_unknown", reason))
        }
        Err(SendError::Permanent(e)) | Err(SendError::Invalid(e)) => {
            let e = mask::text(&e);
            mark_notice(ctx, &ev.id, "failed", Some(&e)).await?;
            count("failed");
            Err(JobError::fatal("smtp_permanent", e))
        }
    }
}

async fn mark_notice(
    ctx: &Ctx,
    job_id: &str,
    state: &str,
    failure: Option<&str>,
) -> Result<(), sqlx::Error> {
    deliveries::finish(&ctx.db, job_id, state, failure).await
}

/// The recipient and content of a notice, from the current state: the
/// recipient comes from stored data (the partner's contact) or configuration
/// (reviewers, escalation), never from the message.
async fn build_notice(
    ctx: &Ctx,
    job: &EmailRequested,
) -> Result<Option<(String, Rendered)>, JobError> {
    let provider = &ctx.cfg.provider_name;
    let tz = ctx.cfg.timezone;
    let fmt = |t: chrono::DateTime<Utc>| {
        format!("{} ({tz})", t.with_timezone(&tz).format("%Y-%m-%d %H:%M"))
    };
    let render = |locale: &str, subject: String, paragraphs: Vec<String>| {
        mail::render_notice(locale, provider, subject, &paragraphs)
            .map_err(|e| JobError::fatal("template", e.to_string()))
    };
    match job.kind {
        NoticeKind::AssociationOutcome => {
            let id = job
                .attempt_id
                .ok_or_else(|| JobError::fatal("invalid_payload", "attempt_id is required"))?;
            let Some(a) = invitations::get_attempt(&ctx.db, id).await? else {
                return Ok(None);
            };
            let Some(inv_id) = a.invitation_id else {
                return Ok(None);
            };
            let Some(inv) = invitations::get(&ctx.db, inv_id).await? else {
                return Ok(None);
            };
            let Some(p) = preregs::get(&ctx.db, inv.preregistration_id).await? else {
                return Ok(None);
            };
            let Some(partner) = store::partners::get(&ctx.db, inv.partner_id).await? else {
                return Ok(None);
            };
            let Some(to) = partner.contact_email.clone() else {
                return Ok(None);
            };
            let zh = partner.locale == "zh-CN";
            let (subject, mut paragraphs) = match (&a.cause_code, zh) {
                (None, false) => (
                    format!("{} is now associated with you", p.full_name),
                    vec![format!("The customer {} ({}) accepted your invitation and is now associated with {}.", p.full_name, p.email, partner.name)],
                ),
                (None, true) => (
                    format!("客户 {} 已与您关联", p.full_name),
                    vec![format!("客户 {}（{}）已接受您的邀请，现已关联到 {}。", p.full_name, p.email, partner.name)],
                ),
                (Some(code), false) => (
                    format!("Association failed for {}", p.full_name),
                    vec![format!("The customer {} ({}) could not be associated with {} ({code}).", p.full_name, p.email, partner.name)],
                ),
                (Some(code), true) => (
                    format!("客户 {} 关联失败", p.full_name),
                    vec![format!("客户 {}（{}）未能关联到 {}（{code}）。", p.full_name, p.email, partner.name)],
                ),
            };
            if let Some(cause) = a
                .cause_code
                .as_deref()
                .and_then(|c| crate::domain::association::Causes::shipped().view(c, provider))
            {
                paragraphs.push(cause.message);
                paragraphs.push(cause.suggestion);
            }
            Ok(Some((to, render(&partner.locale, subject, paragraphs)?)))
        }
        NoticeKind::ReviewReminder | NoticeKind::ReviewEscalation => {
            let escalation = job.kind == NoticeKind::ReviewEscalation;
            let id = job
                .review_id
                .ok_or_else(|| JobError::fatal("invalid_payload", "review_id is required"))?;
            let Some(r) = store::reviews::get(&ctx.db, id).await? else {
                return Ok(None);
            };
            let partner = store::partners::get(&ctx.db, r.partner_id)
                .await?
                .map(|p| p.name)
                .unwrap_or_default();
            let to = if escalation {
                ctx.cfg.escalation_email.clone()
            } else {
                ctx.cfg.reviewer_email.clone()
            };
            let due = r.due_at.map(fmt).unwrap_or_default();
            let (subject, lead) = if escalation {
                (format!("OVERDUE: manual review {} for {partner}", r.id), format!("The manual review {} requested by {partner} was due at {due} and is still undecided.", r.id))
            } else {
                (
                    format!(
                        "Reminder: manual review {} for {partner} is due at {due}",
                        r.id
                    ),
                    format!(
                        "The manual review {} requested by {partner} must be decided by {due}.",
                        r.id
                    ),
                )
            };
            let paragraphs = vec![
                lead,
                format!("Justification: {}", r.justification),
                "Decide it in the operator console (POST /v1/admin/reviews/{id}/decision)."
                    .to_string(),
            ];
            Ok(Some((to, render("en", subject, paragraphs)?)))
        }
        NoticeKind::ClaimExpiryReminder => {
            let id = job.preregistration_id.ok_or_else(|| {
                JobError::fatal("invalid_payload", "preregistration_id is required")
            })?;
            let Some(p) = preregs::get(&ctx.db, id).await? else {
                return Ok(None);
            };
            let Some(partner) = store::partners::get(&ctx.db, p.partner_id).await? else {
                return Ok(None);
            };
            let Some(to) = partner.contact_email.clone() else {
                return Ok(None);
            };
            let when = p.expires_at.map(fmt).unwrap_or_default();
            let paragraphs = vec![format!(
                "Your pre-registration of {} ({}) expires at {when}. Invite the customer before then to keep the claim.",
                p.full_name, p.email
            )];
            Ok(Some((
                to,
                render(
                    &partner.locale,
                    format!("Pre-registration of {} expires soon", p.full_name),
                    paragraphs,
                )?,
            )))
        }
    }
}
