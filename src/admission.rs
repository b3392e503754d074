//! The checks a pre-registration request passes before anything is queued,
//! in one place for both ways it arrives: the HTTP intake
//! (`POST /v1/preregistrations`) and a `preregistration.requested` command an
//! upstream system publishes on the shared commands exchange (SPEC §8: a
//! message on it is as untrusted as an HTTP request).

use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::{
    domain::validate::{self, FieldError, PreregRequest},
    store::{self, partners::Partner},
};

/// Why a request is refused. The intake answers it as an HTTP error; the
/// registration worker dead-letters an upstream command with its code.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// No such partner (over HTTP the key belongs to no partner: 401).
    UnknownPartner,
    /// `403`.
    Forbidden {
        code: &'static str,
        message: &'static str,
    },
    /// `422` with one code.
    Unprocessable {
        code: &'static str,
        message: &'static str,
    },
    /// `422 validation_failed`, one error per field.
    Invalid(Vec<FieldError>),
}

pub const CUSTOMER_DEVELOPMENT_DISABLED: &str = "Your partner account does not have the customer-development permission. Contact your ecosystem manager.";
pub const REFERRAL_NOT_PERMITTED: &str = "Your partner account does not have the referral permission; use the reseller association type or contact your ecosystem manager.";

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::UnknownPartner => "unknown_partner",
            Refusal::Forbidden { code, .. } | Refusal::Unprocessable { code, .. } => code,
            Refusal::Invalid(_) => "validation_failed",
        }
    }

    /// A message naming the problem (field names, never field values).
    pub fn message(&self) -> String {
        match self {
            Refusal::UnknownPartner => "the partner does not exist".into(),
            Refusal::Forbidden { message, .. } | Refusal::Unprocessable { message, .. } => {
                message.to_string()
            }
            Refusal::Invalid(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

pub fn referral_not_permitted() -> Refusal {
    Refusal::Forbidden {
        code: "referral_not_permitted",
        message: REFERRAL_NOT_PERMITTED,
    }
}

/// The partner, which must exist and hold the customer-development
/// permission.
pub async fn developing_partner<'e>(
    db: impl PgExecutor<'e>,
    partner_id: Uuid,
) -> Result<Result<Partner, Refusal>, sqlx::Error> {
    let Some(p) = store::partners::get(db, partner_id).await? else {
        return Ok(Err(Refusal::UnknownPartner));
    };
    if !p.customer_development {
        return Ok(Err(Refusal::Forbidden {
            code: "customer_development_disabled",
            message: CUSTOMER_DEVELOPMENT_DISABLED,
        }));
    }
    Ok(Ok(p))
}

/// A developing partner may pre-register only once it has a contact.
pub fn contact_present(partner: &Partner) -> Result<(), Refusal> {
    if partner.contact_email.is_none() && partner.contact_mobile.is_none() {
        return Err(Refusal::Unprocessable {
            code: "partner_contact_missing",
            message: "Set a contact email or mobile for your partner account first (PUT /v1/partner/contact).",
        });
    }
    Ok(())
}

/// The request's fields (SPEC §1 field rules and §8 text rules; a field not
/// in the request's shape is refused as unknown), its account manager (one of
/// the partner's) and, with `send_invitation`, the referral permission.
pub async fn prereg_fields<'e>(
    db: impl PgExecutor<'e>,
    partner: &Partner,
    body: &Value,
) -> Result<Result<PreregRequest, Refusal>, sqlx::Error> {
    let req = match validate::prereg_http_request(body) {
        Ok(r) => r,
        Err(errors) => return Ok(Err(Refusal::Invalid(errors))),
    };
    if let Some(am) = req.account_manager_id {
        let managers = store::partners::managers(db, partner.id).await?;
        if !managers.iter().any(|m| m.id == am) {
            return Ok(Err(Refusal::Invalid(vec![FieldError {
                field: "account_manager_id".into(),
                code: "invalid",
                message: "account_manager_id is not one of your account managers".into(),
            }])));
        }
    }
    if req.send_invitation
        && req.association_type.as_deref() == Some("referral")
        && !partner.referral
    {
        return Ok(Err(referral_not_permitted()));
    }
    Ok(Ok(req))
}

/// Every check of the intake, in its order, for a request on behalf of
/// `partner_id` (an upstream command: `body` is its data without the `id` and
/// `partner_id` the command adds).
pub async fn check_prereg(
    db: &sqlx::PgPool,
    partner_id: Uuid,
    body: &Value,
) -> Result<Result<(Partner, PreregRequest), Refusal>, sqlx::Error> {
    let partner = match developing_partner(db, partner_id).await? {
        Ok(p) => p,
        Err(r) => return Ok(Err(r)),
    };
    if let Err(r) = contact_present(&partner) {
        return Ok(Err(r));
    }
    Ok(prereg_fields(db, &partner, body)
        .await?
        .map(|req| (partner, req)))
}
