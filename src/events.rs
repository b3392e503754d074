//! Builders of the events the system publishes (SPEC §6) that more than one
//! part of it sends.

use serde_json::json;
use uuid::Uuid;

use crate::mq::CloudEvent;

/// `invitation.sent|failed|expired`: the invitation and its
/// pre-registration, plus `extra` fields.
pub fn invitation_event(
    kind: &str,
    inv: Uuid,
    prereg: Uuid,
    extra: serde_json::Value,
) -> CloudEvent {
    let mut data = json!({"invitation_id": inv, "preregistration_id": prereg});
    if let (Some(d), Some(e)) = (data.as_object_mut(), extra.as_object()) {
        d.extend(e.clone());
    }
    CloudEvent::with_id(format!("{kind}:{inv}"), kind, data).subject(prereg)
}
