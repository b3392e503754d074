//! Email delivery: invitation emails and notices, over pooled SMTP.
//!
//! A job never sends an email the server already accepted: before the SMTP
//! exchange the job takes a lease in Postgres (`sending_since`), released on
//! a transient failure and replaced by `sent` on success; no transaction is
//! held across SMTP. A redelivered job finds `sent` and stops; one that
//! finds a lease older than the job timeout (the worker died mid-exchange,
//! outcome unknown) marks the delivery failed instead of risking a second
//! email.
//!
//! Invitations go a batch at a time ([`handle_batch`], from the runtime's
//! batched consumer): the batch's leases in one transaction, the emails
//! concurrently over the SMTP pool, the batch's results (`sent` with its
//! event, releases, failures) in one transaction, then one acknowledgement.
//! Notices go one at a time ([`handle_notice`]).

use std::collections::{HashMap, HashSet};

use chrono::{Duration, Utc};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{registration::Step, JobError, Outcome};
use crate::{
    context::Ctx,
    domain::mask,
    flows::{
        self,
        invitations::{Activation, EmailResult},
    },
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

/// The job's retries ran out: fail the invitation unless another worker is
/// sending it right now (see [`flows::invitations::give_up`]).
pub async fn give_up_invitation(ctx: &Ctx, id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
    if flows::invitations::give_up(ctx, id, reason, lease(ctx)).await? {
        count("failed");
    }
    Ok(())
}

/// Sends one invitation email (a batch of one; see [`handle_batch`]).
pub async fn handle_invitation(ctx: &Ctx, job: InvitationRequested) -> Result<Outcome, JobError> {
    invitations_batch(ctx, &[job])
        .await
        .pop()
        .unwrap_or_else(|| Err(JobError::Retryable("not handled".into())))
}

/// Handles a batch of `invitation.requested` deliveries and answers one step
/// per delivery, in the same order: a payload that does not parse fails
/// alone; a second delivery of an invitation already in the batch is
/// skipped (the first one sends).
pub async fn handle_batch(ctx: &Ctx, evs: &[&CloudEvent]) -> Vec<Step> {
    let mut steps: Vec<Option<Step>> = evs.iter().map(|_| None).collect();
    let mut jobs = Vec::with_capacity(evs.len());
    let mut at = Vec::with_capacity(evs.len());
    let mut seen = HashSet::new();
    for (i, ev) in evs.iter().enumerate() {
        match super::payload::<InvitationRequested>(ev) {
            Ok(job) if !seen.insert(job.invitation_id) => {
                steps[i] = Some(Step::Settled(Ok(Outcome::Skipped("duplicate_delivery"))));
            }
            Ok(job) => {
                jobs.push(job);
                at.push(i);
            }
            Err(e) => steps[i] = Some(Step::Settled(Err(e))),
        }
    }
    for (i, r) in at.into_iter().zip(invitations_batch(ctx, &jobs).await) {
        steps[i] = Some(Step::Settled(r));
    }
    steps
        .into_iter()
        .map(|s| s.unwrap_or_else(|| Step::Settled(Err(JobError::Retryable("not handled".into())))))
        .collect()
}

/// How a batch's transaction is tried before it is split: a deadlock or a
/// lost connection is worth another try.
const TX_ATTEMPTS: u32 = 3;

/// Runs `tx` (one transaction answering one result per item, in order) over
/// the whole batch, again on a transient failure (up to [`TX_ATTEMPTS`]);
/// a transaction that fails for another reason is split into one
/// transaction per item, so one bad item fails alone. `what` names the
/// transaction in logs.
async fn whole_then_one_by_one<'a, T, R, Fut>(
    items: &'a [T],
    what: &str,
    tx: impl Fn(&'a [T]) -> Fut,
) -> Vec<Result<R, JobError>>
where
    Fut: std::future::Future<Output = Result<Vec<R>, sqlx::Error>>,
{
    if items.is_empty() {
        return Vec::new();
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match tx(items).await {
            Ok(out) => return out.into_iter().map(Ok).collect(),
            Err(e) if store::is_transient(&e) && attempt < TX_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, what, "transaction failed; trying again");
            }
            Err(e) if items.len() == 1 => return vec![Err(JobError::Db(e))],
            Err(e) if store::is_transient(&e) => {
                let m = format!("database: {e}");
                return items
                    .iter()
                    .map(|_| Err(JobError::Retryable(m.clone())))
                    .collect();
            }
            Err(e) => {
                tracing::warn!(error = %e, size = items.len(), what, "transaction failed; running it one item at a time");
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    out.push(match tx(std::slice::from_ref(item)).await {
                        // One result per item: never empty.
                        Ok(mut one) => one.pop().ok_or(JobError::Db(sqlx::Error::RowNotFound)),
                        Err(e) => Err(JobError::Db(e)),
                    });
                }
                return out;
            }
        }
    }
}

/// Leases `ids` (distinct), see [`whole_then_one_by_one`].
async fn activate_all(ctx: &Ctx, ids: &[Uuid]) -> Vec<Result<Activation, JobError>> {
    whole_then_one_by_one(ids, "lease", |ids| {
        flows::invitations::activate_batch(ctx, ids, lease(ctx))
    })
    .await
}

/// Records the results, see [`whole_then_one_by_one`]. Answers, per result,
/// whether it was recorded (`Ok`, with whether a failure it recorded failed
/// a live invitation).
async fn record_all(
    ctx: &Ctx,
    results: &[(&invitations::Invitation, EmailResult)],
) -> Vec<Result<bool, JobError>> {
    whole_then_one_by_one(results, "results", |rs| async move {
        let live = flows::invitations::record_batch(ctx, rs).await?;
        Ok(rs.iter().map(|(i, _)| live.contains(&i.id)).collect())
    })
    .await
}

/// What the SMTP step of one leased invitation came to.
enum Sending {
    Sent(String),
    /// Nothing reached the mail server (rate limit, no SMTP slot in time,
    /// the partner could not be read): release, retry later, uncounted.
    NotSent(String),
    Failed(SendError),
    Template(JobError),
}

/// Sends a batch of invitation emails: every delivery is leased in one
/// transaction, the emails go out concurrently over the SMTP pool (at most
/// `PREREG_SMTP_POOL_SIZE` exchanges per batch; the pool itself holds at
/// most that many connections, reused), each after its partner's send
/// rate allows it, and every result is recorded in one transaction before
/// the runtime acknowledges the deliveries. Answers one result per job.
///
/// A job never sends an email the server may already have: the lease is
/// committed (synchronously) before any SMTP exchange, and only `sent`, a
/// failure or a release (nothing was sent) ends it. The SMTP step of the
/// batch ends by nine tenths of the job timeout: an exchange still running
/// then is abandoned as `delivery_unknown`, leaving time to record the
/// batch within the job timeout.
async fn invitations_batch(
    ctx: &Ctx,
    jobs: &[InvitationRequested],
) -> Vec<Result<Outcome, JobError>> {
    let started = tokio::time::Instant::now();
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.invitation_id).collect();
    let mut out: Vec<Option<Result<Outcome, JobError>>> = jobs.iter().map(|_| None).collect();
    let mut leased = Vec::new();
    for (i, a) in activate_all(ctx, &ids).await.into_iter().enumerate() {
        out[i] = Some(match a {
            Ok(Activation::Send(inv, p)) => {
                leased.push((i, inv, p));
                continue;
            }
            Ok(Activation::Skip(why)) => Ok(Outcome::Skipped(why)),
            Ok(Activation::Busy) => Err(JobError::Retryable(
                "another worker is sending this invitation".into(),
            )),
            Ok(Activation::Unknown(reason)) => {
                count("failed");
                Err(JobError::fatal("delivery_unknown", reason))
            }
            Err(e) => Err(e),
        });
    }

    // The partners' names, once per partner of the batch.
    let mut partners: HashMap<Uuid, Result<String, String>> = HashMap::new();
    for (_, inv, _) in &leased {
        if let std::collections::hash_map::Entry::Vacant(slot) = partners.entry(inv.partner_id) {
            let name = store::partners::get(&ctx.db, inv.partner_id)
                .await
                .map(|p| p.map(|p| p.name).unwrap_or_default())
                .map_err(|e| format!("database: {e}"));
            slot.insert(name);
        }
    }

    let slots = Semaphore::new(ctx.cfg.smtp_pool_size.max(1) as usize);
    let rate_until = started + ctx.cfg.job_timeout * 2 / 3;
    let smtp_until = started + ctx.cfg.job_timeout * 9 / 10;
    let sending = leased.iter().map(|(_, inv, p)| {
        let partner = &partners[&inv.partner_id];
        let slots = &slots;
        async move {
            let partner_name = match partner {
                Ok(name) => name,
                Err(e) => return Sending::NotSent(e.clone()),
            };
            let rendered = match render_invitation(ctx, inv, &p.full_name, partner_name) {
                Ok(r) => r,
                Err(e) => return Sending::Template(e),
            };
            if !wait_for_rate(ctx, inv.partner_id, rate_until).await {
                return Sending::NotSent("partner send rate limit reached".into());
            }
            let Ok(Ok(_slot)) = tokio::time::timeout_at(smtp_until, slots.acquire()).await else {
                return Sending::NotSent("no SMTP connection free within the job timeout".into());
            };
            let message_id = inv.id.to_string();
            let send = ctx.mailer.send(&p.email, &rendered, &message_id);
            match tokio::time::timeout_at(smtp_until, send).await {
                Ok(Ok(reply)) => Sending::Sent(reply),
                Ok(Err(e)) => Sending::Failed(e),
                Err(_) => Sending::Failed(SendError::Unknown(format!(
                    "no reply within {:?} of the batch's start",
                    ctx.cfg.job_timeout * 9 / 10
                ))),
            }
        }
    });
    let sendings = futures::future::join_all(sending).await;

    let mut results = Vec::with_capacity(leased.len());
    let mut errors = Vec::with_capacity(leased.len());
    for ((_, inv, p), s) in leased.iter().zip(sendings) {
        let (result, error) = match s {
            Sending::Sent(reply) => {
                tracing::info!(invitation_id = %inv.id, to = %mask::pii_email(&p.email), %reply, "invitation sent");
                (EmailResult::Sent, None)
            }
            Sending::NotSent(why) => (
                EmailResult::Release { uncount: true },
                Some(JobError::Retryable(why)),
            ),
            Sending::Template(e) => (EmailResult::Release { uncount: true }, Some(e)),
            Sending::Failed(SendError::Transient(e)) => {
                count("transient_failure");
                (
                    EmailResult::Release { uncount: false },
                    Some(JobError::Retryable(format!("smtp: {}", mask::text(&e)))),
                )
            }
            Sending::Failed(SendError::Unknown(e)) => {
                // The server may have taken the message: like a worker that
                // died mid-exchange, never send it again.
                let reason = format!(
                    "delivery outcome unknown: the mail server connection failed during the SMTP exchange ({}); resend if the customer did not receive it",
                    mask::text(&e)
                );
                (
                    EmailResult::Fail(reason.clone()),
                    Some(JobError::fatal("delivery_unknown", reason)),
                )
            }
            Sending::Failed(SendError::Permanent(e)) | Sending::Failed(SendError::Invalid(e)) => {
                // The reply may quote the customer's address: masked before
                // it is stored, logged or put in a dead-letter header.
                let e = mask::text(&e);
                (
                    EmailResult::Fail(e.clone()),
                    Some(JobError::fatal("smtp_permanent", e)),
                )
            }
        };
        results.push((&**inv, result));
        errors.push(error);
    }
    let recorded = record_all(ctx, &results).await;
    for ((((i, _, _), (_, result)), error), rec) in
        leased.iter().zip(&results).zip(errors).zip(recorded)
    {
        out[*i] = Some(match rec {
            Err(e) => Err(e),
            Ok(live) => {
                match result {
                    EmailResult::Sent => count("sent"),
                    EmailResult::Fail(_) if live => count("failed"),
                    _ => {}
                }
                error.map_or(Ok(Outcome::Done), Err)
            }
        });
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(JobError::Retryable("not handled".into()))))
        .collect()
}

/// Waits for a slot of the partner's send rate (a burst is spread out, not
/// failed). `false` when none came before `until`: the job is handed back
/// and its attempt not counted, it never reached the mail server. Without
/// Redis the rate is not enforced.
async fn wait_for_rate(ctx: &Ctx, partner: Uuid, until: tokio::time::Instant) -> bool {
    if ctx.cfg.partner_email_rate == 0 {
        return true;
    }
    loop {
        match ctx
            .locks
            .rate_allow(&format!("email:{partner}"), ctx.cfg.partner_email_rate)
            .await
        {
            Ok(true) => return true,
            Ok(false) => {
                count("rate_limited");
                // The rate's windows are whole seconds: try again soon after
                // the next one opens (jittered).
                let now = Utc::now();
                let to_next = 1000 - i64::from(now.timestamp_subsec_millis()).min(999);
                let jitter = rand::random::<u64>() % 100;
                let wait = std::time::Duration::from_millis(to_next as u64 + jitter);
                if tokio::time::Instant::now() + wait > until {
                    return false;
                }
                tokio::time::sleep(wait).await;
            }
            Err(LockError::Unavailable(e)) => {
                tracing::warn!(error = %e, "rate limit unavailable; sending");
                return true;
            }
            Err(LockError::Busy) => return true,
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
