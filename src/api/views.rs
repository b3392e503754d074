//! JSON views of resources (RFC 3339 times; personal data masked on request).

use serde_json::{json, Value};

use crate::{
    domain::mask,
    store::{
        invitations::Invitation,
        partners::{AccountManager, Partner},
        preregs::Prereg,
        reviews::Review,
    },
};

pub fn review(r: &Review) -> Value {
    let state = match r.state.as_str() {
        "queued" | "open" => "open",
        other => other,
    };
    json!({
        "id": r.id,
        "state": state,
        "due_at": r.due_at,
        "decided_at": r.decided_at,
        "note": r.note,
        "justification": r.justification,
        "expected_new_spend": r.expected_new_spend,
        "contact_record": r.contact_record,
        "requested_at": r.requested_at,
        "calendar_missing": r.calendar_missing,
        "refusal_code": r.refusal_code,
    })
}

/// The admin view of a review adds the partner and pre-registration ids.
pub fn admin_review(r: &Review) -> Value {
    let mut v = review(r);
    v["preregistration_id"] = json!(r.preregistration_id);
    v["partner_id"] = json!(r.partner_id);
    v["reminder_sent_at"] = json!(r.reminder_sent_at);
    v["overdue_at"] = json!(r.overdue_at);
    v["escalated_at"] = json!(r.escalated_at);
    v["decided_by"] = json!(r.decided_by);
    v
}

pub fn prereg(p: &Prereg, masked: bool, review_row: Option<&Review>, invitations: Value) -> Value {
    let (name, email, mobile) = if masked {
        (
            mask::name(&p.full_name),
            mask::email(&p.email),
            mask::mobile(&p.mobile),
        )
    } else {
        (p.full_name.clone(), p.email.clone(), p.mobile.clone())
    };
    let reason = match (&p.reason_code, &p.reason_message) {
        (Some(code), Some(message)) => json!({"code": code, "message": message}),
        _ => Value::Null,
    };
    json!({
        "id": p.id,
        "full_name": name,
        "email": email,
        "mobile": mobile,
        "status": p.status,
        "reason": reason,
        "manual_review_eligible": p.manual_review_eligible,
        "existing_id": p.existing_id,
        "created_at": p.created_at,
        "decided_at": p.decided_at,
        "preregistered_at": p.preregistered_at,
        "expires_at": p.expires_at,
        "review": review_row.map(review),
        "invitations": invitations,
        "tags": p.tags,
        "remarks": p.remarks,
        "account_manager": p.account_manager_id,
        "send_invitation": p.send_invitation,
        "association_type": p.association_type,
        "locale": p.locale,
    })
}

/// Partner `p` as the API shows it, with its account managers read from `db`.
pub async fn partner_with_managers(db: &sqlx::PgPool, p: &Partner) -> Result<Value, sqlx::Error> {
    let managers = crate::store::partners::managers(db, p.id).await?;
    Ok(partner(p, &managers))
}

pub fn partner(p: &Partner, managers: &[AccountManager]) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "country": p.country,
        "contact_email": p.contact_email,
        "contact_mobile": p.contact_mobile,
        "billing_mode": p.billing_mode,
        "customer_development": p.customer_development,
        "referral": p.referral,
        "locale": p.locale,
        "account_managers": managers,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    })
}

pub fn invitation(i: &Invitation) -> Value {
    json!({
        "id": i.id,
        "preregistration_id": i.preregistration_id,
        "association_type": i.association_type,
        "method": i.method,
        "locale": i.locale,
        "status": i.status,
        "created_at": i.created_at,
        "sent_at": i.sent_at,
        "link_expires_at": i.link_expires_at,
        "failure": i.failure.as_deref().map(mask::text),
        "attempts": i.attempts,
        "used_at": i.used_at,
    })
}
