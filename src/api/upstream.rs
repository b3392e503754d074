//! Upstream endpoints: account facts (association attempts come with invitations).

use axum::{
    extract::{Path, State},
    response::Response,
    Json,
};
use chrono::Utc;
use serde_json::{json, Value};

use super::{
    auth::UpstreamAuth,
    command::{self, Command, Idem},
    error::{ApiError, ApiResult},
    json_body, AppState,
};
use crate::{
    domain::{validate, AccountFacts},
    store,
};

/// What a path segment keeps unencoded: RFC 3986 unreserved characters.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// An account id from the path: at most 128 characters, no control characters.
fn account_param(account_id: &str) -> ApiResult<()> {
    if account_id.chars().count() > 128 {
        return Err(ApiError::validation(vec![validate::FieldError {
            field: "account_id".into(),
            code: "too_long",
            message: "account_id must be at most 128 characters".into(),
        }]));
    }
    match validate::text_error("account_id", account_id, false) {
        Some(e) => Err(ApiError::validation(vec![e])),
        None => Ok(()),
    }
}

pub async fn put_account(
    Path(account_id): Path<String>,
    cmd: Command<UpstreamAuth>,
) -> ApiResult<Response> {
    let (st, auth, rid, headers, body) = cmd.into_parts();
    account_param(&account_id)?;
    let mut v = json_body(&body)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    };
    // Unknown fields and characters no text field may hold are named.
    let known = serde_json::to_value(AccountFacts::default()).unwrap_or_default();
    let mut errors = Vec::new();
    for (k, val) in obj.iter() {
        if known.get(k).is_none() {
            let shown: String = k.chars().filter(|c| !c.is_control()).take(64).collect();
            errors.push(validate::FieldError {
                field: shown.clone(),
                code: "unknown_field",
                message: format!("unknown field `{shown}`"),
            });
        } else if let Some(e) = val.as_str().and_then(|s| validate::text_error(k, s, false)) {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    obj.insert("account_id".into(), json!(account_id));
    let mut facts: AccountFacts = serde_json::from_value(v).map_err(|e| {
        ApiError::validation(vec![validate::FieldError {
            field: "body".into(),
            code: "invalid",
            message: crate::domain::mask::text(&e.to_string()),
        }])
    })?;
    // Facts sent without a time are as of now.
    facts.updated_at.get_or_insert_with(Utc::now);
    if let Err(message) = crate::domain::facts::check(&facts) {
        return Err(ApiError::unprocessable("validation_failed", message));
    }
    let path = format!("/v1/accounts/{account_id}");
    let idem = Idem::from_headers(&headers, auth.0.label(), "PUT", &path, &body)?;
    let mut tx = st.ctx.db.begin().await?;
    if let Some(r) = command::replay(&mut tx, idem.as_ref()).await? {
        return Ok(r);
    }
    let job = command::job(
        uuid::Uuid::now_v7().to_string(),
        &crate::jobs::AccountUpserted(facts),
    )?
    .subject(&account_id)
    .correlation(Some(rid.0));
    // The Location is a URI: the account id is percent-encoded in it.
    let location = format!(
        "/v1/accounts/{}",
        percent_encoding::utf8_percent_encode(&account_id, PATH_SEGMENT)
    );
    command::accept(
        &st,
        tx,
        idem.as_ref(),
        &job,
        None,
        json!({"id": job.id, "account_id": account_id, "status": "queued"}),
        location,
    )
    .await
}

pub async fn get_account(
    State(st): State<AppState>,
    _auth: UpstreamAuth,
    Path(account_id): Path<String>,
) -> ApiResult<Json<Value>> {
    if account_param(&account_id).is_err() {
        return Err(ApiError::not_found("account"));
    }
    let facts = store::accounts::get(&st.ctx.db, &account_id)
        .await?
        .ok_or_else(|| ApiError::not_found("account"))?;
    Ok(Json(serde_json::to_value(facts).unwrap_or_default()))
}
