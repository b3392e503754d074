//! Invitations (SPEC §3): created (email or offline), activated when the
//! email goes out (superseding the earlier links of the claim), sent,
//! failed, expired.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use uuid::Uuid;

use super::FlowError;
use crate::{
    context::Ctx,
    events::invitation_event,
    links,
    mq::CloudEvent,
    store::{self, invitations, outbox, preregs, TimelineEntry},
};

/// `invitation.expired` of a link (past its own validity, or its claim's).
pub fn expired_event(id: Uuid, prereg: Uuid, reason: &str) -> CloudEvent {
    invitation_event(
        "invitation.expired",
        id,
        prereg,
        json!({"status": "expired", "reason": reason}),
    )
}

/// A new email invitation, `queued` until the email worker sends it.
pub struct NewEmail<'a> {
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    pub association_type: &'a str,
    pub locale: &'a str,
    pub link_expires_at: DateTime<Utc>,
    pub request_id: Option<&'a str>,
}

/// Writes a queued email invitation with a fresh link. Returns its id; the
/// caller writes its `invitation.requested` job in the same transaction.
pub async fn create_email(
    conn: &mut sqlx::PgConnection,
    link_secret: &[u8],
    n: &NewEmail<'_>,
) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::now_v7();
    let nonce = links::new_nonce();
    let token = links::token(link_secret, id, &nonce);
    invitations::insert(
        conn,
        &invitations::NewInvitation {
            id,
            preregistration_id: n.preregistration_id,
            partner_id: n.partner_id,
            association_type: n.association_type,
            method: "email",
            locale: n.locale,
            status: "queued",
            nonce: &nonce,
            token_hash: &links::hash(&token),
            code_hash: None,
            link_expires_at: Some(n.link_expires_at),
            request_id: n.request_id,
        },
    )
    .await?;
    Ok(id)
}

/// An offline link handed out to the partner.
pub struct Offline {
    pub invitation_id: Uuid,
    pub token: String,
    pub code: String,
    pub claim_expires_at: Option<DateTime<Utc>>,
}

/// Creates an offline link and one-time code for the partner's claim; the
/// earlier links of the claim stop working, the claim becomes `invited`.
/// Row, timeline entry and `invitation.sent` in one transaction.
pub async fn create_offline(
    ctx: &Ctx,
    partner: &store::partners::Partner,
    prereg_id: Uuid,
    association_type: &str,
    actor: &str,
    request_id: &str,
) -> Result<Offline, FlowError> {
    let mut tx = ctx.db.begin().await?;
    let p = match preregs::get_for_update(&mut tx, prereg_id).await? {
        Some(p) if p.partner_id == partner.id => p,
        _ => return Err(FlowError::NotFound("pre-registration")),
    };
    if !p.status().invitable() {
        return Err(FlowError::Conflict(
            "not_invitable",
            format!("a pre-registration that is {} cannot be invited", p.status),
        ));
    }
    let secret = ctx.cfg.link_secret.as_bytes();
    let inv_id = Uuid::now_v7();
    let nonce = links::new_nonce();
    let token = links::token(secret, inv_id, &nonce);
    let code = links::new_code();
    invitations::insert(
        &mut tx,
        &invitations::NewInvitation {
            id: inv_id,
            preregistration_id: prereg_id,
            partner_id: partner.id,
            association_type,
            method: "offline",
            locale: &partner.locale,
            status: "sent",
            nonce: &nonce,
            token_hash: &links::hash(&token),
            code_hash: Some(&links::code_hash(secret, &code)),
            link_expires_at: None,
            request_id: Some(request_id),
        },
    )
    .await?;
    invitations::sent_now(&mut tx, inv_id).await?;
    invitations::supersede_others(&mut tx, prereg_id, inv_id).await?;
    preregs::mark_invited(&mut tx, prereg_id, "offline", None).await?;
    store::record(
        &mut tx,
        TimelineEntry {
            preregistration_id: prereg_id,
            actor,
            change: "invited",
            from_status: Some(p.status.as_str()),
            to_status: Some("invited"),
            reason: None,
            details: Some(json!({"invitation_id": inv_id, "method": "offline"})),
        },
    )
    .await?;
    let ev = invitation_event(
        "invitation.sent",
        inv_id,
        prereg_id,
        json!({"method": "offline"}),
    );
    outbox::event(&mut tx, &ev).await?;
    tx.commit().await?;
    Ok(Offline {
        invitation_id: inv_id,
        token,
        code,
        claim_expires_at: p.expires_at,
    })
}

/// What the email worker may do with a queued invitation.
pub enum Activation {
    /// Leased for sending: send to this pre-registration.
    Send(Box<invitations::Invitation>, Box<preregs::Prereg>),
    /// Nothing to send (reason for the log).
    Skip(&'static str),
    /// Another worker holds a fresh lease.
    Busy,
    /// A stale lease: a worker stopped during the SMTP exchange; the
    /// invitation is now failed with this reason.
    Unknown(&'static str),
}

const UNKNOWN: &str = "delivery outcome unknown: a worker stopped during the SMTP exchange; resend if the customer did not receive it";

const ACTOR: &str = "system:email";

// Durability of the two batch transactions. Both commit synchronously
// (`synchronous_commit` stays on); `SET LOCAL synchronous_commit = off`
// would be unsafe for either:
// - the lease: its commit returns before its WAL is flushed, the emails go
//   out, and Postgres crashes before the flush (a window of up to three
//   `wal_writer_delay`s). The lease is gone, the `sent` transaction fails
//   with the lost connection, and the redelivered job finds the invitation
//   `queued` with no lease, so it sends the email a second time. Only a
//   durable lease lets the redelivery find it (busy, then
//   `delivery_unknown`).
// - the results: the worker acknowledges the deliveries once the commit
//   returns; if that commit is then lost, the invitations stay `queued`
//   under a lease with no message left to settle them, and their
//   `invitation.sent` events are lost.
// Batching amortises the flush instead: two commits per batch of
// deliveries rather than two per email.

/// Takes the deliveries of distinct invitations `ids` in one transaction
/// and answers one [`Activation`] per id, in order: what one delivery at a
/// time would do in this order. An invitation sent for the first time
/// supersedes its claim's earlier links and makes the claim `invited` (with
/// its timeline entry); then the lease is taken. A stale lease (a worker
/// stopped mid-exchange) fails the invitation in the same transaction. No
/// transaction is held across SMTP.
///
/// Locks: the batch's invitations, then their claims, each in id order.
/// Invitations of one claim are taken in rounds (the first of each claim,
/// then the second…), each round reading what the previous one wrote.
pub async fn activate_batch(
    ctx: &Ctx,
    ids: &[Uuid],
    lease: Duration,
) -> Result<Vec<Activation>, sqlx::Error> {
    let mut out: Vec<Option<Activation>> = ids.iter().map(|_| None).collect();
    let mut tx = ctx.db.begin().await?;
    let mut rows: HashMap<Uuid, invitations::Invitation> = invitations::lock_many(&mut tx, ids)
        .await?
        .into_iter()
        .map(|i| (i.id, i))
        .collect();
    let mut claim_ids: Vec<Uuid> = rows.values().map(|i| i.preregistration_id).collect();
    claim_ids.sort();
    claim_ids.dedup();
    let mut claims: HashMap<Uuid, preregs::Prereg> = invitations::lock_claims(&mut tx, &claim_ids)
        .await?
        .into_iter()
        .map(|p| (p.id, p))
        .collect();
    // Round of each delivery: how many earlier ones share its claim.
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let Some(inv) = rows.get(id) else {
            out[i] = Some(Activation::Skip("withdrawn"));
            continue;
        };
        let n = seen.entry(inv.preregistration_id).or_insert(0);
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(i);
        *n += 1;
    }
    for (r, round) in rounds.iter().enumerate() {
        if r > 0 {
            // Read again what the earlier rounds may have changed.
            let round_ids: Vec<Uuid> = round.iter().map(|i| ids[*i]).collect();
            rows = invitations::lock_many(&mut tx, &round_ids)
                .await?
                .into_iter()
                .map(|i| (i.id, i))
                .collect();
            let round_claims: Vec<Uuid> = rows.values().map(|i| i.preregistration_id).collect();
            claims = invitations::lock_claims(&mut tx, &round_claims)
                .await?
                .into_iter()
                .map(|p| (p.id, p))
                .collect();
        }
        activate_round(&mut tx, ids, round, &rows, &claims, lease, &mut out).await?;
    }
    tx.commit().await?;
    Ok(out
        .into_iter()
        .map(|a| a.unwrap_or(Activation::Skip("withdrawn")))
        .collect())
}

/// One round of [`activate_batch`]: deliveries `round` (indexes into `ids`),
/// each of another claim.
async fn activate_round(
    tx: &mut sqlx::PgConnection,
    ids: &[Uuid],
    round: &[usize],
    rows: &HashMap<Uuid, invitations::Invitation>,
    claims: &HashMap<Uuid, preregs::Prereg>,
    lease: Duration,
    out: &mut [Option<Activation>],
) -> Result<(), sqlx::Error> {
    let now = Utc::now();
    let mut stale: Vec<(Uuid, &str)> = Vec::new();
    let mut ended: Vec<(Uuid, &str, Option<String>)> = Vec::new();
    let mut fresh: Vec<usize> = Vec::new();
    let mut again: Vec<usize> = Vec::new();
    for &i in round {
        let Some(inv) = rows.get(&ids[i]) else {
            out[i] = Some(Activation::Skip("withdrawn"));
            continue;
        };
        match inv.status.as_str() {
            "queued" => {}
            "sent" => {
                out[i] = Some(Activation::Skip("already_sent"));
                continue;
            }
            _ => {
                out[i] = Some(Activation::Skip("no_longer_live"));
                continue;
            }
        }
        if let Some(since) = inv.sending_since {
            out[i] = Some(if now - since < lease {
                Activation::Busy
            } else {
                stale.push((inv.id, UNKNOWN));
                Activation::Unknown(UNKNOWN)
            });
            continue;
        }
        let Some(p) = claims.get(&inv.preregistration_id) else {
            out[i] = Some(Activation::Skip("withdrawn"));
            continue;
        };
        if !p.status().invitable() {
            ended.push((
                inv.id,
                "expired",
                Some(format!("the pre-registration is {}", p.status)),
            ));
            out[i] = Some(Activation::Skip("not_invitable"));
        } else if inv.activated_at.is_none() {
            fresh.push(i);
        } else {
            again.push(i);
        }
    }
    // A newer invitation of the claim already went out: superseded.
    let candidates: Vec<invitations::Candidate> = fresh
        .iter()
        .map(|i| {
            let inv = &rows[&ids[*i]];
            invitations::Candidate {
                id: inv.id,
                preregistration_id: inv.preregistration_id,
                created_at: inv.created_at,
            }
        })
        .collect();
    let newer: HashSet<Uuid> = invitations::newer_activated_many(tx, &candidates)
        .await?
        .into_iter()
        .collect();
    let mut first = Vec::new();
    let mut sending = Vec::new();
    for &i in &fresh {
        let inv = &rows[&ids[i]];
        if newer.contains(&inv.id) {
            ended.push((inv.id, "superseded", None));
            out[i] = Some(Activation::Skip("superseded"));
            continue;
        }
        let p = &claims[&inv.preregistration_id];
        first.push(invitations::FirstSend {
            invitation_id: inv.id,
            preregistration_id: p.id,
            from_status: p.status.as_str(),
            link_expires_at: inv.link_expires_at,
            association_type: &inv.association_type,
        });
        sending.push(i);
    }
    sending.extend(again);
    let leased: Vec<Uuid> = sending.iter().map(|i| ids[*i]).collect();
    if !leased.is_empty() {
        for old in invitations::begin_sending_many(tx, ACTOR, &first, &leased).await? {
            tracing::debug!(invitation_id = %old, "superseded");
        }
    }
    for i in sending {
        let inv = &rows[&ids[i]];
        let p = &claims[&inv.preregistration_id];
        out[i] = Some(Activation::Send(Box::new(inv.clone()), Box::new(p.clone())));
    }
    let ended: Vec<(Uuid, &str, Option<&str>)> = ended
        .iter()
        .map(|(id, s, f)| (*id, *s, f.as_deref()))
        .collect();
    invitations::end_many(tx, &ended).await?;
    fail_in(tx, &stale).await?;
    Ok(())
}

/// Marks the live ones of `failed` failed (each with its reason) and writes
/// their `invitation.failed` events. Returns the ids that were live.
async fn fail_in(
    tx: &mut sqlx::PgConnection,
    failed: &[(Uuid, &str)],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let reasons: HashMap<Uuid, &str> = failed.iter().copied().collect();
    let live = invitations::fail_many(tx, failed).await?;
    let events: Vec<CloudEvent> = live
        .iter()
        .map(|l| {
            invitation_event(
                "invitation.failed",
                l.id,
                l.preregistration_id,
                json!({"failure": reasons.get(&l.id).copied().unwrap_or_default()}),
            )
        })
        .collect();
    outbox::events(tx, &events).await?;
    Ok(live.into_iter().map(|l| l.id).collect())
}

/// What became of one leased invitation's email.
#[derive(Debug, Clone)]
pub enum EmailResult {
    /// The mail server accepted it: `sent`, and `invitation.sent`.
    Sent,
    /// Not sent; the lease is released. `uncount`: the attempt never
    /// reached the mail server and is taken back.
    Release { uncount: bool },
    /// Failed for good with this reason (`invitation.failed`), if still live.
    Fail(String),
}

/// Records the results of a batch's emails in one transaction. Returns the
/// ids of the invitations it failed (those still live).
pub async fn record_batch(
    ctx: &Ctx,
    results: &[(&invitations::Invitation, EmailResult)],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    let mut sent = Vec::new();
    let mut events = Vec::new();
    let (mut release, mut uncount) = (Vec::new(), Vec::new());
    let mut failed: Vec<(Uuid, &str)> = Vec::new();
    for (inv, r) in results {
        match r {
            EmailResult::Sent => {
                sent.push(inv.id);
                events.push(invitation_event(
                    "invitation.sent",
                    inv.id,
                    inv.preregistration_id,
                    json!({"link_expires_at": inv.link_expires_at}),
                ));
            }
            EmailResult::Release { uncount: false } => release.push(inv.id),
            EmailResult::Release { uncount: true } => uncount.push(inv.id),
            EmailResult::Fail(reason) => failed.push((inv.id, reason)),
        }
    }
    invitations::mark_sent_many(&mut tx, &sent).await?;
    outbox::events(&mut tx, &events).await?;
    invitations::release_many(&mut tx, &release, false).await?;
    invitations::release_many(&mut tx, &uncount, true).await?;
    let live = fail_in(&mut tx, &failed).await?;
    tx.commit().await?;
    Ok(live)
}

/// Gives up on a job's invitation after its retries ran out — unless another
/// worker holds a live delivery lease (it is in the SMTP exchange right now):
/// that worker settles the invitation (sent, or `delivery_unknown` once its
/// lease runs out), so a duplicate job that only ever found it busy must not
/// mark it failed.
pub async fn give_up(
    ctx: &Ctx,
    id: Uuid,
    reason: &str,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    let Some(inv) = invitations::get_for_update(&mut tx, id).await? else {
        return Ok(false);
    };
    if inv.status != "queued" {
        return Ok(false);
    }
    if let Some(since) = inv.sending_since {
        if Utc::now() - since < lease {
            return Ok(false);
        }
    }
    let live = fail_in(&mut tx, &[(id, reason)]).await?;
    tx.commit().await?;
    Ok(!live.is_empty())
}
