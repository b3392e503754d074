//! Per-stage timings of the pipeline as one Prometheus histogram,
//! `prereg_stage_seconds{stage}`, whose label values come from a fixed set.
//! The bench (`scripts/bench.sh`) scrapes it before and after a run.

use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Bearer-key authentication of a request.
    Authentication,
    /// Reading and checking a request body.
    Validation,
    /// The intake's database work for a batch of accepted commands.
    IntakeDb,
    /// From publishing a batch of jobs until the broker confirmed them all.
    PublishConfirm,
    /// Waiting for the Redis customer locks of a decision (or a batch).
    LockWait,
    /// A decision (or a batch of them) inside its transaction, before commit.
    Decision,
    /// The commit of a decision transaction.
    Commit,
    /// Acknowledging the delivery (or batch) after the commit.
    Ack,
    /// How long an outbox row waited before it was published and
    /// confirmed: by the relay (from the row's insert), or by the process
    /// that staged it (from its commit).
    RelayLag,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Authentication => "authentication",
            Stage::Validation => "validation",
            Stage::IntakeDb => "intake_db",
            Stage::PublishConfirm => "publish_confirm",
            Stage::LockWait => "lock_wait",
            Stage::Decision => "decision",
            Stage::Commit => "commit",
            Stage::Ack => "ack",
            Stage::RelayLag => "relay_lag",
        }
    }
}

/// Records `secs` for `stage`.
pub fn observe(stage: Stage, secs: f64) {
    metrics::histogram!("prereg_stage_seconds", "stage" => stage.as_str()).record(secs);
}

/// Records the time since `started` for `stage`.
pub fn since(stage: Stage, started: Instant) {
    observe(stage, started.elapsed().as_secs_f64());
}
