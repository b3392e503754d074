//! Upstream endpoints: account facts (association attempts come with invitations).

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::HeaderMap,
    response::Response,
    Extension, Json,
};
use chrono::Utc;
use serde_json::{json, Value};

use super::{
    auth::UpstreamAuth,
    command::{self, Idem},
    error::{ApiError, ApiResult},
    json_body, AppState, RequestId,
};
use crate::{domain::AccountFacts, store};

pub async fn put_account(
    State(st): State<AppState>,
    auth: UpstreamAuth,
    Extension(rid): Extension<RequestId>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let mut v = json_body(&body)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    };
    obj.insert("account_id".into(), json!(account_id));
    let mut facts: AccountFacts = serde_json::from_value(v).map_err(|e| {
        ApiError::validation(vec![crate::domain::validate::FieldError {
            field: "body".into(),
            code: "invalid",
            message: e.to_string(),
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
    let answer = command::accepted(
        json!({"id": job.id, "account_id": account_id, "status": "queued"}),
        Some(path),
    );
    command::accept(&st, tx, idem.as_ref(), answer, &job, None).await
}

pub async fn get_account(
    State(st): State<AppState>,
    _auth: UpstreamAuth,
    Path(account_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let facts = store::accounts::get(&st.ctx.db, &account_id)
        .await?
        .ok_or_else(|| ApiError::not_found("account"))?;
    Ok(Json(serde_json::to_value(facts).unwrap_or_default()))
}
