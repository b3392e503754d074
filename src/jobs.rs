//! Typed job contracts: every message one of our processes hands another
//! through RabbitMQ, each a struct with its CloudEvents `type`, the queue
//! that consumes it and whether upstream systems may send it too.
//!
//! This list is the one home of those facts: the broker topology binds
//! [`CONTRACTS`] (upstream ones from the shared commands exchange, all of them
//! from the internal exchange), the worker runtime dispatches by it and
//! dead-letters a type that is not bound to the queue it arrived on, and every
//! publisher builds its message from one of these structs
//! ([`crate::mq::CloudEvent::job`]).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{
    values::{AssociationTypeName, Email, Locale, Mobile},
    AccountFacts,
};

/// The work queues, one per job kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    Registration,
    Accounts,
    Email,
    Association,
    Sweeps,
    Deadlines,
    Export,
}

impl Queue {
    pub const ALL: [Queue; 7] = [
        Queue::Registration,
        Queue::Accounts,
        Queue::Email,
        Queue::Association,
        Queue::Sweeps,
        Queue::Deadlines,
        Queue::Export,
    ];

    pub fn short(self) -> &'static str {
        match self {
            Queue::Registration => "registration",
            Queue::Accounts => "accounts",
            Queue::Email => "email",
            Queue::Association => "association",
            Queue::Sweeps => "sweeps",
            Queue::Deadlines => "deadlines",
            Queue::Export => "export",
        }
    }

    pub fn parse(s: &str) -> Option<Queue> {
        Queue::ALL.into_iter().find(|q| q.short() == s)
    }

    /// The contracts this queue consumes.
    pub fn contracts(self) -> impl Iterator<Item = &'static Contract> {
        CONTRACTS.iter().filter(move |c| c.queue == self)
    }
}

/// A message type one of our processes hands another.
pub trait Job: Serialize + DeserializeOwned {
    /// The CloudEvents `type`, also the routing key.
    const TYPE: &'static str;
    /// The one queue that consumes it.
    const QUEUE: Queue;
    /// Whether upstream systems may publish it on the shared commands
    /// exchange (the commands of SPEC §6); otherwise only our own processes
    /// send it, on the internal exchange.
    const UPSTREAM: bool;
}

/// A job type's routing facts, as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contract {
    pub ty: &'static str,
    pub queue: Queue,
    pub upstream: bool,
}

const fn contract<J: Job>() -> Contract {
    Contract {
        ty: J::TYPE,
        queue: J::QUEUE,
        upstream: J::UPSTREAM,
    }
}

/// Every job type.
pub const CONTRACTS: &[Contract] = &[
    contract::<PreregistrationRequested>(),
    contract::<ReviewRequested>(),
    contract::<AccountUpserted>(),
    contract::<InvitationRequested>(),
    contract::<EmailRequested>(),
    contract::<AssociationRequested>(),
    contract::<SweepRequested>(),
    contract::<DeadlineTick>(),
    contract::<ExportRequested>(),
];

/// The contract of a message type, if it is one of ours.
pub fn contract_of(ty: &str) -> Option<&'static Contract> {
    CONTRACTS.iter().find(|c| c.ty == ty)
}

macro_rules! job {
    ($t:ty, $ty:literal, $queue:ident, upstream: $up:literal) => {
        impl Job for $t {
            const TYPE: &'static str = $ty;
            const QUEUE: Queue = Queue::$queue;
            const UPSTREAM: bool = $up;
        }
    };
}

/// `preregistration.requested`: a partner (over HTTP) or an upstream system
/// (on the commands exchange) asks to pre-register a customer. The worker
/// checks an upstream one exactly as the intake checks an HTTP request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PreregistrationRequested {
    pub id: Uuid,
    pub partner_id: Uuid,
    pub full_name: String,
    // Strings on the wire, whatever type carries them in Rust.
    #[schemars(with = "String")]
    pub email: Email,
    #[schemars(with = "String")]
    pub mobile: Mobile,
    #[serde(default)]
    pub send_invitation: bool,
    #[serde(default)]
    pub association_type: Option<AssociationTypeName>,
    #[serde(default)]
    pub locale: Option<Locale>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub remarks: Option<String>,
    #[serde(default)]
    pub account_manager_id: Option<Uuid>,
}
job!(PreregistrationRequested, "preregistration.requested", Registration, upstream: true);

/// `review.requested`: the partner asks for a manual review of a rejection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReviewRequested {
    pub review_id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
}
job!(ReviewRequested, "review.requested", Registration, upstream: true);

/// `account.upserted`: facts about a customer account (SPEC §6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct AccountUpserted(pub AccountFacts);
job!(AccountUpserted, "account.upserted", Accounts, upstream: true);

/// `invitation.requested`: send a stored invitation; the recipient is the
/// pre-registration's stored email.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationRequested {
    pub invitation_id: Uuid,
}
job!(InvitationRequested, "invitation.requested", Email, upstream: true);

/// The notices `email.requested` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// To the partner's contact email.
    AssociationOutcome,
    /// To the reviewers (`PREREG_REVIEWER_EMAIL`).
    ReviewReminder,
    /// To escalation (`PREREG_ESCALATION_EMAIL`).
    ReviewEscalation,
    /// To the partner's contact email.
    ClaimExpiryReminder,
}

impl NoticeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::AssociationOutcome => "association_outcome",
            NoticeKind::ReviewReminder => "review_reminder",
            NoticeKind::ReviewEscalation => "review_escalation",
            NoticeKind::ClaimExpiryReminder => "claim_expiry_reminder",
        }
    }
}

/// `email.requested` (internal only): a notice about a stored record. It
/// names the record, never the recipient: the email worker decides who
/// receives it from stored data and configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EmailRequested {
    pub kind: NoticeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preregistration_id: Option<Uuid>,
}
job!(EmailRequested, "email.requested", Email, upstream: false);

/// `association.requested`: decide a stored association attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AssociationRequested {
    pub attempt_id: Uuid,
}
job!(AssociationRequested, "association.requested", Association, upstream: true);

/// A scheduler tick's fields, every one optional.
macro_rules! tick {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
        pub struct $name {
            /// The scheduler's time slot: a tick is skipped when a run that
            /// started at or after it already succeeded (several
            /// schedulers, a backlog).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub scheduled_at: Option<DateTime<Utc>>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub slot: Option<i64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub requested_by: Option<String>,
        }
    };
}

tick!(
    /// `sweep.requested`: from the scheduler (with the slot it stands for),
    /// the operator API, or any upstream publisher.
    SweepRequested
);
job!(SweepRequested, "sweep.requested", Sweeps, upstream: true);

tick!(
    /// `deadline.tick` (internal only): check review deadlines and reminders.
    DeadlineTick
);
job!(DeadlineTick, "deadline.tick", Deadlines, upstream: false);

/// `export.requested`: run a stored export. Our intake sends it on the
/// internal exchange; SPEC §6 lists it among the upstream commands, and it can
/// only run an export a partner created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExportRequested {
    pub export_id: Uuid,
}
job!(ExportRequested, "export.requested", Export, upstream: true);

/// Reads a job from a message's `data`. An absent payload (`null`) reads as
/// `{}`, so jobs whose fields are all optional need none.
pub fn decode<J: Job>(data: &serde_json::Value) -> Result<J, serde_json::Error> {
    if data.is_null() {
        return serde_json::from_value(serde_json::Value::Object(Default::default()));
    }
    J::deserialize(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_listed_once_and_every_queue_consumes_something() {
        for (i, c) in CONTRACTS.iter().enumerate() {
            assert!(
                CONTRACTS[i + 1..].iter().all(|o| o.ty != c.ty),
                "{} listed twice",
                c.ty
            );
            assert_eq!(contract_of(c.ty), Some(c));
        }
        for q in Queue::ALL {
            assert!(q.contracts().next().is_some(), "{q:?} consumes nothing");
            assert_eq!(Queue::parse(q.short()), Some(q));
        }
    }

    #[test]
    fn only_the_commands_of_spec_6_come_from_upstream() {
        let upstream: Vec<&str> = CONTRACTS
            .iter()
            .filter(|c| c.upstream)
            .map(|c| c.ty)
            .collect();
        assert_eq!(
            upstream,
            [
                "preregistration.requested",
                "review.requested",
                "account.upserted",
                "invitation.requested",
                "association.requested",
                "sweep.requested",
                "export.requested"
            ]
        );
        const { assert!(!EmailRequested::UPSTREAM && !DeadlineTick::UPSTREAM) };
    }

    #[test]
    fn a_notice_names_no_recipient_and_optional_jobs_read_from_null() {
        let job = EmailRequested {
            kind: NoticeKind::ReviewReminder,
            attempt_id: None,
            review_id: Some(Uuid::nil()),
            preregistration_id: None,
        };
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(v["kind"], "review_reminder");
        assert!(v.get("to").is_none());
        // A forged `to` is ignored, not obeyed.
        let forged = serde_json::json!({"kind": "review_reminder", "to": "x@evil.example"});
        assert!(decode::<EmailRequested>(&forged).is_ok());
        assert!(decode::<EmailRequested>(&serde_json::json!({"kind": "nope"})).is_err());
        assert_eq!(
            decode::<SweepRequested>(&serde_json::Value::Null).unwrap(),
            SweepRequested::default()
        );
        assert!(decode::<ExportRequested>(&serde_json::Value::Null).is_err());
    }
}
