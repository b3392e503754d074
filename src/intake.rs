//! Intake group commit for `POST /v1/preregistrations`.
//!
//! Concurrent requests join a batch (flushed at `PREREG_INTAKE_BATCH_SIZE`
//! requests or `PREREG_INTAKE_BATCH_LINGER` after the first, whichever comes
//! first). One transaction per batch claims the batch's `Idempotency-Key`s
//! and inserts the `queued` rows and their timeline entries with one
//! multi-row statement each; then the jobs are published together and their
//! confirms awaited together. Each request gets its own answer:
//!
//! - confirmed: 202, and nothing more is written;
//! - certainly not taken by the broker (refused, unroutable, no connection):
//!   its row and key are withdrawn in one transaction and it gets 503 with
//!   nothing done;
//! - no confirm in time (the broker may hold it): 202, because the work will
//!   happen either way: the row is made durable and stays `queued`, and the
//!   relay republishes it once its `republish_at` (a grace period after the
//!   insert) passes (a duplicate is harmless: the job's id makes it so).
//!   This is SPEC §8 "accepted is never lost": answering 503 here would be
//!   wrong whenever the broker did take the message.
//!
//! A crash anywhere leaves either nothing (before the commit) or a committed
//! `queued` row, which the relay republishes after the grace period (SPEC §8's
//! "republisher of stale `queued` work"): no row stays `queued` forever. The
//! row itself carries its job, so the intake writes no outbox row and deletes
//! nothing after the confirm (two writes per request fewer than an outbox).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Semaphore};
use uuid::Uuid;

use crate::{
    mq::CloudEvent,
    publisher::{Fate, Outgoing, Publisher},
    stages::{self, Stage},
    store::{idempotency::Stored, intake, partners::Partner, preregs::NewPrereg},
};

/// Most batches written and awaiting confirms at once.
const FLUSHES_IN_FLIGHT: usize = 8;
/// How long a cached partner row is used.
const PARTNER_TTL: Duration = Duration::from_secs(2);

/// An `Idempotency-Key` of a request: who, which key, the request's hash.
#[derive(Debug, Clone)]
pub struct IdemKey {
    pub principal: String,
    pub key: String,
    pub hash: Vec<u8>,
}

/// One accepted-for-processing request.
pub struct Request {
    pub cmd: NewPrereg,
    /// Who asked (timeline actor).
    pub actor: String,
    pub request_id: String,
    pub idem: Option<IdemKey>,
}

/// What the intake answers a request.
#[derive(Debug)]
pub enum Answer {
    /// The answer to give (202, or the stored first answer of a key).
    Respond(Stored),
    /// The key was used with a different request.
    KeyMismatch,
    /// The broker did not take the job; nothing was done.
    Unavailable(String),
    /// The database failed; nothing was done.
    Database(sqlx::Error),
}

struct Pending {
    req: Request,
    reply: oneshot::Sender<Answer>,
}

pub struct Intake {
    tx: mpsc::Sender<Pending>,
    partners: Mutex<HashMap<Uuid, (Partner, Instant)>>,
}

impl Intake {
    /// Starts the batcher (a task that ends when the `Intake` is dropped).
    pub fn start(
        db: PgPool,
        publisher: Arc<Publisher>,
        batch_size: usize,
        linger: Duration,
        grace: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel(batch_size.max(1) * FLUSHES_IN_FLIGHT * 2);
        let flusher = Flusher {
            db,
            publisher,
            grace,
        };
        tokio::spawn(batcher(rx, Arc::new(flusher), batch_size.max(1), linger));
        Self {
            tx,
            partners: Mutex::new(HashMap::new()),
        }
    }

    /// Queues the request for the next batch and waits for its answer.
    pub async fn submit(&self, req: Request) -> Answer {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Pending { req, reply }).await.is_err() {
            return Answer::Unavailable("the intake is shutting down".into());
        }
        answer
            .await
            .unwrap_or_else(|_| Answer::Unavailable("the batch was abandoned".into()))
    }

    /// The partner row, cached for a couple of seconds (permissions changed
    /// by an operator apply within that time).
    pub async fn partner(&self, db: &PgPool, id: Uuid) -> Result<Option<Partner>, sqlx::Error> {
        if let Ok(map) = self.partners.lock() {
            if let Some((p, at)) = map.get(&id) {
                if at.elapsed() < PARTNER_TTL {
                    return Ok(Some(p.clone()));
                }
            }
        }
        let p = crate::store::partners::get(db, id).await?;
        if let (Some(p), Ok(mut map)) = (&p, self.partners.lock()) {
            if map.len() > 10_000 {
                map.clear();
            }
            map.insert(id, (p.clone(), Instant::now()));
        }
        Ok(p)
    }
}

async fn batcher(
    mut rx: mpsc::Receiver<Pending>,
    flusher: Arc<Flusher>,
    size: usize,
    linger: Duration,
) {
    let slots = Arc::new(Semaphore::new(FLUSHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < size {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(p)) => batch.push(p),
                    _ => break,
                },
            }
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let f = flusher.clone();
        tokio::spawn(async move {
            f.flush(batch).await;
            drop(permit);
        });
    }
}

struct Flusher {
    db: PgPool,
    publisher: Arc<Publisher>,
    grace: Duration,
}

/// A request of the batch that writes (the first of its key).
struct Leader {
    pending: Pending,
    /// Later requests of the batch with the same key.
    followers: Vec<Pending>,
}

/// What the write step decided for one leader.
enum Written {
    /// Row and timeline entry written.
    New,
    /// The key was used before (by a committed request).
    Replay(Stored),
    Mismatch,
}

fn accepted(id: Uuid) -> Stored {
    Stored {
        status: 202,
        body: json!({"id": id, "status": "queued"}),
        location: Some(format!("/v1/preregistrations/{id}")),
    }
}

fn job(r: &Request) -> CloudEvent {
    intake::job(&r.cmd, Some(&r.request_id))
}

impl Flusher {
    async fn flush(&self, batch: Vec<Pending>) {
        // Requests of one batch sharing a key: the first writes, the others
        // get its answer (or a mismatch).
        let mut leaders: Vec<Leader> = Vec::with_capacity(batch.len());
        let mut by_key: HashMap<(String, String), usize> = HashMap::new();
        for p in batch {
            if let Some(k) = &p.req.idem {
                let slot = (k.principal.clone(), k.key.clone());
                if let Some(&i) = by_key.get(&slot) {
                    leaders[i].followers.push(p);
                    continue;
                }
                by_key.insert(slot, leaders.len());
            }
            leaders.push(Leader {
                pending: p,
                followers: Vec::new(),
            });
        }
        let started = Instant::now();
        let written = match self.write(&leaders).await {
            Ok(w) => w,
            Err(e) if leaders.len() > 1 => {
                // One bad request must not fail its neighbours: write each alone.
                tracing::warn!(error = %e, n = leaders.len(), "intake batch failed; writing its requests one by one");
                let mut out = Vec::with_capacity(leaders.len());
                for l in leaders {
                    let one = vec![l];
                    let w = self.write(&one).await;
                    out.push((one, w));
                }
                for (one, w) in out {
                    match w {
                        Ok(w) => self.publish_and_answer(one, w).await,
                        Err(e) => fail(one, e),
                    }
                }
                return;
            }
            Err(e) => {
                fail(leaders, e);
                return;
            }
        };
        stages::since(Stage::IntakeDb, started);
        self.publish_and_answer(leaders, written).await;
    }

    /// One transaction: claim the keys, write rows and timeline entries.
    async fn write(&self, leaders: &[Leader]) -> Result<Vec<Written>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        // The rows' insert also makes this commit not wait for the WAL flush
        // (see `intake::insert_queued`).
        let mut fate: Vec<Option<Written>> = (0..leaders.len()).map(|_| None).collect();

        // Keys first, in a fixed order (two batches never wait on each other
        // in a cycle). A key held by a concurrent request blocks here until
        // that request commits (then we replay its answer) or rolls back
        // (then the key is ours).
        let mut keyed: Vec<(usize, &IdemKey)> = leaders
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.pending.req.idem.as_ref().map(|k| (i, k)))
            .collect();
        keyed.sort_by(|a, b| (&a.1.principal, &a.1.key).cmp(&(&b.1.principal, &b.1.key)));
        if !keyed.is_empty() {
            let answers: Vec<Stored> = keyed
                .iter()
                .map(|(i, _)| accepted(leaders[*i].pending.req.cmd.id))
                .collect();
            let claims = intake::KeyClaims {
                principals: keyed.iter().map(|(_, k)| k.principal.as_str()).collect(),
                keys: keyed.iter().map(|(_, k)| k.key.as_str()).collect(),
                hashes: keyed.iter().map(|(_, k)| k.hash.clone()).collect(),
                bodies: answers.iter().map(|a| a.body.clone()).collect(),
                locations: answers.iter().map(|a| a.location.as_deref()).collect(),
            };
            let mine: std::collections::HashSet<(String, String)> =
                intake::claim_keys(&mut tx, &claims)
                    .await?
                    .into_iter()
                    .collect();
            let taken: Vec<&(usize, &IdemKey)> = keyed
                .iter()
                .filter(|(_, k)| !mine.contains(&(k.principal.clone(), k.key.clone())))
                .collect();
            if !taken.is_empty() {
                let tp: Vec<&str> = taken.iter().map(|(_, k)| k.principal.as_str()).collect();
                let tk: Vec<&str> = taken.iter().map(|(_, k)| k.key.as_str()).collect();
                let rows = intake::stored_keys(&mut tx, &tp, &tk).await?;
                for (i, k) in taken {
                    let row = rows
                        .iter()
                        .find(|r| r.principal == k.principal && r.key == k.key);
                    fate[*i] = Some(match row {
                        Some(r) if r.request_hash == k.hash => Written::Replay(Stored {
                            status: r.status as u16,
                            body: r.body.clone(),
                            location: r.location.clone(),
                        }),
                        Some(_) => Written::Mismatch,
                        // Claimed, then withdrawn (its job was refused)
                        // between our insert and this read: rare; the
                        // client tries again.
                        None => Written::Replay(Stored {
                            status: 503,
                            body: json!({"error": {"code": "service_unavailable",
                                "message": "a request with this Idempotency-Key was just withdrawn; try again"}}),
                            location: None,
                        }),
                    });
                }
            }
        }

        let fresh: Vec<&Request> = leaders
            .iter()
            .zip(&fate)
            .filter(|(_, f)| f.is_none())
            .map(|(l, _)| &l.pending.req)
            .collect();
        if !fresh.is_empty() {
            let queued: Vec<intake::Queued> = fresh
                .iter()
                .map(|r| intake::Queued {
                    row: &r.cmd,
                    actor: &r.actor,
                    request_id: &r.request_id,
                })
                .collect();
            intake::insert_queued(&mut tx, &queued, self.grace).await?;
            for f in fate.iter_mut().filter(|f| f.is_none()) {
                *f = Some(Written::New);
            }
        }
        tx.commit().await?;
        Ok(fate
            .into_iter()
            .map(|f| f.unwrap_or(Written::Mismatch))
            .collect())
    }

    async fn publish_and_answer(&self, leaders: Vec<Leader>, written: Vec<Written>) {
        let broker = self.publisher.broker();
        let mut outgoing = Vec::new();
        let mut slots = Vec::new();
        for (i, (l, w)) in leaders.iter().zip(&written).enumerate() {
            if let Written::New = w {
                outgoing.push(Outgoing::command(broker, &job(&l.pending.req)));
                slots.push(i);
            }
        }
        let fates = self.publisher.publish_all(&outgoing).await;
        let mut fate_of: Vec<Option<Fate>> = (0..leaders.len()).map(|_| None).collect();
        for (slot, f) in slots.into_iter().zip(fates) {
            fate_of[slot] = Some(f);
        }
        // All confirmed (the common case): nothing more to write. Otherwise
        // settle before answering.
        let withdrawn = if fate_of.iter().flatten().all(Fate::is_confirmed) {
            vec![false; leaders.len()]
        } else {
            self.cleanup(&leaders, &fate_of).await
        };
        for ((l, w), (f, out)) in leaders
            .into_iter()
            .zip(written)
            .zip(fate_of.into_iter().zip(withdrawn))
        {
            let answer = || match (&w, &f) {
                (Written::Replay(s), _) => Answer::Respond(s.clone()),
                (Written::Mismatch, _) => Answer::KeyMismatch,
                (Written::New, Some(Fate::NotTaken(why))) if out => {
                    Answer::Unavailable(why.clone())
                }
                (Written::New, _) => Answer::Respond(accepted(l.pending.req.cmd.id)),
            };
            if let Some(why) = match &f {
                Some(Fate::NotTaken(why) | Fate::Unknown(why)) => Some(why),
                _ => None,
            } {
                tracing::warn!(preregistration_id = %l.pending.req.cmd.id, withdrawn = out, reason = %why, "job not confirmed by the broker");
            }
            for follower in l.followers {
                let same = follower.req.idem.as_ref().map(|k| &k.hash)
                    == l.pending.req.idem.as_ref().map(|k| &k.hash);
                let _ = follower
                    .reply
                    .send(if same { answer() } else { Answer::KeyMismatch });
            }
            let _ = l.pending.reply.send(answer());
        }
    }

    /// Withdraws what the broker certainly did not take and makes the rows
    /// whose fate is unknown durable, in one transaction that commits
    /// synchronously (which also makes the batch's own asynchronous commit
    /// durable before anyone is told 202). Returns, per leader, whether it
    /// was withdrawn.
    async fn cleanup(&self, leaders: &[Leader], fates: &[Option<Fate>]) -> Vec<bool> {
        let mut refused: Vec<Uuid> = Vec::new();
        let mut unknown: Vec<Uuid> = Vec::new();
        for (l, f) in leaders.iter().zip(fates) {
            match f {
                Some(Fate::NotTaken(_)) => refused.push(l.pending.req.cmd.id),
                Some(Fate::Unknown(_)) => unknown.push(l.pending.req.cmd.id),
                _ => {}
            }
        }
        let result: Result<Vec<Uuid>, sqlx::Error> = async {
            let mut tx = self.db.begin().await?;
            if !unknown.is_empty() {
                intake::keep_queued(&mut tx, &unknown, self.grace).await?;
            }
            let mut gone = Vec::new();
            if !refused.is_empty() {
                // Only rows nobody has touched meanwhile (the relay never
                // republishes within the grace period, but if it did, the
                // work happens).
                gone = intake::withdraw_queued(&mut tx, &refused).await?;
                let keyed: Vec<&IdemKey> = leaders
                    .iter()
                    .filter(|l| gone.contains(&l.pending.req.cmd.id))
                    .filter_map(|l| l.pending.req.idem.as_ref())
                    .collect();
                if !keyed.is_empty() {
                    let p: Vec<&str> = keyed.iter().map(|k| k.principal.as_str()).collect();
                    let k: Vec<&str> = keyed.iter().map(|k| k.key.as_str()).collect();
                    intake::forget_keys(&mut tx, &p, &k).await?;
                }
            }
            tx.commit().await?;
            Ok(gone)
        }
        .await;
        match result {
            Ok(gone) => leaders
                .iter()
                .map(|l| gone.contains(&l.pending.req.cmd.id))
                .collect(),
            // Nothing withdrawn: every written row stays `queued` and the
            // relay republishes it after the grace period, so all are
            // accepted.
            Err(e) => {
                tracing::warn!(error = %e, "intake cleanup failed; the relay will republish the batch's jobs");
                vec![false; leaders.len()]
            }
        }
    }
}

/// Every request of `leaders` failed with `e` (nothing was written).
fn fail(leaders: Vec<Leader>, e: sqlx::Error) {
    let mut original = Some(e);
    let copy = original.as_ref().map(clone_err);
    for l in leaders {
        for follower in l.followers {
            let _ = follower.reply.send(Answer::Database(
                copy.as_ref().map_or(sqlx::Error::PoolClosed, clone_err),
            ));
        }
        let e = original
            .take()
            .unwrap_or_else(|| copy.as_ref().map_or(sqlx::Error::PoolClosed, clone_err));
        let _ = l.pending.reply.send(Answer::Database(e));
    }
}

/// `sqlx::Error` is not `Clone`: keep what the API maps on (SQLSTATE and
/// whether the pool was out of reach).
fn clone_err(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        other => sqlx::Error::Protocol(format!(
            "{other}{}",
            crate::store::sqlstate(other)
                .map(|s| format!(" (SQLSTATE {s})"))
                .unwrap_or_default()
        )),
    }
}
