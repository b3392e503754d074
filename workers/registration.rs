//! Registration: decides pre-registrations (SPEC §1). Manual reviews are
//! opened by `workers/reviews.rs`.
//!
//! The decision itself is [`crate::flows::registration`] (a batch of
//! commands in one transaction, with the customer locks of the batch); this
//! module maps its verdicts onto the worker runtime's outcomes. The runtime
//! hands it a batch of deliveries at a time ([`handle_batch`]); [`handle`]
//! decides one.

use std::time::Instant;

use rand::Rng;

use super::{JobError, Outcome};
use crate::{
    context::Ctx,
    flows::registration::{self as flow, Failure, Request, Verdict},
    jobs::PreregistrationRequested,
    mq::CloudEvent,
};

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
