//! Partner endpoints: profile, pre-registrations, reviews, deletion.

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    auth::PartnerAuth,
    command::PartnerCommand,
    command::{self, Idem},
    error::{ApiError, ApiResult},
    json_body, parse_id, views, AppState, PathId,
};
use crate::{
    admission::{self, Refusal},
    domain::{
        validate::{self, Fields},
        Status,
    },
    jobs::ReviewRequested,
    store::{self, partners::Partner, preregs, reviews},
};

async fn own_partner(st: &AppState, auth: &PartnerAuth) -> ApiResult<Partner> {
    store::partners::get(&st.ctx.db, auth.partner_id)
        .await?
        .ok_or_else(ApiError::unauthorized)
}

/// The caller's partner, which must have the customer-development permission.
pub async fn developing_partner(st: &AppState, auth: &PartnerAuth) -> ApiResult<Partner> {
    admission::developing_partner(&st.ctx.db, auth.partner_id)
        .await?
        .map_err(refused)
}

/// A refusal of [`admission`], as the intake answers it.
pub fn refused(r: Refusal) -> ApiError {
    match r {
        Refusal::UnknownPartner => ApiError::unauthorized(),
        Refusal::Forbidden { code, message } => ApiError::forbidden(code, message),
        Refusal::Unprocessable { code, message } => ApiError::unprocessable(code, message),
        Refusal::Invalid(errors) => ApiError::validation(errors),
    }
}

pub async fn profile(State(st): State<AppState>, auth: PartnerAuth) -> ApiResult<Json<Value>> {
    let p = own_partner(&st, &auth).await?;
    Ok(Json(views::partner_with_managers(&st.ctx.db, &p).await?))
}

pub async fn set_contact(
    State(st): State<AppState>,
    auth: PartnerAuth,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let v = json_body(&body)?;
    let mut f = Fields::new(&v);
    let email = f.optional_str("contact_email", 254);
    let mobile = f.optional_str("contact_mobile", 32);
    if email.as_deref().is_some_and(|e| !validate::is_email(e)) {
        f.error(
            "contact_email",
            "invalid",
            "contact_email must be a valid email address",
        );
    }
    if mobile.as_deref().is_some_and(|m| !validate::is_e164(m)) {
        f.error(
            "contact_mobile",
            "invalid",
            "contact_mobile must be in E.164 format",
        );
    }
    if email.is_none() && mobile.is_none() && f.errors.is_empty() {
        f.error(
            "contact_email",
            "required",
            "give a contact_email or a contact_mobile",
        );
    }
    f.finish().map_err(ApiError::validation)?;
    let fields = store::partners::PartnerFields {
        contact_email: Some(email),
        contact_mobile: Some(mobile),
        ..Default::default()
    };
    let mut tx = st.ctx.db.begin().await?;
    let p = store::partners::update(&mut tx, auth.partner_id, &fields)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    store::audit(
        &mut tx,
        &auth.principal.label(),
        "partner.contact_updated",
        Some(&p.id.to_string()),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(views::partner_with_managers(&st.ctx.db, &p).await?))
}

pub async fn create(cmd: PartnerCommand) -> ApiResult<Response> {
    let (st, auth, rid, headers, body) = cmd.into_parts();
    // The partner row is cached for a couple of seconds by the intake (a
    // refusal is always read fresh, with its exact reason).
    let partner = match st.ctx.intake().partner(&st.ctx.db, auth.partner_id).await? {
        Some(p) if p.customer_development => p,
        _ => developing_partner(&st, &auth).await?,
    };
    // The same checks, in the same order, as an upstream command's
    // (`admission::check_prereg`), with the body parsed once the partner passed.
    admission::contact_present(&partner).map_err(refused)?;
    let validation_started = std::time::Instant::now();
    let v = json_body(&body)?;
    let req = admission::prereg_fields(&st.ctx.db, &partner, &v)
        .await?
        .map_err(refused)?;
    crate::stages::since(crate::stages::Stage::Validation, validation_started);
    let idem = Idem::post(&headers, &auth.principal, "/v1/preregistrations", &body)?;
    // Group commit: this request joins the intake's next batch (one
    // transaction and one round of confirms for many requests).
    let cmd = preregs::NewPrereg {
        id: Uuid::now_v7(),
        partner_id: partner.id,
        full_name: req.full_name,
        email: req.email.into_string(),
        mobile: req.mobile.into_string(),
        send_invitation: req.send_invitation,
        association_type: req.association_type.map(|a| a.into_string()),
        locale: req.locale.map(|l| l.into_string()),
        tags: req.tags,
        remarks: req.remarks,
        account_manager_id: req.account_manager_id,
    };
    let answer = st
        .ctx
        .intake()
        .submit(crate::intake::Request {
            cmd,
            actor: auth.principal.label(),
            request_id: rid.0,
            idem: idem.as_ref().map(Idem::to_key),
        })
        .await;
    command::intake_response(answer)
}

pub fn referral_not_permitted() -> ApiError {
    refused(admission::referral_not_permitted())
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub status: Option<String>,
    pub q: Option<String>,
    #[serde(flatten)]
    pub page: Paging,
}

/// `cursor`, `limit` and `reveal` of a list query.
#[derive(Debug, Default, Deserialize)]
pub struct Paging {
    pub cursor: Option<String>,
    pub limit: Option<String>,
    pub reveal: Option<String>,
}

impl Paging {
    /// The checked page size, reveal flag and cursor ([`paging`]).
    pub fn parse(&self, errors: &mut Vec<validate::FieldError>) -> (i64, bool, Option<Cursor>) {
        paging(
            self.limit.as_deref(),
            self.reveal.as_deref(),
            self.cursor.as_deref(),
            errors,
        )
    }
}

/// Cuts `rows` (read with one more than `limit`) to the page and returns
/// the next page's cursor (`cursor` of its last row) when there is more.
pub fn next_page<T>(
    rows: &mut Vec<T>,
    limit: i64,
    cursor: impl Fn(&T) -> Option<String>,
) -> Option<String> {
    if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().and_then(cursor)
    } else {
        None
    }
}

/// Records in the audit log that `auth` had a page shown unmasked.
pub async fn audit_page_reveal(
    st: &AppState,
    auth: &PartnerAuth,
    action: &str,
    details: Value,
) -> ApiResult<()> {
    let mut conn = st.ctx.db.acquire().await?;
    store::audit(
        &mut conn,
        &auth.principal.label(),
        action,
        None,
        Some(details),
    )
    .await?;
    Ok(())
}

pub fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}|{id}", at.timestamp_micros()))
}

pub fn decode_cursor(s: &str) -> Option<Cursor> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (micros, id) = text.split_once('|')?;
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        Uuid::parse_str(id).ok()?,
    ))
}

/// A keyset position: the last row's time and id.
pub type Cursor = (DateTime<Utc>, Uuid);

/// Reads `limit` (1..=200, default 50), `reveal` and `cursor`, adding any
/// bad value to `errors` (so a 422 names every bad field at once).
pub fn paging(
    limit: Option<&str>,
    reveal: Option<&str>,
    cursor: Option<&str>,
    errors: &mut Vec<validate::FieldError>,
) -> (i64, bool, Option<Cursor>) {
    let limit = match limit {
        None => 50,
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (1..=200).contains(&n) => n,
            _ => {
                errors.push(field_error(
                    "limit",
                    "limit must be a whole number from 1 to 200",
                ));
                50
            }
        },
    };
    let reveal = match reveal {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(_) => {
            errors.push(field_error("reveal", "reveal must be true or false"));
            false
        }
    };
    let cursor = match cursor {
        None | Some("") => None,
        Some(c) => decode_cursor(c).or_else(|| {
            errors.push(field_error("cursor", "cursor is not one this API returned"));
            None
        }),
    };
    (limit, reveal, cursor)
}

fn field_error(field: &str, message: &str) -> validate::FieldError {
    validate::FieldError {
        field: field.into(),
        code: "invalid",
        message: message.into(),
    }
}

pub async fn list(
    State(st): State<AppState>,
    auth: PartnerAuth,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let mut errors = Vec::new();
    let (limit, reveal, cursor) = q.page.parse(&mut errors);
    let status = q.status.as_deref().filter(|s| !s.is_empty()).and_then(|s| {
        let st = Status::parse(s);
        if st.is_none() {
            errors.push(field_error(
                "status",
                "status is not a pre-registration state",
            ));
        }
        st
    });
    if let Some(e) =
        q.q.as_deref()
            .and_then(|v| validate::text_error("q", v, false))
    {
        errors.push(e);
    }
    if q.q.as_deref().is_some_and(|s| s.chars().count() > 200) {
        errors.push(field_error("q", "q must be at most 200 characters"));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let filter = preregs::ListFilter {
        status,
        q: q.q
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().to_string()),
        cursor,
        limit: limit + 1,
    };
    let mut rows = preregs::list(&st.ctx.db, auth.partner_id, &filter).await?;
    let next_cursor = next_page(&mut rows, limit, |p| {
        Some(encode_cursor(p.created_at, p.id))
    });
    if reveal {
        let details = json!({"ids": rows.iter().map(|p| p.id).collect::<Vec<_>>()});
        audit_page_reveal(&st, &auth, "preregistrations.revealed", details).await?;
    }
    let items: Vec<Value> = rows
        .iter()
        .map(|p| views::prereg(p, !reveal, None, json!([])))
        .collect();
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})))
}

async fn owned(st: &AppState, auth: &PartnerAuth, id: &str) -> ApiResult<preregs::Prereg> {
    let id = parse_id(id)?;
    match preregs::get(&st.ctx.db, id).await? {
        Some(p) if p.partner_id == auth.partner_id => Ok(p),
        _ => Err(ApiError::not_found("pre-registration")),
    }
}

#[derive(Debug, Deserialize)]
pub struct RevealQuery {
    pub reveal: Option<String>,
}

/// `reveal=true|1|false|0` (absent: false); anything else is a 422.
pub fn reveal_param(reveal: Option<&str>) -> ApiResult<bool> {
    let mut errors = Vec::new();
    let (_, reveal, _) = paging(None, reveal, None, &mut errors);
    if errors.is_empty() {
        Ok(reveal)
    } else {
        Err(ApiError::validation(errors))
    }
}

/// Writes who revealed which record (SPEC §8); the audit row's time is when.
pub async fn audit_reveal(st: &AppState, actor: &str, action: &str, id: Uuid) -> ApiResult<()> {
    let mut conn = st.ctx.db.acquire().await?;
    store::audit(&mut conn, actor, action, Some(&id.to_string()), None).await?;
    Ok(())
}

pub async fn get_one(
    State(st): State<AppState>,
    auth: PartnerAuth,
    Path(id): Path<String>,
    Query(q): Query<RevealQuery>,
) -> ApiResult<Json<Value>> {
    let reveal = reveal_param(q.reveal.as_deref())?;
    let p = owned(&st, &auth, &id).await?;
    if reveal {
        audit_reveal(
            &st,
            &auth.principal.label(),
            "preregistration.revealed",
            p.id,
        )
        .await?;
    }
    let review = reviews::latest_for(&st.ctx.db, p.id).await?;
    let invitations: Vec<Value> = store::invitations::for_prereg(&st.ctx.db, p.id)
        .await?
        .iter()
        .map(super::views::invitation)
        .collect();
    Ok(Json(views::prereg(
        &p,
        !reveal,
        review.as_ref(),
        json!(invitations),
    )))
}

pub async fn timeline(
    State(st): State<AppState>,
    auth: PartnerAuth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let p = owned(&st, &auth, &id).await?;
    let items = preregs::timeline(&st.ctx.db, p.id).await?;
    Ok(Json(json!({"items": items})))
}

pub async fn request_review(Path(id): Path<String>, cmd: PartnerCommand) -> ApiResult<Response> {
    let (st, auth, rid, headers, body) = cmd.into_parts();
    let p = owned(&st, &auth, &id).await?;
    let v = json_body(&body)?;
    let mut f = Fields::new(&v);
    let justification = f.required_multiline("justification", 4000);
    let spend = f.optional_f64("expected_new_spend");
    let contact = f.optional_multiline("contact_record", 4000);
    f.finish().map_err(ApiError::validation)?;
    if p.status() != Status::Rejected || !p.manual_review_eligible {
        return Err(ApiError::conflict(
            "not_reviewable",
            "only a rejection that allows manual review can be reviewed",
        ));
    }
    let path = format!("/v1/preregistrations/{}/review", p.id);
    let idem = Idem::post(&headers, &auth.principal, &path, &body)?;
    let mut tx = st.ctx.db.begin().await?;
    if let Some(r) = command::replay(&mut tx, idem.as_ref()).await? {
        return Ok(r);
    }
    let review_id = Uuid::now_v7();
    let justification = justification.unwrap_or_default();
    let inserted = reviews::insert_queued(
        &mut tx,
        &reviews::NewReview {
            id: review_id,
            preregistration_id: p.id,
            partner_id: p.partner_id,
            justification: &justification,
            expected_new_spend: spend,
            contact_record: contact.as_deref(),
        },
    )
    .await;
    if let Err(e) = inserted {
        if store::is_unique_violation(&e) {
            return Err(ApiError::conflict(
                "review_pending",
                "a review of this pre-registration is already pending",
            ));
        }
        return Err(e.into());
    }
    let cmd = ReviewRequested {
        review_id,
        preregistration_id: p.id,
        partner_id: p.partner_id,
    };
    let job = command::job(review_id.to_string(), &cmd)?
        .subject(p.id)
        .correlation(Some(rid.0.clone()));
    command::accept(
        &st,
        tx,
        idem.as_ref(),
        &job,
        Some(crate::store::undo::Undo::Review(review_id)),
        json!({"id": review_id, "preregistration_id": p.id, "status": "queued"}),
        format!("/v1/preregistrations/{}", p.id),
    )
    .await
}

/// Deletes one pre-registration inside `conn`'s transaction.
async fn delete_in(
    conn: &mut PgConnection,
    partner_id: Uuid,
    id: Uuid,
    actor: &str,
) -> Result<Value, ApiError> {
    crate::flows::claims::delete(conn, partner_id, id, actor).await?;
    Ok(json!({"preregistration_id": id, "status": "deleted"}))
}

pub async fn delete_one(
    State(st): State<AppState>,
    auth: PartnerAuth,
    PathId(id): PathId,
) -> ApiResult<Json<Value>> {
    let mut tx = st.ctx.db.begin().await?;
    let v = delete_in(&mut tx, auth.partner_id, id, &auth.principal.label()).await?;
    tx.commit().await?;
    Ok(Json(v))
}

pub async fn batch_delete(
    State(st): State<AppState>,
    auth: PartnerAuth,
    body: Bytes,
) -> ApiResult<Response> {
    let v = json_body(&body)?;
    validate::only_fields(&v, &["preregistration_ids", "ids"]).map_err(ApiError::validation)?;
    // `preregistration_ids`, as in every batch; `ids` is the deprecated spelling.
    let field = if v.get("preregistration_ids").is_none() && v.get("ids").is_some() {
        "ids"
    } else {
        "preregistration_ids"
    };
    let ids = parse_id_list(&v, field)?;
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        // One transaction per item: one item's failure leaves the others done.
        let mut tx = st.ctx.db.begin().await?;
        match delete_in(&mut tx, auth.partner_id, id, &auth.principal.label()).await {
            Ok(r) => {
                tx.commit().await?;
                results.push(r);
            }
            Err(e) if e.status.is_client_error() => {
                tx.rollback().await?;
                results.push(json!({"preregistration_id": id, "status": "error", "error": {"code": e.code, "message": e.message}}));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((StatusCode::OK, Json(json!({"results": results}))).into_response())
}

/// `{"<field>": [uuid, ...]}` with 1 to 100 distinct ids.
pub fn parse_id_list(v: &Value, field: &str) -> ApiResult<Vec<Uuid>> {
    let err = |m: &str| ApiError::validation(vec![field_error(field, m)]);
    let arr = v
        .get(field)
        .and_then(Value::as_array)
        .ok_or_else(|| err(&format!("{field} must be an array of ids")))?;
    if arr.is_empty() || arr.len() > 100 {
        return Err(err(&format!("{field} must hold 1 to 100 ids")));
    }
    let mut out: Vec<Uuid> = Vec::with_capacity(arr.len());
    for item in arr {
        let id = item
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| err(&format!("each of {field} must be a UUID")))?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}
