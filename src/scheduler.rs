//! `prereg scheduler`: every `PREREG_SWEEP_INTERVAL` publishes a
//! `sweep.requested` and a `deadline.tick` command.
//!
//! Ticks are aligned on wall-clock slots (`unix time / interval`) and their
//! CloudEvent ids name the slot (`sweep:<slot>`, `deadline:<slot>`), so any
//! number of schedulers publish the same messages at about the same moment.
//! The handlers skip a tick whose slot a successful run has already covered,
//! and are idempotent anyway, so extra schedulers cost a few milliseconds.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Ctx,
    jobs::{DeadlineTick, SweepRequested},
    mq::{CloudEvent, PublishError},
};

/// The slot a moment falls in, for slots of `interval`.
pub fn slot_of(at: DateTime<Utc>, interval: Duration) -> i64 {
    let ms = interval.as_millis().clamp(1, i64::MAX as u128) as i64;
    at.timestamp_millis().div_euclid(ms)
}

/// When a slot starts.
pub fn slot_start(slot: i64, interval: Duration) -> DateTime<Utc> {
    let ms = interval.as_millis().clamp(1, i64::MAX as u128) as i64;
    DateTime::from_timestamp_millis(slot.saturating_mul(ms)).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The two ticks of one slot. Identical whoever builds them.
pub fn ticks(slot: i64, interval: Duration) -> Result<[CloudEvent; 2], serde_json::Error> {
    let at = slot_start(slot, interval);
    let by = Some("system:scheduler".to_string());
    let sweep = SweepRequested {
        scheduled_at: Some(at),
        slot: Some(slot),
        requested_by: by.clone(),
    };
    let deadline = DeadlineTick {
        scheduled_at: Some(at),
        slot: Some(slot),
        requested_by: by,
    };
    let mut sweep = CloudEvent::job(format!("sweep:{slot}"), &sweep)?;
    let mut deadline = CloudEvent::job(format!("deadline:{slot}"), &deadline)?;
    sweep.time = at;
    deadline.time = at;
    Ok([sweep, deadline])
}

/// Publishes the ticks of `slot` (with publisher confirms).
pub async fn publish_slot(ctx: &Ctx, slot: i64) -> Result<(), PublishError> {
    let ticks =
        ticks(slot, ctx.cfg.sweep_interval).map_err(|e| PublishError::Encode(e.to_string()))?;
    for ev in ticks {
        ctx.broker.publish_command(&ev).await?;
    }
    Ok(())
}

/// Publishes the current slot's ticks at once (a restarted scheduler catches
/// up), then one slot at a time until cancelled. A slot whose ticks could not
/// be published is retried until the next slot begins.
pub async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let interval = ctx.cfg.sweep_interval.max(Duration::from_millis(100));
    tracing::info!(?interval, "scheduler started");
    let mut last_published: Option<i64> = None;
    loop {
        let now = Utc::now();
        let slot = slot_of(now, interval);
        let wait = if last_published == Some(slot) {
            // Sleep until the next slot begins.
            let next = slot_start(slot + 1, interval);
            (next - now).to_std().unwrap_or(Duration::ZERO)
        } else {
            match publish_slot(&ctx, slot).await {
                Ok(()) => {
                    metrics::counter!("prereg_scheduler_ticks_total").increment(1);
                    last_published = Some(slot);
                    Duration::ZERO
                }
                Err(e) => {
                    tracing::warn!(error = %e, slot, "could not publish ticks; retrying");
                    metrics::counter!("prereg_scheduler_publish_failures_total").increment(1);
                    Duration::from_millis(500).min(interval)
                }
            }
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::info!("scheduler stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_and_ids_deterministic() {
        let i = Duration::from_secs(60);
        let at = DateTime::from_timestamp(1_800_000_030, 0).unwrap();
        let slot = slot_of(at, i);
        assert_eq!(slot, 30_000_000);
        assert_eq!(slot_start(slot, i).timestamp(), 1_800_000_000);
        let [a, b] = ticks(slot, i).unwrap();
        let [a2, b2] = ticks(slot, i).unwrap();
        assert_eq!(a, a2);
        assert_eq!(b, b2);
        assert_eq!(a.id, "sweep:30000000");
        assert_eq!(b.ty, "deadline.tick");
        assert_eq!(
            a.data["scheduled_at"],
            serde_json::json!(slot_start(slot, i))
        );
    }
}
