//! Deciding pre-registrations (SPEC §1), a batch at a time.
//!
//! A batch of `preregistration.requested` commands is decided in one
//! Postgres transaction, in delivery order: the decisions are made in
//! memory over the claims, accounts and quota counts read for the whole
//! batch, and each decision updates that state, so the second request for a
//! customer in a batch sees the first one's claim. Every read is one
//! statement for the whole batch and the writes are one multi-row statement
//! (`store::decisions`).
//!
//! Concurrency: the Redis locks on the normalised emails and mobiles of the
//! batch are taken in one round trip, per job all or none, never waiting
//! while holding (a job whose customer another worker holds is answered
//! [`Verdict::Busy`] and tried again in a later batch); the rows and the
//! partner rows are locked in id order, so two workers' batches never
//! deadlock; the partial unique indexes on active claims stay the final
//! guarantee (a violation re-decides the batch, which then sees the other
//! claim), so a Redis outage costs speed only.
//!
//! One bad job fails alone: what can be told apart before the transaction
//! (unknown or withdrawn ids, another partner's id, an upstream command the
//! admission rules refuse) is answered per job; a transaction that fails for
//! another reason is split in halves and each half decided again, down to
//! the one job that fails.

use std::{
    collections::{HashSet, VecDeque},
    time::Instant,
};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use super::claims;
use crate::{
    admission,
    context::Ctx,
    domain::{self, mask, Decision, EligibilityInput, ExistingClaim, Status},
    jobs::{InvitationRequested, PreregistrationRequested},
    mq::CloudEvent,
    stages::{self, Stage},
    store::{
        self,
        decisions::{self, KeyedClaim, Known},
        outbox, preregs,
        preregs::NewPrereg,
    },
};

pub const ACTOR: &str = "system:registration";

/// How often a batch (or half of one) is decided again after a unique
/// violation or a transient database error before it is split.
const ATTEMPTS: u32 = 5;

/// One command of a batch.
#[derive(Debug, Clone)]
pub struct Request {
    pub cmd: PreregistrationRequested,
    /// The command's data as received (an upstream command is checked by
    /// the admission rules from it).
    pub data: Value,
    /// The request id of the HTTP call or upstream command.
    pub correlation: Option<String>,
}

impl Request {
    pub fn from_event(cmd: PreregistrationRequested, ev: &CloudEvent) -> Self {
        Request {
            cmd,
            data: ev.data.clone(),
            correlation: ev.correlationid.clone(),
        }
    }
}

/// What became of one command of a batch.
#[derive(Debug)]
pub enum Verdict {
    /// Decided and committed, with the status it got.
    Decided(Status),
    /// Nothing to do (already decided, withdrawn, a second copy).
    Skipped(&'static str),
    /// Another worker holds this customer's lock right now: not decided,
    /// try again later.
    Busy,
    Failed(Failure),
}

/// Why one command was not decided.
#[derive(Debug)]
pub enum Failure {
    /// Will never work (dead letter with this reason).
    Fatal { code: &'static str, message: String },
    /// Worth another try later.
    Retry(String),
    /// A database error, left to the caller to classify.
    Db(sqlx::Error),
}

fn fatal(code: &'static str, message: impl Into<String>) -> Verdict {
    Verdict::Failed(Failure::Fatal {
        code,
        message: message.into(),
    })
}

fn retry(message: impl Into<String>) -> Verdict {
    Verdict::Failed(Failure::Retry(message.into()))
}

/// Decides `reqs` (in their order) and answers one verdict per request, in
/// the same order.
pub async fn decide_batch(ctx: &Ctx, reqs: &[Request]) -> Vec<Verdict> {
    let mut out: Vec<Option<Verdict>> = reqs.iter().map(|_| None).collect();
    metrics::histogram!("prereg_registration_batch_size").record(reqs.len() as f64);
    let ids: Vec<Uuid> = reqs.iter().map(|r| r.cmd.id).collect();
    let looked_up = async {
        let mut tx = decisions::begin_keyed(&ctx.db).await?;
        let known = decisions::lookup(&mut *tx, &ids).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(known)
    };
    let known = match looked_up.await {
        Ok(k) => k,
        Err(e) if reqs.len() == 1 => return vec![Verdict::Failed(Failure::Db(e))],
        Err(e) => {
            return reqs
                .iter()
                .map(|_| retry(format!("database: {e}")))
                .collect()
        }
    };
    let mut seen = HashSet::new();
    let mut candidates: Vec<usize> = Vec::new();
    for (i, (r, k)) in reqs.iter().zip(known).enumerate() {
        if !seen.insert(r.cmd.id) {
            // A second copy of one job in the batch (e.g. the intake's
            // publish and the relay's): the first decides.
            out[i] = Some(Verdict::Skipped("duplicate_delivery"));
            continue;
        }
        match k {
            Known::Stored { partner_id, .. } if partner_id != r.cmd.partner_id => {
                out[i] = Some(fatal(
                    "id_conflict",
                    "the id names another partner's pre-registration",
                ));
            }
            Known::Stored { queued: false, .. } => {
                out[i] = Some(Verdict::Skipped("already_decided"))
            }
            Known::Stored { queued: true, .. } => candidates.push(i),
            // The intake answered 503 and undid this request; its job got
            // through anyway (a publish confirm that timed out).
            Known::Withdrawn => out[i] = Some(Verdict::Skipped("withdrawn")),
            // Not stored by the intake: an upstream system's command.
            Known::Missing => match record_upstream(ctx, r).await {
                Ok(()) => candidates.push(i),
                Err(v) => out[i] = Some(v),
            },
        }
    }

    let lock_started = Instant::now();
    let groups: Vec<Vec<String>> = candidates
        .iter()
        .map(|i| lock_names(&reqs[*i].cmd))
        .collect();
    let guard = if groups.is_empty() {
        None
    } else {
        match ctx.locks.try_acquire_groups(&groups).await {
            Ok((guard, taken)) => {
                let mut kept = Vec::with_capacity(candidates.len());
                for (i, ok) in candidates.iter().zip(taken) {
                    if ok {
                        kept.push(*i);
                    } else {
                        out[*i] = Some(Verdict::Busy);
                    }
                }
                candidates = kept;
                Some(guard)
            }
            Err(e) => {
                metrics::counter!("prereg_lock_unavailable_total").increment(1);
                tracing::warn!(error = %e, "deciding without Redis lock; Postgres constraints still hold");
                None
            }
        }
    };
    stages::since(Stage::LockWait, lock_started);

    let mut staged = Staged::default();
    if !candidates.is_empty() {
        for (i, v) in decide_split(ctx, reqs, candidates, &mut staged).await {
            out[i] = Some(v);
        }
    }
    if let Some(g) = guard {
        ctx.locks.release(g).await;
    }
    staged.publish(ctx);
    reqs.iter()
        .zip(out)
        .map(|(r, v)| {
            let v = v.unwrap_or_else(|| retry("not decided"));
            if let Verdict::Decided(status) = &v {
                tracing::info!(preregistration_id = %r.cmd.id, email = %mask::pii_email(&r.cmd.email),
                    status = status.as_str(), "pre-registration decided");
            }
            v
        })
        .collect()
}

/// An upstream command: checked exactly as the intake checks an HTTP
/// request, then stored `queued`.
async fn record_upstream(ctx: &Ctx, r: &Request) -> Result<(), Verdict> {
    let mut body = r.data.clone();
    if let Some(o) = body.as_object_mut() {
        o.remove("id");
        o.remove("partner_id");
    }
    let db = |e: sqlx::Error| Verdict::Failed(Failure::Db(e));
    if let Err(refusal) = admission::check_prereg(&ctx.db, r.cmd.partner_id, &body)
        .await
        .map_err(db)?
    {
        return Err(fatal(refusal.code(), refusal.message()));
    }
    let mut conn = ctx.db.acquire().await.map_err(db)?;
    preregs::insert_queued(
        &mut conn,
        &NewPrereg::from(&r.cmd),
        r.correlation.as_deref(),
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// The decision events of committed transactions, staged in the outbox a
/// grace period ahead (`store::decisions::write`): published by this process
/// right after the commits, and by the relay only if that fails.
#[derive(Default)]
struct Staged {
    ids: Vec<i64>,
    events: Vec<CloudEvent>,
}

impl Staged {
    /// Publishes the events in a task of their own: the batch's deliveries
    /// are acknowledged without waiting for the events' confirms.
    fn publish(self, ctx: &Ctx) {
        if self.ids.is_empty() {
            return;
        }
        let (db, publisher) = (ctx.db.clone(), ctx.publisher.clone());
        let committed = Instant::now();
        tokio::spawn(async move {
            match outbox::publish_staged(&db, &publisher, &self.ids, &self.events).await {
                Ok(confirmed) => {
                    // How long a confirmed event waited after its commit.
                    let lag = committed.elapsed().as_secs_f64();
                    for _ in 0..confirmed {
                        stages::observe(Stage::RelayLag, lag);
                    }
                }
                Err(e) => tracing::warn!(error = %e,
                    "could not settle the outbox rows of published decision events; the relay publishes them again after the grace period"),
            }
        });
    }
}

/// Decides `part` in one transaction; a transaction that keeps failing is
/// split in halves (in order, so the first half commits before the second
/// is decided) until the one job that fails is alone. The events of what
/// was decided are added to `staged`.
async fn decide_split(
    ctx: &Ctx,
    reqs: &[Request],
    part: Vec<usize>,
    staged: &mut Staged,
) -> Vec<(usize, Verdict)> {
    let mut done = Vec::with_capacity(part.len());
    let mut work: VecDeque<Vec<usize>> = VecDeque::from([part]);
    while let Some(part) = work.pop_front() {
        match decide_with_retries(ctx, reqs, &part, staged).await {
            Ok(verdicts) => done.extend(verdicts),
            Err(e) if part.len() == 1 => done.push((part[0], Verdict::Failed(Failure::Db(e)))),
            Err(e) if store::is_transient(&e) => {
                let message = format!("database: {e}");
                done.extend(part.iter().map(|i| (*i, retry(message.clone()))));
            }
            Err(e) => {
                metrics::counter!("prereg_registration_batch_splits_total").increment(1);
                tracing::warn!(error = %e, size = part.len(), "batch failed; deciding its halves apart");
                let (a, b) = part.split_at(part.len() / 2);
                work.push_front(b.to_vec());
                work.push_front(a.to_vec());
            }
        }
    }
    done
}

/// A unique violation means another worker's claim won a race Redis did not
/// prevent: decide again, the decision now sees that claim.
async fn decide_with_retries(
    ctx: &Ctx,
    reqs: &[Request],
    part: &[usize],
    staged: &mut Staged,
) -> Result<Vec<(usize, Verdict)>, sqlx::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match decide_tx(ctx, reqs, part, staged).await {
            Err(e)
                if attempt < ATTEMPTS
                    && (store::is_unique_violation(&e) || store::is_transient(&e)) =>
            {
                metrics::counter!("prereg_claim_conflicts_total").increment(1);
                tracing::debug!(error = %e, attempt, "decision conflicted; deciding again");
            }
            other => return other,
        }
    }
}

/// A decision waiting to be written.
struct Pending {
    index: usize,
    /// What the decision writes ([`claims::granted`] or [`claims::rejection`]).
    change: preregs::Change<'static>,
    /// `preregistration.accepted|rejected`.
    event: CloudEvent,
}

async fn decide_tx(
    ctx: &Ctx,
    reqs: &[Request],
    part: &[usize],
    staged: &mut Staged,
) -> Result<Vec<(usize, Verdict)>, sqlx::Error> {
    let started = Instant::now();
    let mut verdicts = Vec::with_capacity(part.len());
    let mut tx = decisions::begin_keyed(&ctx.db).await?;
    let ids: Vec<Uuid> = part.iter().map(|i| reqs[*i].cmd.id).collect();
    let rows = decisions::lock_rows(&mut tx, &ids).await?;
    let mut live: Vec<(usize, &preregs::Prereg)> = Vec::with_capacity(part.len());
    for &i in part {
        match rows.get(&reqs[i].cmd.id) {
            None => verdicts.push((i, retry("pre-registration row not visible yet"))),
            Some(p) if p.status() != Status::Queued => {
                verdicts.push((i, Verdict::Skipped("already_decided")))
            }
            Some(p) => live.push((i, p)),
        }
    }
    if live.is_empty() {
        tx.rollback().await?;
        return Ok(verdicts);
    }
    let partner_ids = unique(live.iter().map(|(_, p)| p.partner_id));
    let partners = decisions::lock_partners(&mut tx, &partner_ids).await?;
    let emails = unique(live.iter().map(|(_, p)| p.email_norm.clone()));
    let mobiles = unique(live.iter().map(|(_, p)| p.mobile_norm.clone()));
    let mut cx = decisions::context(&mut tx, &emails, &mobiles, &partner_ids).await?;

    let now = Utc::now();
    let mut lapsed: Vec<(Uuid, Status)> = Vec::new();
    let mut invitations: Vec<(&preregs::Prereg, DateTime<Utc>)> = Vec::new();
    let mut pending: Vec<Pending> = Vec::with_capacity(live.len());
    for (i, p) in live {
        let Some(partner) = partners.get(&p.partner_id) else {
            verdicts.push((i, fatal("unknown_partner", "partner vanished")));
            continue;
        };
        let same_customer =
            |k: &KeyedClaim| k.email_norm == p.email_norm || k.mobile_norm == p.mobile_norm;
        let mut claims: Vec<ExistingClaim> = Vec::new();
        for k in cx.claims.iter_mut().filter(|k| same_customer(k)) {
            // A claim past its validity that the sweep has not reached yet
            // frees the customer now (once, however many jobs see it).
            if k.claim.lapsed(now) && k.claim.status != Status::Expired {
                lapsed.push((k.claim.id, k.claim.status));
                if k.claim.status.counts_toward_quota() {
                    if let Some(n) = cx.quota.get_mut(&k.claim.partner_id) {
                        *n -= 1;
                    }
                }
                k.claim.status = Status::Expired;
            }
            claims.push(k.claim.clone());
        }
        let accounts: Vec<domain::AccountFacts> = cx
            .accounts
            .iter()
            .filter(|a| {
                a.email_norm.as_deref() == Some(p.email_norm.as_str())
                    || a.mobile_norm.as_deref() == Some(p.mobile_norm.as_str())
            })
            .map(|a| a.facts.clone())
            .collect();
        let decision = domain::decide(&EligibilityInput {
            partner_id: partner.id,
            partner_country: &partner.country,
            now,
            claims: &claims,
            accounts: &accounts,
            partner_active: cx.quota.get(&partner.id).copied().unwrap_or(0),
            quota: ctx.cfg.partner_quota,
        });
        let id = p.id;
        let (change, event) = match decision {
            Decision::Preregistered => {
                let change = claims::granted(id, now, ctx.claim_validity());
                let expires_at = now + ctx.claim_validity();
                // Later jobs of this batch see the new claim and quota.
                cx.claims.push(KeyedClaim {
                    email_norm: p.email_norm.clone(),
                    mobile_norm: p.mobile_norm.clone(),
                    claim: ExistingClaim {
                        id,
                        partner_id: partner.id,
                        status: Status::Preregistered,
                        expires_at: Some(expires_at),
                    },
                });
                *cx.quota.entry(partner.id).or_insert(0) += 1;
                if p.send_invitation {
                    invitations.push((p, expires_at));
                }
                let event = CloudEvent::with_id(
                    format!("preregistration.accepted:{id}"),
                    "preregistration.accepted",
                    json!({"preregistration_id": id, "partner_id": partner.id, "status": "preregistered", "expires_at": expires_at}),
                );
                (change, event)
            }
            Decision::AlreadyPreregistered { existing_id } => {
                let reason = domain::Reason::AlreadyPreregistered;
                (
                    claims::rejection(id, reason, Some(existing_id)),
                    claims::rejected_event(id, partner.id, reason, Some(existing_id)),
                )
            }
            Decision::Rejected { reason } => (
                claims::rejection(id, reason, None),
                claims::rejected_event(id, partner.id, reason, None),
            ),
        };
        // The decision event carries the request id of the HTTP call (or
        // the upstream command) that asked for it.
        let event = event.subject(id).correlation(p.request_id.clone());
        pending.push(Pending {
            index: i,
            change,
            event,
        });
    }

    // Row locks before counter locks, as a sweep takes them: the lapsed
    // claims this batch expires (a sweep may hold one; it never waits for
    // a row, so waiting for it here cannot close a circle) ...
    if !lapsed.is_empty() {
        let ids: Vec<Uuid> = lapsed.iter().map(|(id, _)| *id).collect();
        decisions::lock_rows(&mut tx, &ids).await?;
    }
    // ... then every quota counter the writes below move, in one sorted
    // statement: the batch's partners' and the lapsed claims' partners'.
    let mut counted = partner_ids.clone();
    counted.extend(lapsed.iter().filter_map(|(id, _)| {
        cx.claims
            .iter()
            .find(|k| k.claim.id == *id)
            .map(|k| k.claim.partner_id)
    }));
    decisions::lock_quota(&mut tx, &counted).await?;
    for (id, from) in lapsed {
        claims::expire(&mut tx, id, from, ACTOR).await?;
    }
    for (p, expires_at) in invitations {
        let partner = &partners[&p.partner_id];
        queue_invitation(ctx, &mut tx, p, partner, expires_at).await?;
    }
    let rows: Vec<decisions::Decided<'_>> = pending
        .iter()
        .map(|d| decisions::Decided {
            change: d.change,
            event: &d.event,
        })
        .collect();
    let event_ids = decisions::write(&mut tx, ACTOR, &rows, ctx.cfg.outbox_grace).await?;
    stages::since(Stage::Decision, started);
    let commit_started = Instant::now();
    tx.commit().await?;
    stages::since(Stage::Commit, commit_started);
    staged.ids.extend(event_ids);
    for d in pending {
        let status = d.change.status;
        metrics::counter!("prereg_decisions_total", "status" => status.as_str(), "reason" => d.change.reason.map(|r| r.0).unwrap_or("")).increment(1);
        verdicts.push((d.index, Verdict::Decided(status)));
        staged.events.push(d.event);
    }
    Ok(verdicts)
}

fn unique<T: Ord>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = it.collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// `send_invitation`: the first invitation goes out as soon as the claim is
/// granted (its job is written to the outbox with the decision).
async fn queue_invitation(
    ctx: &Ctx,
    conn: &mut PgConnection,
    p: &preregs::Prereg,
    partner: &store::partners::Partner,
    claim_expires: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let kind = p.association_type.as_deref().unwrap_or("reseller");
    if kind == "referral" && !partner.referral {
        tracing::warn!(preregistration_id = %p.id, "send_invitation with referral but no permission; not sent");
        return Ok(());
    }
    let id = super::invitations::create_email(
        conn,
        ctx.cfg.link_secret.as_bytes(),
        &super::invitations::NewEmail {
            preregistration_id: p.id,
            partner_id: partner.id,
            association_type: kind,
            locale: p.locale.as_deref().unwrap_or(&partner.locale),
            link_expires_at: domain::invitation::link_expires_at(
                Utc::now(),
                ctx.cfg.invitation_validity,
                Some(claim_expires),
            ),
            request_id: p.request_id.as_deref(),
        },
    )
    .await?;
    let job = CloudEvent::job(id.to_string(), &InvitationRequested { invitation_id: id })
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?
        .subject(p.id);
    outbox::command(conn, &job).await
}

/// The names of a request's customer locks (its normalised email and mobile).
pub fn lock_names(cmd: &PreregistrationRequested) -> Vec<String> {
    vec![
        format!("email:{}", domain::normalize_email(&cmd.email)),
        format!("mobile:{}", domain::normalize_mobile(&cmd.mobile)),
    ]
}
