//! The AsyncAPI 3 document of the messages (`GET /asyncapi.json`,
//! `prereg asyncapi`): every command upstream systems may publish, every job
//! our own processes hand each other and every event the system publishes,
//! each with its exchange, routing key, CloudEvents envelope, a JSON Schema
//! of its payload and an example.
//!
//! Nothing here is written by hand as JSON: the job payload schemas are
//! derived (`schemars`) from the typed contracts of [`crate::jobs`], which
//! the publishers and workers use; the event payloads are the typed structs
//! below, whose field lists the tests compare with the events the code
//! builds. Exchange names carry the deployment's `PREREG_AMQP_PREFIX`.

use chrono::{DateTime, TimeZone, Utc};
use schemars::{gen::SchemaSettings, JsonSchema};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::{
    domain::AccountFacts,
    jobs::{self, Job, NoticeKind},
    mq::{envelope::SOURCE, CloudEvent},
};

// ------------------------------------------------------------ event payloads

/// `preregistration.accepted`: the customer is pre-registered to the partner
/// (a claim, valid until `expires_at`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PreregistrationAccepted {
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    /// Always `preregistered`.
    pub status: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// `preregistration.rejected`: the pre-registration was refused; `reason`
/// is a code of the rejection-reason table (SPEC §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PreregistrationRejected {
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    /// Always `rejected`.
    pub status: String,
    pub reason: String,
    /// Whether the partner may ask for a manual review of this rejection.
    pub manual_review_eligible: bool,
    /// The pre-registration that already holds the customer, when that is the reason.
    pub existing_id: Option<Uuid>,
}

/// `preregistration.expired`: a claim's validity ended without association.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PreregistrationExpired {
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    /// Always `expired`.
    pub status: String,
    pub previous_status: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// `preregistration.deleted`: the partner deleted the pre-registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PreregistrationDeleted {
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    /// Always `deleted`.
    pub status: String,
    pub previous_status: String,
}

/// `review.submitted`: a manual review was opened, due at `due_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReviewSubmitted {
    pub review_id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    pub due_at: DateTime<Utc>,
}

/// `review.decided`: an operator approved or rejected a review.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReviewDecided {
    pub review_id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    /// `approved` or `rejected`.
    pub decision: String,
    /// The pre-registration's status after the decision.
    pub status: String,
}

/// `review.overdue`: a review passed its due time undecided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReviewOverdue {
    pub review_id: Uuid,
    pub preregistration_id: Uuid,
    pub partner_id: Uuid,
    pub due_at: Option<DateTime<Utc>>,
    pub overdue_at: Option<DateTime<Utc>>,
}

/// `invitation.sent`: the invitation email was accepted by the mail server
/// (or the partner handed the link over offline: `method` = `offline`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationSent {
    pub invitation_id: Uuid,
    pub preregistration_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_expires_at: Option<DateTime<Utc>>,
    /// `offline` when no email was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// `invitation.failed`: the invitation email could not be sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationFailed {
    pub invitation_id: Uuid,
    pub preregistration_id: Uuid,
    /// Why (no personal data).
    pub failure: String,
}

/// `invitation.expired`: the invitation link can no longer be used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationExpired {
    pub invitation_id: Uuid,
    pub preregistration_id: Uuid,
    /// Always `expired`.
    pub status: String,
    /// `claim_expired` or `link_validity_passed`.
    pub reason: String,
}

/// `invitation.accepted`: the customer used the invitation link to associate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationAccepted {
    pub invitation_id: Uuid,
    pub preregistration_id: Uuid,
}

/// `association.succeeded` / `association.failed`: an association attempt
/// was decided; `cause` is a code of the failure-cause table (SPEC §5), and
/// the ids are absent when the link was unknown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AssociationDecided {
    pub attempt_id: Uuid,
    /// `succeeded` or `failed`.
    pub status: String,
    pub cause: Option<String>,
    pub invitation_id: Option<Uuid>,
    pub preregistration_id: Option<Uuid>,
    pub partner_id: Option<Uuid>,
}

/// `export.completed`: a partner's export is ready to download.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExportCompleted {
    pub export_id: Uuid,
    pub partner_id: Uuid,
    pub rows: i64,
}

// ------------------------------------------------------------------ catalog

/// Which exchange a message travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The shared commands exchange: upstream systems may publish it.
    Command,
    /// The internal exchange: only our own processes publish it.
    Internal,
    /// The events exchange: the system publishes it for anyone to consume.
    Event,
}

/// One message type of the document.
pub struct Entry {
    pub ty: &'static str,
    pub route: Route,
    /// The queue that consumes it (jobs only).
    pub queue: Option<jobs::Queue>,
    /// The `subject` the envelope carries, if any.
    pub subject: Option<&'static str>,
    pub schema: Value,
    /// The payload may be absent (`null`).
    pub nullable: bool,
    pub example: Value,
}

fn settings() -> SchemaSettings {
    SchemaSettings::draft07().with(|s| {
        // One self-contained schema per payload (no `definitions`).
        s.inline_subschemas = true;
        s.option_add_null_type = true;
    })
}

/// The JSON Schema of `T`, without the `$schema` keyword (the document
/// declares its schema format once).
pub fn schema_of<T: JsonSchema>() -> Value {
    let root = settings().into_generator().into_root_schema_for::<T>();
    let mut v = serde_json::to_value(root).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.remove("$schema");
        m.remove("definitions");
    }
    v
}

fn job_entry<J: Job + JsonSchema>(example: J) -> Entry {
    Entry {
        ty: J::TYPE,
        route: if J::UPSTREAM {
            Route::Command
        } else {
            Route::Internal
        },
        queue: Some(J::QUEUE),
        subject: None,
        schema: schema_of::<J>(),
        nullable: jobs::decode::<J>(&Value::Null).is_ok(),
        example: serde_json::to_value(&example).unwrap_or(Value::Null),
    }
}

fn event_entry<E: Serialize + JsonSchema>(
    ty: &'static str,
    subject: Option<&'static str>,
    example: E,
) -> Entry {
    Entry {
        ty,
        route: Route::Event,
        queue: None,
        subject,
        schema: schema_of::<E>(),
        nullable: false,
        example: serde_json::to_value(&example).unwrap_or(Value::Null),
    }
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + n)
}

fn at(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, day, hour, 0, 0)
        .single()
        .unwrap_or_default()
}

/// Every message type: the jobs of [`jobs::CONTRACTS`] and the events.
pub fn catalog() -> Vec<Entry> {
    let (prereg, partner, review, inv, attempt) = (id(1), id(2), id(3), id(4), id(5));
    let mut out = vec![
        job_entry(jobs::PreregistrationRequested {
            id: prereg,
            partner_id: partner,
            full_name: "Ada Example".into(),
            email: "ada@customer.example".into(),
            mobile: "+8613800000000".into(),
            send_invitation: true,
            association_type: None,
            locale: Some("en".into()),
            tags: vec!["spring-campaign".into()],
            remarks: None,
            account_manager_id: None,
        }),
        job_entry(jobs::ReviewRequested {
            review_id: review,
            preregistration_id: prereg,
            partner_id: partner,
        }),
        job_entry(jobs::AccountUpserted(AccountFacts {
            account_id: "acc-42".into(),
            email: Some("ada@customer.example".into()),
            mobile: Some("+8613800000000".into()),
            display_name: Some("Ada".into()),
            registered_at: Some(at(2, 8)),
            site: Some("intl".into()),
            country: Some("CN".into()),
            updated_at: Some(at(5, 8)),
            ..Default::default()
        })),
        job_entry(jobs::InvitationRequested { invitation_id: inv }),
        job_entry(jobs::EmailRequested {
            kind: NoticeKind::AssociationOutcome,
            attempt_id: Some(attempt),
            review_id: None,
            preregistration_id: None,
        }),
        job_entry(jobs::AssociationRequested {
            attempt_id: attempt,
        }),
        job_entry(jobs::SweepRequested {
            scheduled_at: Some(at(5, 9)),
            slot: Some(29_471_280),
            requested_by: Some("scheduler".into()),
        }),
        job_entry(jobs::DeadlineTick {
            scheduled_at: Some(at(5, 9)),
            slot: Some(29_471_280),
            requested_by: Some("scheduler".into()),
        }),
        job_entry(jobs::ExportRequested { export_id: id(6) }),
    ];
    out.extend([
        event_entry(
            "preregistration.accepted",
            None,
            PreregistrationAccepted {
                preregistration_id: prereg,
                partner_id: partner,
                status: "preregistered".into(),
                expires_at: Some(at(20, 9)),
            },
        ),
        event_entry(
            "preregistration.rejected",
            None,
            PreregistrationRejected {
                preregistration_id: prereg,
                partner_id: partner,
                status: "rejected".into(),
                reason: "registered_over_7_days".into(),
                manual_review_eligible: true,
                existing_id: None,
            },
        ),
        event_entry(
            "preregistration.expired",
            Some("the pre-registration's id"),
            PreregistrationExpired {
                preregistration_id: prereg,
                partner_id: partner,
                status: "expired".into(),
                previous_status: "invited".into(),
                expires_at: Some(at(20, 9)),
            },
        ),
        event_entry(
            "preregistration.deleted",
            Some("the pre-registration's id"),
            PreregistrationDeleted {
                preregistration_id: prereg,
                partner_id: partner,
                status: "deleted".into(),
                previous_status: "preregistered".into(),
            },
        ),
        event_entry(
            "review.submitted",
            Some("the pre-registration's id"),
            ReviewSubmitted {
                review_id: review,
                preregistration_id: prereg,
                partner_id: partner,
                due_at: at(7, 9),
            },
        ),
        event_entry(
            "review.decided",
            Some("the pre-registration's id"),
            ReviewDecided {
                review_id: review,
                preregistration_id: prereg,
                partner_id: partner,
                decision: "approved".into(),
                status: "preregistered".into(),
            },
        ),
        event_entry(
            "review.overdue",
            Some("the pre-registration's id"),
            ReviewOverdue {
                review_id: review,
                preregistration_id: prereg,
                partner_id: partner,
                due_at: Some(at(7, 9)),
                overdue_at: Some(at(7, 9)),
            },
        ),
        event_entry(
            "invitation.sent",
            Some("the pre-registration's id"),
            InvitationSent {
                invitation_id: inv,
                preregistration_id: prereg,
                link_expires_at: Some(at(12, 9)),
                method: None,
            },
        ),
        event_entry(
            "invitation.failed",
            Some("the pre-registration's id"),
            InvitationFailed {
                invitation_id: inv,
                preregistration_id: prereg,
                failure: "mailbox unavailable (550)".into(),
            },
        ),
        event_entry(
            "invitation.expired",
            Some("the pre-registration's id"),
            InvitationExpired {
                invitation_id: inv,
                preregistration_id: prereg,
                status: "expired".into(),
                reason: "link_validity_passed".into(),
            },
        ),
        event_entry(
            "invitation.accepted",
            Some("the pre-registration's id"),
            InvitationAccepted {
                invitation_id: inv,
                preregistration_id: prereg,
            },
        ),
        event_entry(
            "association.succeeded",
            None,
            AssociationDecided {
                attempt_id: attempt,
                status: "succeeded".into(),
                cause: None,
                invitation_id: Some(inv),
                preregistration_id: Some(prereg),
                partner_id: Some(partner),
            },
        ),
        event_entry(
            "association.failed",
            None,
            AssociationDecided {
                attempt_id: attempt,
                status: "failed".into(),
                cause: Some("link_not_found".into()),
                invitation_id: None,
                preregistration_id: None,
                partner_id: None,
            },
        ),
        event_entry(
            "export.completed",
            None,
            ExportCompleted {
                export_id: id(6),
                partner_id: partner,
                rows: 1250,
            },
        ),
    ]);
    out
}

// ----------------------------------------------------------------- document

/// A component key from a message type (`preregistration.requested` →
/// `PreregistrationRequested`).
fn camel(ty: &str) -> String {
    ty.split(['.', '_'])
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The CloudEvents 1.0 envelope (structured mode) around payload `data`.
fn envelope(e: &Entry, data: Value) -> Value {
    let mut props = json!({
        "specversion": {"type": "string", "const": "1.0", "description": "CloudEvents version."},
        "id": {"type": "string", "minLength": 1,
               "description": "Unique per message and deterministic per fact: consumers deduplicate on it, so redelivery and republishing are harmless. Also the AMQP message-id."},
        "source": {"type": "string", "format": "uri-reference",
                   "description": if e.route == Route::Command { "The publishing system (any URI reference)." } else { "`urn:prereg` for messages of this system." }},
        "type": {"type": "string", "const": e.ty, "description": "The message type; also the routing key."},
        "time": {"type": "string", "format": "date-time", "description": "When the message was created (RFC 3339)."},
        "datacontenttype": {"type": "string", "const": "application/json"},
        "correlationid": {"type": "string",
                          "description": "Extension attribute: the request or job id that caused this message, for log correlation."},
        "data": if e.nullable {
            json!({"anyOf": [data, {"type": "null"}], "description": "The payload; may be null or absent fields (all are optional)."})
        } else {
            data
        },
    });
    if let (Some(p), Some(s)) = (props.as_object_mut(), e.subject) {
        p.insert(
            "subject".into(),
            json!({"type": "string", "description": format!("The entity this event is about: {s}.")}),
        );
    } else if let Some(p) = props.as_object_mut() {
        p.insert("subject".into(), json!({"type": "string"}));
    }
    json!({
        "type": "object",
        "required": ["specversion", "id", "source", "type", "time", "data"],
        "properties": props,
    })
}

fn example_envelope(e: &Entry) -> Value {
    let source = if e.route == Route::Command {
        "urn:upstream:crm"
    } else {
        SOURCE
    };
    let mut ev = CloudEvent::with_id(format!("{}:{}", e.ty, id(9)), e.ty, e.example.clone());
    ev.source = source.into();
    ev.time = at(5, 9);
    if e.subject.is_some() {
        if let Some(p) = e.example.get("preregistration_id").and_then(Value::as_str) {
            ev.subject = Some(p.to_string());
        }
    }
    serde_json::to_value(ev).unwrap_or(Value::Null)
}

fn exchange(name: String, about: &str) -> Value {
    let _ = about;
    json!({"name": name, "type": "topic", "durable": true, "autoDelete": false, "vhost": "/"})
}

/// The AsyncAPI 3.0 document for a deployment whose broker names start with
/// `prefix` (`PREREG_AMQP_PREFIX`).
pub fn document(prefix: &str) -> Value {
    let names = crate::mq::Names::new(prefix, vec![std::time::Duration::from_secs(1)]);
    let (mut channels, mut operations, mut messages, mut schemas) =
        (Map::new(), Map::new(), Map::new(), Map::new());
    for e in catalog() {
        let key = camel(e.ty);
        let (chan_key, exch, action, who) = match e.route {
            Route::Command => (
                format!("commands.{}", e.ty),
                exchange(names.commands(), "Commands from upstream systems (SPEC §6)."),
                "receive",
                "Upstream systems may publish this command instead of calling the HTTP API.",
            ),
            Route::Internal => (
                format!("internal.{}", e.ty),
                exchange(names.internal(), "Jobs our own processes hand each other; not for upstream publishers."),
                "receive",
                "Internal only: published by this system's own processes, never by upstream systems.",
            ),
            Route::Event => (
                format!("events.{}", e.ty),
                exchange(names.events(), "Events this system publishes."),
                "send",
                "Published by this system; bind a queue of your own to the events exchange with this routing key.",
            ),
        };
        let mut description = who.to_string();
        if let Some(q) = e.queue {
            description.push_str(&format!(
                " Consumed from the quorum queue `{}` (dead letters in `{}`). Acknowledged only after its effects are committed; a message that cannot be parsed or fails validation goes to the dead-letter queue with the reason in its `x-prereg-reason` header.",
                names.queue(q),
                names.dlq(q)
            ));
        }
        let schema_ref = json!({"$ref": format!("#/components/schemas/{key}")});
        schemas.insert(key.clone(), e.schema.clone());
        let summary = e
            .schema
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or(e.ty)
            .lines()
            .next()
            .unwrap_or(e.ty)
            .to_string();
        messages.insert(
            key.clone(),
            json!({
                "name": e.ty,
                "title": e.ty,
                "summary": summary,
                "contentType": "application/cloudevents+json",
                "correlationId": {"description": "The request or job that caused this message.",
                                  "location": "$message.payload#/correlationid"},
                "payload": envelope(&e, schema_ref),
                "bindings": {"amqp": {"messageType": e.ty, "bindingVersion": "0.3.0"}},
                "examples": [{"name": "example", "summary": format!("A `{}` message", e.ty),
                              "payload": example_envelope(&e)}],
            }),
        );
        channels.insert(
            chan_key.clone(),
            json!({
                "address": e.ty,
                "title": e.ty,
                "description": description,
                "messages": {key.clone(): {"$ref": format!("#/components/messages/{key}")}},
                "bindings": {"amqp": {"is": "routingKey",
                                      "exchange": exch,
                                      "bindingVersion": "0.3.0"}},
            }),
        );
        operations.insert(
            format!("{action}.{}", e.ty),
            json!({
                "action": action,
                "channel": {"$ref": format!("#/channels/{chan_key}")},
                "summary": description,
                "messages": [{"$ref": format!("#/channels/{chan_key}/messages/{key}")}],
            }),
        );
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "prereg messages",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "The RabbitMQ messages of the partner pre-registration back end. Every message is a CloudEvents 1.0 JSON document (structured mode) whose `type` is also its routing key. Upstream systems publish commands to the durable topic exchange `{}`; the system publishes events to `{}`. Exchange names start with this deployment's `PREREG_AMQP_PREFIX` (`{prefix}`). Generated from the typed job contracts; the HTTP API is described in /openapi.json.",
                names.commands(),
                names.events()
            ),
        },
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "rabbitmq": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The deployment's RabbitMQ (PREREG_AMQP_URL); quorum queues, a delivery limit and a dead-letter queue per work queue."
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn doc() -> Value {
        document("prereg")
    }

    /// Every message type the document describes.
    fn described(doc: &Value) -> BTreeSet<String> {
        doc["components"]["messages"]
            .as_object()
            .unwrap()
            .values()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn every_job_type_is_described_on_its_exchange() {
        let doc = doc();
        let types = described(&doc);
        for c in jobs::CONTRACTS {
            assert!(
                types.contains(c.ty),
                "job {} missing from the document",
                c.ty
            );
            let (chan, exch) = if c.upstream {
                (format!("commands.{}", c.ty), "prereg.commands")
            } else {
                (format!("internal.{}", c.ty), "prereg.internal")
            };
            let ch = &doc["channels"][&chan];
            assert_eq!(ch["address"], c.ty, "{chan}");
            assert_eq!(ch["bindings"]["amqp"]["exchange"]["name"], exch, "{chan}");
            assert_eq!(ch["bindings"]["amqp"]["exchange"]["type"], "topic");
        }
    }

    /// Event types published anywhere in the code: string literals in the
    /// event namespaces that are neither job types nor audit actions.
    fn event_types_in_code() -> BTreeSet<String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        let mut dirs = vec![root.join("src"), root.join("workers")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("asyncapi.rs") {
                    files.push(p);
                }
            }
        }
        const NS: [&str; 5] = [
            "preregistration.",
            "review.",
            "invitation.",
            "association.",
            "export.",
        ];
        let mut out = BTreeSet::new();
        for f in files {
            let src = std::fs::read_to_string(&f).unwrap();
            let mut from = 0;
            while let Some(i) = src[from..].find('"') {
                let start = from + i + 1;
                let Some(len) = src[start..].find('"') else {
                    break;
                };
                let lit = &src[start..start + len];
                from = start + len + 1;
                // `"review.decided:{id}"` (an id) counts as `review.decided`.
                let ty = lit.split(':').next().unwrap_or("");
                let well_formed = NS.iter().any(|n| ty.starts_with(n))
                    && ty
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_')
                    && ty.matches('.').count() == 1;
                let mut before = start.saturating_sub(200);
                while !src.is_char_boundary(before) {
                    before += 1;
                }
                let audit = src[before..start].contains("audit");
                if well_formed && !audit && jobs::contract_of(ty).is_none() {
                    out.insert(ty.to_string());
                }
            }
        }
        out
    }

    #[test]
    fn every_event_the_code_publishes_is_described_and_no_other() {
        let in_code = event_types_in_code();
        assert!(
            in_code.contains("preregistration.accepted") && in_code.contains("export.completed"),
            "the scan found too little: {in_code:?}"
        );
        let doc = doc();
        let types = described(&doc);
        for ty in &in_code {
            assert!(
                types.contains(ty),
                "event {ty} is published but not in the document"
            );
            assert_eq!(
                doc["channels"][format!("events.{ty}")]["bindings"]["amqp"]["exchange"]["name"],
                "prereg.events"
            );
        }
        let documented_events: BTreeSet<String> = catalog()
            .iter()
            .filter(|e| e.route == Route::Event)
            .map(|e| e.ty.to_string())
            .collect();
        assert_eq!(
            documented_events, in_code,
            "documented events vs the code's"
        );
    }

    /// Checks a real payload against its generated schema: every field is
    /// described and every required one present.
    fn fits(ty: &str, data: &Value) {
        let e = catalog().into_iter().find(|e| e.ty == ty).unwrap();
        let props = e.schema["properties"].as_object().unwrap();
        let obj = data.as_object().unwrap();
        for k in obj.keys() {
            assert!(props.contains_key(k), "{ty}: field `{k}` not in the schema");
        }
        for r in e.schema["required"].as_array().into_iter().flatten() {
            assert!(obj.contains_key(r.as_str().unwrap()), "{ty}: `{r}` missing");
        }
    }

    #[test]
    fn events_built_by_the_code_fit_their_schemas() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        for (kind, extra) in [
            ("invitation.sent", json!({"link_expires_at": Utc::now()})),
            ("invitation.sent", json!({"method": "offline"})),
            ("invitation.failed", json!({"failure": "550"})),
            ("invitation.accepted", json!({})),
        ] {
            let ev = crate::events::invitation_event(kind, a, b, extra);
            fits(kind, &ev.data);
        }
        let ev = crate::workers::sweeps::expired_event(a, b, "invited", Some(Utc::now()));
        fits(&ev.ty, &ev.data);
        let back: PreregistrationExpired = serde_json::from_value(ev.data).unwrap();
        assert_eq!(back.preregistration_id, a);
    }

    #[test]
    fn examples_are_cloudevents_of_their_type_and_fit_the_schema() {
        for e in catalog() {
            let env = example_envelope(&e);
            let ev = CloudEvent::parse(&serde_json::to_vec(&env).unwrap()).unwrap();
            assert_eq!(ev.ty, e.ty);
            if e.schema["properties"].is_object() {
                fits(e.ty, &ev.data);
            }
        }
    }

    #[test]
    fn schemas_describe_strings_ids_and_optional_fields() {
        let doc = doc();
        let p = &doc["components"]["schemas"]["PreregistrationRequested"];
        assert_eq!(p["properties"]["email"]["type"], "string");
        assert_eq!(p["properties"]["mobile"]["type"], "string");
        assert_eq!(p["properties"]["id"]["format"], "uuid");
        let req: BTreeSet<&str> = p["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            req.contains("email") && req.contains("partner_id"),
            "{req:?}"
        );
        assert!(!req.contains("tags") && !req.contains("locale"), "{req:?}");
        let acc = &doc["components"]["schemas"]["AccountUpserted"];
        assert_eq!(acc["properties"]["account_id"]["type"], "string");
        assert!(acc["properties"]["has_contract"].is_object());
        let mail = &doc["components"]["schemas"]["EmailRequested"];
        let kinds: Vec<&str> = mail["properties"]["kind"]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["enum"][0].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "association_outcome",
                "review_reminder",
                "review_escalation",
                "claim_expiry_reminder"
            ]
        );
        // Every $ref resolves.
        fn walk(v: &Value, doc: &Value) {
            match v {
                Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                        let target = doc.pointer(r.trim_start_matches('#'));
                        assert!(target.is_some(), "unresolved {r}");
                    }
                    m.values().for_each(|x| walk(x, doc));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, doc)),
                _ => {}
            }
        }
        walk(&doc, &doc);
        assert!(doc.to_string().find("\"definitions\"").is_none());
    }
}
