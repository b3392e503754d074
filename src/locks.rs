//! Redis locks: one key per normalised email and mobile, taken in a fixed
//! (sorted) order, with expiry, released only by their owner. Redis being
//! down costs speed, never correctness: callers fall back on Postgres
//! constraints when `acquire` answers `Unavailable`.
//!
//! The expiry is short (`PREREG_LOCK_TTL`, 1 s) and a watchdog renews it
//! every third of it while the guard lives, so a long job keeps its locks
//! but a crashed worker's locks free themselves within the TTL.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use redis::aio::ConnectionManager;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::{CancellationToken, DropGuard};

#[derive(Debug, Error)]
pub enum LockError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("lock busy: held by another worker for longer than the wait")]
    Busy,
}

/// Deletes every key still held by this owner (one round trip for a whole
/// batch); returns how many were.
const RELEASE: &str = r"local n = 0
for i, k in ipairs(KEYS) do
  if redis.call('get', k) == ARGV[1] then
    redis.call('del', k)
    n = n + 1
  end
end
return n";

/// Takes the locks of a batch in one round trip, group by group: a group (the
/// keys of one job) is taken whole when each of its keys is free or already
/// this owner's (a customer twice in one batch), or not at all. Nothing is
/// ever waited for while holding, so two batches cannot deadlock.
/// ARGV: token, ttl (ms), number of groups, then per group its size followed
/// by the 1-based indexes of its keys in KEYS. Returns 1 or 0 per group.
const ACQUIRE_GROUPS: &str = r"local token = ARGV[1]
local ttl = ARGV[2]
local groups = tonumber(ARGV[3])
local out = {}
local pos = 4
for g = 1, groups do
  local n = tonumber(ARGV[pos])
  pos = pos + 1
  local free = true
  for j = 0, n - 1 do
    local v = redis.call('get', KEYS[tonumber(ARGV[pos + j])])
    if v and v ~= token then
      free = false
    end
  end
  if free then
    for j = 0, n - 1 do
      redis.call('set', KEYS[tonumber(ARGV[pos + j])], token, 'PX', ttl)
    end
    out[g] = 1
  else
    out[g] = 0
  end
  pos = pos + n
end
return out";

/// Extends every key still held by this owner; returns how many were.
const RENEW: &str = r"local n = 0
for i, k in ipairs(KEYS) do
  if redis.call('get', k) == ARGV[1] then
    redis.call('pexpire', k, ARGV[2])
    n = n + 1
  end
end
return n";

pub struct Locks {
    client: Option<redis::Client>,
    conn: Mutex<Option<ConnectionManager>>,
    /// No new connection attempt before this instant after a failure.
    retry_after: Mutex<Option<Instant>>,
    prefix: String,
    ttl: Duration,
    wait: Duration,
    op_timeout: Duration,
}

#[must_use = "release the guard when done"]
pub struct LockGuard {
    keys: Vec<String>,
    token: String,
    /// Stops the watchdog when the guard is released or dropped.
    renewal: Option<DropGuard>,
    lost: Arc<AtomicBool>,
}

impl LockGuard {
    /// Whether a renewal found a lock no longer ours (it expired first, e.g.
    /// after a long pause). Postgres constraints still decide correctly.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Stops renewing: the locks expire after their TTL unless released (a
    /// crashed owner, as tests simulate it).
    pub fn stop_renewing(&mut self) {
        self.renewal.take();
    }
}

/// Renews `keys` every third of `ttl` until cancelled or a lock is lost.
async fn watchdog(
    mut conn: ConnectionManager,
    keys: Vec<String>,
    token: String,
    ttl: Duration,
    op_timeout: Duration,
    stop: CancellationToken,
    lost: Arc<AtomicBool>,
) {
    let every = (ttl / 3).max(Duration::from_millis(10));
    let script = redis::Script::new(RENEW);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let mut inv = script.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(&token).arg(ttl.as_millis() as u64);
        let call = inv.invoke_async::<i64>(&mut conn);
        let result = tokio::time::timeout(op_timeout.min(every), call).await;
        if stop.is_cancelled() {
            // Released meanwhile (the release may have run between the keys).
            return;
        }
        match result {
            Ok(Ok(n)) if n as usize == keys.len() => {}
            Ok(Ok(n)) => {
                metrics::counter!("prereg_lock_lost_total").increment(1);
                tracing::warn!(
                    held = n,
                    of = keys.len(),
                    "lock expired before renewal; Postgres constraints still hold"
                );
                lost.store(true, Ordering::Relaxed);
                return;
            }
            // Redis slow or down: try again; the lock may expire meanwhile.
            Ok(Err(e)) => tracing::debug!(error = %e, "lock renewal failed"),
            Err(_) => tracing::debug!("lock renewal timed out"),
        }
    }
}

impl Locks {
    pub fn new(url: &str, prefix: &str, ttl: Duration, wait: Duration) -> Self {
        let client = redis::Client::open(url)
            .map_err(
                |e| tracing::error!(error = %e, "invalid PREREG_REDIS_URL; running without locks"),
            )
            .ok();
        Self {
            client,
            conn: Mutex::new(None),
            retry_after: Mutex::new(None),
            prefix: prefix.to_string(),
            ttl,
            wait,
            op_timeout: Duration::from_millis(500),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, LockError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let client = self
            .client
            .clone()
            .ok_or_else(|| LockError::Unavailable("no valid redis url".into()))?;
        {
            let retry = self.retry_after.lock().await;
            if retry.is_some_and(|t| Instant::now() < t) {
                return Err(LockError::Unavailable(
                    "redis down (recent connection failure)".into(),
                ));
            }
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.op_timeout)
            .set_response_timeout(self.op_timeout)
            .set_number_of_retries(1);
        match tokio::time::timeout(
            self.op_timeout * 2,
            ConnectionManager::new_with_config(client, cfg),
        )
        .await
        {
            Ok(Ok(c)) => {
                *guard = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => {
                *self.retry_after.lock().await = Some(Instant::now() + Duration::from_secs(1));
                Err(LockError::Unavailable(e.to_string()))
            }
            Err(_) => {
                *self.retry_after.lock().await = Some(Instant::now() + Duration::from_secs(1));
                Err(LockError::Unavailable("connection timed out".into()))
            }
        }
    }

    /// Lock names carry emails and mobiles: the key holds their SHA-256
    /// only (no personal data in Redis key names, SPEC §8).
    fn key(&self, name: &str) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(name.as_bytes());
        format!("{}:lock:{}", self.prefix, hex::encode(digest))
    }

    /// Takes every lock in `names` (sorted, deduplicated) or none.
    pub async fn acquire(&self, names: &[String]) -> Result<LockGuard, LockError> {
        let mut keys: Vec<String> = names.iter().map(|n| self.key(n)).collect();
        keys.sort();
        keys.dedup();
        let token = format!("{:032x}", rand::thread_rng().gen::<u128>());
        let mut conn = self.connection().await?;
        let deadline = Instant::now() + self.wait;
        let mut held: Vec<String> = Vec::new();
        for key in &keys {
            loop {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl.as_millis() as u64);
                let set = cmd.query_async::<Option<String>>(&mut conn);
                match tokio::time::timeout(self.op_timeout, set).await {
                    Ok(Ok(Some(_))) => {
                        held.push(key.clone());
                        break;
                    }
                    Ok(Ok(None)) if Instant::now() < deadline => {
                        let pause = rand::thread_rng().gen_range(2..15);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                    Ok(Ok(None)) => {
                        self.release_keys(&mut conn, &held, &token).await;
                        return Err(LockError::Busy);
                    }
                    Ok(Err(e)) => {
                        self.release_keys(&mut conn, &held, &token).await;
                        return Err(LockError::Unavailable(e.to_string()));
                    }
                    Err(_) => {
                        self.release_keys(&mut conn, &held, &token).await;
                        return Err(LockError::Unavailable("redis timed out".into()));
                    }
                }
            }
        }
        Ok(self.guard(conn, held, token))
    }

    /// Takes the locks of a batch in one round trip: `groups[i]` are the
    /// names one job needs, taken all or none (see `ACQUIRE_GROUPS`).
    /// Returns one guard over every key taken (renewed by one watchdog,
    /// released in one round trip) and, per group, whether it was taken. A
    /// group not taken is held by another owner right now; the caller tries
    /// it again later (never while waiting with the others held).
    pub async fn try_acquire_groups(
        &self,
        groups: &[Vec<String>],
    ) -> Result<(LockGuard, Vec<bool>), LockError> {
        let mut keys: Vec<String> = Vec::new();
        let mut index: std::collections::HashMap<String, usize> = Default::default();
        let mut layout: Vec<Vec<usize>> = Vec::with_capacity(groups.len());
        for names in groups {
            let mut g: Vec<usize> = names
                .iter()
                .map(|n| {
                    let k = self.key(n);
                    *index.entry(k.clone()).or_insert_with(|| {
                        keys.push(k);
                        keys.len()
                    })
                })
                .collect();
            g.sort_unstable();
            g.dedup();
            layout.push(g);
        }
        let token = format!("{:032x}", rand::thread_rng().gen::<u128>());
        let mut conn = self.connection().await?;
        let script = redis::Script::new(ACQUIRE_GROUPS);
        let mut inv = script.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(&token)
            .arg(self.ttl.as_millis() as u64)
            .arg(layout.len());
        for g in &layout {
            inv.arg(g.len());
            for i in g {
                inv.arg(*i);
            }
        }
        let call = inv.invoke_async::<Vec<i64>>(&mut conn);
        let taken = match tokio::time::timeout(self.op_timeout, call).await {
            Ok(Ok(t)) if t.len() == layout.len() => t,
            Ok(Ok(t)) => {
                self.release_keys(&mut conn, &keys, &token).await;
                return Err(LockError::Unavailable(format!(
                    "lock script answered {} groups of {}",
                    t.len(),
                    layout.len()
                )));
            }
            Ok(Err(e)) => {
                // It may have run: free whatever it took.
                self.release_keys(&mut conn, &keys, &token).await;
                return Err(LockError::Unavailable(e.to_string()));
            }
            Err(_) => {
                self.release_keys(&mut conn, &keys, &token).await;
                return Err(LockError::Unavailable("redis timed out".into()));
            }
        };
        let ok: Vec<bool> = taken.iter().map(|t| *t == 1).collect();
        let mut held: Vec<String> = layout
            .iter()
            .zip(&ok)
            .filter(|(_, ok)| **ok)
            .flat_map(|(g, _)| g.iter().map(|i| keys[*i - 1].clone()))
            .collect();
        held.sort();
        held.dedup();
        Ok((self.guard(conn, held, token), ok))
    }

    fn guard(&self, conn: ConnectionManager, held: Vec<String>, token: String) -> LockGuard {
        let stop = CancellationToken::new();
        let lost = Arc::new(AtomicBool::new(false));
        if !held.is_empty() {
            tokio::spawn(watchdog(
                conn,
                held.clone(),
                token.clone(),
                self.ttl,
                self.op_timeout,
                stop.clone(),
                lost.clone(),
            ));
        }
        LockGuard {
            keys: held,
            token,
            renewal: Some(stop.drop_guard()),
            lost,
        }
    }

    /// Releases `keys` where `token` still holds them, in one round trip.
    async fn release_keys(&self, conn: &mut ConnectionManager, keys: &[String], token: &str) {
        if keys.is_empty() {
            return;
        }
        let script = redis::Script::new(RELEASE);
        let mut inv = script.prepare_invoke();
        for key in keys {
            inv.key(key);
        }
        inv.arg(token);
        let call = inv.invoke_async::<i64>(conn);
        match tokio::time::timeout(self.op_timeout, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "lock release failed; it will expire"),
            Err(_) => tracing::warn!("lock release timed out; it will expire"),
        }
    }

    /// Releases what the guard holds, only where this owner still holds it.
    pub async fn release(&self, mut guard: LockGuard) {
        guard.renewal.take();
        if let Ok(mut conn) = self.connection().await {
            self.release_keys(&mut conn, &guard.keys, &guard.token)
                .await;
        }
    }

    /// A fixed one-second window counter: whether one more event under `key`
    /// stays within `per_second`. Redis being down allows (and says so).
    pub async fn rate_allow(&self, key: &str, per_second: u32) -> Result<bool, LockError> {
        let mut conn = self.connection().await?;
        let window = chrono::Utc::now().timestamp();
        let k = format!("{}:rate:{key}:{window}", self.prefix);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("INCR")
            .arg(&k)
            .cmd("EXPIRE")
            .arg(&k)
            .arg(2)
            .ignore();
        let call = pipe.query_async::<(u64,)>(&mut conn);
        match tokio::time::timeout(self.op_timeout, call).await {
            Ok(Ok((n,))) => Ok(n <= u64::from(per_second)),
            Ok(Err(e)) => Err(LockError::Unavailable(e.to_string())),
            Err(_) => Err(LockError::Unavailable("timeout".into())),
        }
    }

    pub async fn ping(&self) -> Result<(), LockError> {
        let mut conn = self.connection().await?;
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match tokio::time::timeout(self.op_timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(LockError::Unavailable(e.to_string())),
            Err(_) => Err(LockError::Unavailable("timeout".into())),
        }
    }
}
