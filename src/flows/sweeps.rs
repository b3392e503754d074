//! The expiry sweep (SPEC §5): the state changes of one run.
//!
//! - Claims past `expires_at` that are not associated become `expired`: the
//!   customer is free for any partner at once.
//! - Invitation links past their expiry, and outstanding links of the claims
//!   that just expired, become `expired` (only where the `invitations` table
//!   exists; see [`expire_links`]).
//! - Partners are reminded `PREREG_CLAIM_REMINDER_BEFORE` ahead of a claim's
//!   expiry (an `email.requested` command through the outbox).
//!
//! Every step works in bounded batches: one transaction per batch picks due
//! rows from a partial index that holds only rows that can still become due
//! (`ORDER BY expires_at LIMIT n FOR UPDATE SKIP LOCKED`), changes them, and
//! writes the timeline entries and outbox messages in bulk. Sweeps on several
//! nodes at once skip each other's locked rows, so no row is handled twice,
//! and a sweep with nothing due costs a few index probes. A run stops after a
//! time budget and hands the rest to a fresh `sweep.requested`; a complete run
//! is recorded in `sweep_runs`.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use uuid::Uuid;

use super::outbox_job;
use crate::{
    context::Ctx,
    jobs::{EmailRequested, NoticeKind, SweepRequested},
    mq::CloudEvent,
    store::{self, invitations::LinkRef},
};

/// The name of this sweep in `sweep_runs`.
pub const NAME: &str = store::calendar::SWEEP_RUN;
const ACTOR: &str = "system:sweep";

/// What one run did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SweepStats {
    pub claims_expired: u64,
    pub links_expired: u64,
    pub reminders: u64,
    pub batches: u64,
    /// Stopped on its time budget; a continuation was queued.
    pub incomplete: bool,
    pub duration_ms: u64,
}

/// Runs one complete sweep (or as much as fits its time budget).
pub async fn run(ctx: &Ctx) -> Result<SweepStats, sqlx::Error> {
    run_with_budget(ctx, ctx.cfg.job_timeout / 2).await
}

pub async fn run_with_budget(ctx: &Ctx, budget: Duration) -> Result<SweepStats, sqlx::Error> {
    let started_at = Utc::now();
    let t0 = Instant::now();
    let batch = ctx.cfg.sweep_batch.max(1);
    let mut stats = SweepStats::default();
    let mut expired_ids: Vec<Uuid> = Vec::new();
    let over_budget = |stats: &mut SweepStats| {
        let over = t0.elapsed() >= budget;
        stats.incomplete |= over;
        over
    };

    // 1. Claims: `PREREG_SWEEP_PARALLELISM` batch loops at once (they skip
    //    each other's locked rows like sweeps on other nodes do). A loop ends
    //    on a batch that is not full: nothing unlocked was left for it.
    let loops = (0..ctx.cfg.sweep_parallelism.max(1)).map(|_| async {
        let mut ids: Vec<Uuid> = Vec::new();
        let mut batches = 0u64;
        let mut incomplete = false;
        loop {
            let got = expire_claims_batch(ctx, batch).await?;
            batches += 1;
            let full = got.len() as i64 == batch;
            ids.extend(got);
            if !full {
                break;
            }
            if t0.elapsed() >= budget {
                incomplete = true;
                break;
            }
        }
        Ok::<_, sqlx::Error>((ids, batches, incomplete))
    });
    for result in futures::future::join_all(loops).await {
        let (ids, batches, incomplete) = result?;
        stats.claims_expired += ids.len() as u64;
        stats.batches += batches;
        stats.incomplete |= incomplete;
        expired_ids.extend(ids);
    }
    // 2. Invitation links (a separate step: a failure here never undoes or
    //    blocks the claims).
    if !stats.incomplete {
        match expire_links(ctx, batch, &expired_ids).await {
            Ok(n) => stats.links_expired = n,
            Err(e) => {
                tracing::warn!(error = %e, "invitation link expiry failed; will retry next sweep")
            }
        }
    }
    // Exports past their retention lose their file.
    match store::history::expire_exports(&ctx.db).await {
        Ok(n) if n > 0 => tracing::info!(chunks = n, "expired export files removed"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "export cleanup failed; will retry next sweep"),
    }
    // 3. Reminders of claims about to expire.
    if !stats.incomplete && !ctx.cfg.claim_reminder_before.is_zero() {
        loop {
            let n = remind_claims_batch(ctx, batch).await?;
            stats.batches += 1;
            stats.reminders += n;
            if (n as i64) < batch || over_budget(&mut stats) {
                break;
            }
        }
    }
    stats.duration_ms = t0.elapsed().as_millis() as u64;
    if stats.incomplete {
        // Hand the rest to a fresh job rather than hold this one past its timeout.
        let next = outbox_job(
            uuid::Uuid::now_v7().to_string(),
            &SweepRequested {
                requested_by: Some("system:sweep-continuation".into()),
                ..Default::default()
            },
        )?;
        let mut conn = ctx.db.acquire().await?;
        store::outbox::command(&mut conn, &next).await?;
    } else {
        super::runs::record(ctx, NAME, started_at, &stats).await?;
    }
    metrics::counter!("prereg_sweep_claims_expired_total").increment(stats.claims_expired);
    metrics::counter!("prereg_sweep_links_expired_total").increment(stats.links_expired);
    metrics::counter!("prereg_claim_reminders_total").increment(stats.reminders);
    metrics::histogram!("prereg_sweep_duration_seconds", "sweep" => NAME)
        .record(t0.elapsed().as_secs_f64());
    Ok(stats)
}

/// Expires up to `batch` due claims in one transaction. Returns their ids.
async fn expire_claims_batch(ctx: &Ctx, batch: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    // A commit lost in a crash only means the next sweep expires those claims
    // again, with the same event ids: no need to wait for the WAL flush.
    store::relaxed_commit(&mut tx).await?;
    let ids = store::preregs::expire_due_claims(&mut tx, batch, ACTOR, crate::mq::envelope::SOURCE)
        .await?;
    tx.commit().await?;
    Ok(ids)
}

/// Reminds partners of claims expiring within `PREREG_CLAIM_REMINDER_BEFORE`:
/// marks each claim once (`expiry_reminder_sent_at`) and queues the email in
/// the same transaction. Claims of partners without a contact email are
/// marked without an email.
async fn remind_claims_batch(ctx: &Ctx, batch: i64) -> Result<u64, sqlx::Error> {
    let before_ms = super::millis(ctx.cfg.claim_reminder_before);
    let mut tx = ctx.db.begin().await?;
    let rows = store::preregs::mark_expiry_reminders(&mut tx, batch, before_ms).await?;
    // A partner without a contact email gets no reminder; the email worker
    // reads the recipient from the partner row when it sends.
    let emails = rows
        .iter()
        .filter(|r| r.contact_email.is_some())
        .map(|r| {
            let id = r.id;
            Ok(outbox_job(
                format!("email:claim_expiry_reminder:{id}"),
                &EmailRequested {
                    kind: NoticeKind::ClaimExpiryReminder,
                    attempt_id: None,
                    review_id: None,
                    preregistration_id: Some(id),
                },
            )?
            .subject(id))
        })
        .collect::<Result<Vec<CloudEvent>, sqlx::Error>>()?;
    super::commit_reminders(tx, rows.len(), &emails).await
}

/// Invitation links: those past their own expiry, and the outstanding ones
/// of the claims this run expired (an offline link has no expiry of its own
/// and ends with its claim). Uses the partial index on `link_expires_at`.
pub async fn expire_links(
    ctx: &Ctx,
    batch: i64,
    expired_claims: &[Uuid],
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    for chunk in expired_claims.chunks(batch as usize) {
        let mut tx = ctx.db.begin().await?;
        let rows = store::invitations::expire_for_claims(&mut tx, chunk).await?;
        total += rows.len() as u64;
        store::outbox::events(&mut tx, &link_events(&rows, "claim_expired")).await?;
        tx.commit().await?;
    }
    loop {
        let mut tx = ctx.db.begin().await?;
        let rows = store::invitations::expire_due_links(&mut tx, batch).await?;
        let n = rows.len();
        total += n as u64;
        store::outbox::events(&mut tx, &link_events(&rows, "link_validity_passed")).await?;
        tx.commit().await?;
        if (n as i64) < batch {
            break;
        }
    }
    Ok(total)
}

fn link_events(rows: &[LinkRef], reason: &str) -> Vec<CloudEvent> {
    rows.iter()
        .map(|r| super::invitations::expired_event(r.id, r.preregistration_id, reason))
        .collect()
}
