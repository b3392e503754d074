//! Dependency health shared by every request and job of a process.
//!
//! A dependency (Postgres, RabbitMQ, Redis) is *down* from the moment a
//! request, a job or the background probe sees it fail at the connection
//! level, until the probe reaches it again. While Postgres or RabbitMQ is
//! down the intake answers `503` with `Retry-After` at once instead of letting
//! every request wait out a pool or connect timeout, and the probe (every
//! `PREREG_HEALTH_PROBE_INTERVAL`, 4 times as often while something is down)
//! brings it back without a restart.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// A dependency whose outage means "try again".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dep {
    Postgres,
    RabbitMq,
    Redis,
}

impl Dep {
    pub const ALL: [Dep; 3] = [Dep::Postgres, Dep::RabbitMq, Dep::Redis];

    pub fn name(self) -> &'static str {
        match self {
            Dep::Postgres => "postgres",
            Dep::RabbitMq => "rabbitmq",
            Dep::Redis => "redis",
        }
    }

    pub fn parse(s: &str) -> Option<Dep> {
        Dep::ALL.into_iter().find(|d| d.name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone)]
struct Down {
    since: Instant,
    reason: String,
}

/// The shared health state of one process's dependencies.
pub struct Health {
    down: [Mutex<Option<Down>>; 3],
    /// Wakes the probe at once (a request saw a suspicious failure).
    wake: Notify,
    /// How many seconds clients are told to wait (`Retry-After`).
    pub retry_after_secs: u64,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(2)
    }
}

impl Health {
    pub fn new(retry_after_secs: u64) -> Self {
        for d in Dep::ALL {
            metrics::gauge!("prereg_dependency_up", "dependency" => d.name()).set(1.0);
        }
        Self {
            down: Default::default(),
            wake: Notify::new(),
            retry_after_secs: retry_after_secs.max(1),
        }
    }

    /// Why `dep` is known to be down, if it is.
    /// What `read` says of `dep`'s current outage, if it is down.
    fn outage<T>(&self, dep: Dep, read: impl FnOnce(&Down) -> T) -> Option<T> {
        self.down[dep.index()].lock().ok()?.as_ref().map(read)
    }

    pub fn down_reason(&self, dep: Dep) -> Option<String> {
        self.outage(dep, |d| d.reason.clone())
    }

    pub fn is_down(&self, dep: Dep) -> bool {
        self.down_reason(dep).is_some()
    }

    /// How long `dep` has been down.
    pub fn down_for(&self, dep: Dep) -> Option<Duration> {
        self.outage(dep, |d| d.since.elapsed())
    }

    /// Records an outage (logged once per outage) and wakes the probe.
    pub fn mark_down(&self, dep: Dep, reason: impl Into<String>) {
        let reason = reason.into();
        if let Ok(mut slot) = self.down[dep.index()].lock() {
            if slot.is_none() {
                tracing::warn!(dependency = dep.name(), %reason, "dependency down");
                metrics::gauge!("prereg_dependency_up", "dependency" => dep.name()).set(0.0);
                metrics::counter!("prereg_dependency_outages_total", "dependency" => dep.name())
                    .increment(1);
                *slot = Some(Down {
                    since: Instant::now(),
                    reason,
                });
            }
        }
        self.wake.notify_one();
    }

    pub fn mark_up(&self, dep: Dep) {
        if let Ok(mut slot) = self.down[dep.index()].lock() {
            if let Some(d) = slot.take() {
                tracing::info!(dependency = dep.name(), down_for = ?d.since.elapsed(), "dependency back");
                metrics::gauge!("prereg_dependency_up", "dependency" => dep.name()).set(1.0);
            }
        }
    }

    /// A failure that may or may not be an outage (a pool timeout under
    /// load): probe now rather than at the next tick.
    pub fn suspect(&self, _dep: Dep) {
        self.wake.notify_one();
    }

    /// Resolves when an outage is recorded (the probe looks again at once).
    pub fn woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    pub fn any_down(&self) -> bool {
        Dep::ALL.into_iter().any(|d| self.is_down(d))
    }
}

/// Whether a database error means "the database is not there now; try
/// again" rather than a bug or a bad request: the connection failed or was
/// closed (administrator shutdown, crash recovery), the pool timed out, or
/// a statement ran past `statement_timeout` / `lock_timeout`.
pub fn db_unavailable(e: &sqlx::Error) -> bool {
    let state = sqlstate(e);
    match state.as_deref() {
        // 08: connection exception; 57P0x: admin shutdown, crash shutdown,
        // cannot connect now; 53300: too many connections; 57014: statement
        // timeout (query canceled); 55P03: lock not available; 40001/40P01:
        // serialization failure, deadlock.
        Some(s) if s.starts_with("08") => true,
        Some("57P01" | "57P02" | "57P03" | "53300" | "57014" | "55P03" | "40001" | "40P01") => true,
        _ => matches!(
            e,
            sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed
        ),
    }
}

/// Whether a database error says the server itself is gone (not merely
/// slow or busy): the health state marks Postgres down on these.
pub fn db_outage(e: &sqlx::Error) -> bool {
    let state = sqlstate(e);
    match state.as_deref() {
        Some(s) if s.starts_with("08") => true,
        Some("57P01" | "57P02" | "57P03") => true,
        _ => matches!(
            e,
            sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed
        ),
    }
}

/// The SQLSTATE of a database error, if it is one.
fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_transitions() {
        let h = Health::new(2);
        assert!(!h.is_down(Dep::Postgres));
        h.mark_down(Dep::Postgres, "refused");
        h.mark_down(Dep::Postgres, "again");
        assert_eq!(h.down_reason(Dep::Postgres).as_deref(), Some("refused"));
        assert!(!h.is_down(Dep::RabbitMq));
        h.mark_up(Dep::Postgres);
        assert!(!h.is_down(Dep::Postgres));
        assert_eq!(Dep::parse("rabbitmq"), Some(Dep::RabbitMq));
    }

    #[test]
    fn classification() {
        assert!(db_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!db_outage(&sqlx::Error::PoolTimedOut));
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(db_unavailable(&io) && db_outage(&io));
        assert!(!db_unavailable(&sqlx::Error::RowNotFound));
    }
}
