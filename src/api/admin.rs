//! Operator endpoints: partners and keys, reviews, queues and dead letters.

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    auth::OperatorAuth,
    error::{ApiError, ApiResult},
    json_body, views, AppState, PathId,
};
use crate::{
    domain::validate::{self, FieldError, Fields},
    mq::{dead_letters, Queue},
    store::{self, keys::Role, partners::PartnerFields, reviews},
};

/// Reads partner fields; `creating` makes name and country required.
pub fn partner_fields(v: &Value, creating: bool) -> Result<PartnerFields, Vec<FieldError>> {
    let mut f = Fields::new(v);
    let name = if creating {
        f.required_str("name", 200)
    } else {
        f.optional_str("name", 200)
    };
    let country = if creating {
        f.required_str("country", 2)
    } else {
        f.optional_str("country", 2)
    };
    let country = country.map(|c| c.to_ascii_uppercase());
    if country.as_deref().is_some_and(|c| !validate::is_country(c)) {
        f.error(
            "country",
            "invalid",
            "country must be an ISO 3166-1 alpha-2 code",
        );
    }
    let present = |k: &str| v.get(k).is_some();
    // (field, longest, rule, what the rule says)
    let [contact_email, contact_mobile] = [
        (
            "contact_email",
            254,
            validate::is_email as fn(&str) -> bool,
            "be a valid email address",
        ),
        (
            "contact_mobile",
            32,
            validate::is_e164,
            "be in E.164 format",
        ),
    ]
    .map(|(field, max, valid, rule)| {
        let value = f.optional_str(field, max);
        if value.as_deref().is_some_and(|x| !valid(x)) {
            f.error(field, "invalid", format!("{field} must {rule}"));
        }
        value
    });
    let billing_mode = f
        .optional_enum("billing_mode", &["postpaid", "prepaid"])
        .map(str::to_string);
    let customer_development = f.optional_bool("customer_development");
    let referral = f.optional_bool("referral");
    let locale = f
        .optional_enum("locale", validate::LOCALES)
        .map(str::to_string);
    let mut managers = None;
    f.known(&["account_managers"]);
    if let Some(list) = v.get("account_managers").filter(|x| !x.is_null()) {
        match list.as_array() {
            Some(items) if items.len() <= 100 => {
                let mut out = Vec::new();
                for (i, m) in items.iter().enumerate() {
                    let mut mf = Fields::new(m);
                    let n = mf.required_str("name", 200);
                    let e = mf.required_str("email", 254);
                    if e.as_deref().is_some_and(|e| !validate::is_email(e)) {
                        mf.error("email", "invalid", "email must be a valid email address");
                    }
                    mf.check_unknown();
                    for err in mf.errors {
                        f.error(
                            &format!("account_managers[{i}].{}", err.field),
                            err.code,
                            err.message,
                        );
                    }
                    if let (Some(n), Some(e)) = (n, e) {
                        out.push((n, e));
                    }
                }
                managers = Some(out);
            }
            _ => f.error(
                "account_managers",
                "invalid",
                "account_managers must be an array of at most 100 {name, email}",
            ),
        }
    }
    f.finish()?;
    Ok(PartnerFields {
        name,
        country,
        contact_email: present("contact_email").then_some(contact_email),
        contact_mobile: present("contact_mobile").then_some(contact_mobile),
        billing_mode,
        customer_development,
        referral,
        locale,
        account_managers: managers,
    })
}

pub async fn create_partner(
    State(st): State<AppState>,
    OperatorAuth(op): OperatorAuth,
    body: Bytes,
) -> ApiResult<Response> {
    let v = json_body(&body)?;
    let fields = partner_fields(&v, true).map_err(ApiError::validation)?;
    let mut tx = st.ctx.db.begin().await?;
    let p = store::partners::create(&mut tx, &fields).await?;
    let (key_id, api_key) =
        store::keys::issue(&mut tx, Role::Partner, Some(p.id), Some("initial")).await?;
    store::audit(
        &mut tx,
        &op.label(),
        "partner.created",
        Some(&p.id.to_string()),
        Some(json!({"key_id": key_id})),
    )
    .await?;
    tx.commit().await?;
    let partner = views::partner_with_managers(&st.ctx.db, &p).await?;
    let body = json!({"partner": partner, "api_key": api_key, "key_id": key_id});
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(loc) = format!("/v1/admin/partners/{}", p.id).parse() {
        resp.headers_mut().insert(axum::http::header::LOCATION, loc);
    }
    Ok(resp)
}

pub async fn get_partner(
    State(st): State<AppState>,
    _op: OperatorAuth,
    PathId(id): PathId,
) -> ApiResult<Json<Value>> {
    let p = store::partners::get(&st.ctx.db, id)
        .await?
        .ok_or_else(|| ApiError::not_found("partner"))?;
    Ok(Json(views::partner_with_managers(&st.ctx.db, &p).await?))
}

pub async fn patch_partner(
    State(st): State<AppState>,
    OperatorAuth(op): OperatorAuth,
    PathId(id): PathId,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let v = json_body(&body)?;
    let fields = partner_fields(&v, false).map_err(ApiError::validation)?;
    let mut tx = st.ctx.db.begin().await?;
    let p = store::partners::update(&mut tx, id, &fields)
        .await?
        .ok_or_else(|| ApiError::not_found("partner"))?;
    store::audit(
        &mut tx,
        &op.label(),
        "partner.updated",
        Some(&id.to_string()),
        Some(v),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(views::partner_with_managers(&st.ctx.db, &p).await?))
}

/// Issues a new key for the partner and (unless `keep_existing`) revokes the others.
pub async fn rotate_key(
    State(st): State<AppState>,
    OperatorAuth(op): OperatorAuth,
    PathId(id): PathId,
    body: Bytes,
) -> ApiResult<Response> {
    let keep = if body.is_empty() {
        false
    } else {
        let v = json_body(&body)?;
        let mut f = Fields::new(&v);
        let keep = f.optional_bool("keep_existing").unwrap_or(false);
        f.finish().map_err(ApiError::validation)?;
        keep
    };
    let mut tx = st.ctx.db.begin().await?;
    store::partners::get(&mut *tx, id)
        .await?
        .ok_or_else(|| ApiError::not_found("partner"))?;
    let (key_id, api_key) =
        store::keys::issue(&mut tx, Role::Partner, Some(id), Some("rotated")).await?;
    let revoked = if keep {
        0
    } else {
        store::keys::revoke_partner_keys(&mut tx, id, key_id).await?
    };
    store::audit(
        &mut tx,
        &op.label(),
        "partner.key_issued",
        Some(&id.to_string()),
        Some(json!({"key_id": key_id, "revoked": revoked})),
    )
    .await?;
    tx.commit().await?;
    st.keys.clear();
    Ok((
        StatusCode::CREATED,
        Json(json!({"api_key": api_key, "key_id": key_id, "revoked": revoked})),
    )
        .into_response())
}

pub async fn upstream_key(
    State(st): State<AppState>,
    OperatorAuth(op): OperatorAuth,
    body: Bytes,
) -> ApiResult<Response> {
    let label = if body.is_empty() {
        None
    } else {
        let v = json_body(&body)?;
        let mut f = Fields::new(&v);
        let label = f.optional_str("label", 200);
        f.finish().map_err(ApiError::validation)?;
        label
    };
    let mut tx = st.ctx.db.begin().await?;
    let (key_id, api_key) =
        store::keys::issue(&mut tx, Role::Upstream, None, label.as_deref()).await?;
    store::audit(
        &mut tx,
        &op.label(),
        "upstream_key.issued",
        Some(&key_id.to_string()),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"api_key": api_key, "key_id": key_id})),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct ReviewQuery {
    state: Option<String>,
    limit: Option<i64>,
}

pub async fn list_reviews(
    State(st): State<AppState>,
    _op: OperatorAuth,
    Query(q): Query<ReviewQuery>,
) -> ApiResult<Json<Value>> {
    let state = q.state.as_deref().unwrap_or("open");
    if !["open", "overdue", "decided"].contains(&state) {
        return Err(ApiError::validation(vec![FieldError {
            field: "state".into(),
            code: "invalid",
            message: "state must be open, overdue or decided".into(),
        }]));
    }
    let rows = reviews::list(&st.ctx.db, state, q.limit.unwrap_or(100).clamp(1, 500)).await?;
    Ok(Json(
        json!({"items": rows.iter().map(views::admin_review).collect::<Vec<_>>(), "next_cursor": null}),
    ))
}

pub async fn decide_review(
    State(st): State<AppState>,
    OperatorAuth(op): OperatorAuth,
    PathId(id): PathId,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let v = json_body(&body)?;
    let mut f = Fields::new(&v);
    let decision = f.optional_enum("decision", &["approve", "reject"]);
    if decision.is_none() && f.errors.is_empty() {
        f.error(
            "decision",
            "required",
            "decision is required: approve or reject",
        );
    }
    let note = f.optional_multiline("note", 4000);
    if decision == Some("reject") && note.is_none() {
        f.error(
            "note",
            "required",
            "a rejection needs a note for the partner",
        );
    }
    f.finish().map_err(ApiError::validation)?;
    let approve = decision == Some("approve");
    let review = apply_decision(&st, &op.label(), id, approve, note.as_deref()).await?;
    Ok(Json(views::admin_review(&review)))
}

/// Decides an open or overdue review (the API and the dashboard's buttons).
pub async fn apply_decision(
    st: &AppState,
    actor: &str,
    id: uuid::Uuid,
    approve: bool,
    note: Option<&str>,
) -> ApiResult<reviews::Review> {
    Ok(crate::flows::reviews::decide(&st.ctx, actor, id, approve, note).await?)
}

fn queue_param(name: &str) -> ApiResult<Queue> {
    Queue::parse(name).ok_or_else(|| ApiError::not_found("queue"))
}

pub async fn queues(State(st): State<AppState>, _op: OperatorAuth) -> ApiResult<Json<Value>> {
    let stats = dead_letters::queue_stats(&st.ctx.broker)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(json!({"items": stats})))
}

#[derive(Deserialize)]
pub struct LimitQuery {
    limit: Option<usize>,
}

pub async fn dead_letters(
    State(st): State<AppState>,
    _op: OperatorAuth,
    Path(queue): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Json<Value>> {
    let queue = queue_param(&queue)?;
    let items = dead_letters::list(&st.ctx.broker, queue, q.limit.unwrap_or(50).clamp(1, 500))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(json!({"queue": queue.short(), "items": items})))
}

pub async fn replay(
    State(st): State<AppState>,
    OperatorAuth(op): OperatorAuth,
    Path(queue): Path<String>,
    Query(q): Query<LimitQuery>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let queue = queue_param(&queue)?;
    // An optional body `{"message_id": "…"}` replays that one dead letter.
    let one = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v = json_body(&body)?;
        let mut f = Fields::new(&v);
        let id = f.optional_str("message_id", 200);
        f.finish().map_err(ApiError::validation)?;
        id
    };
    let n = match &one {
        Some(id) => {
            let found = dead_letters::replay_one(&st.ctx.broker, queue, id)
                .await
                .map_err(|e| ApiError::unavailable(e.to_string()))?;
            if !found {
                return Err(ApiError::not_found("dead letter"));
            }
            1
        }
        None => dead_letters::replay(
            &st.ctx.broker,
            queue,
            q.limit.unwrap_or(1000).clamp(1, 100_000),
        )
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?,
    };
    let mut conn = st.ctx.db.acquire().await?;
    store::audit(
        &mut conn,
        &op.label(),
        "dead_letters.replayed",
        Some(queue.short()),
        Some(json!({"count": n, "message_id": one})),
    )
    .await?;
    Ok(Json(json!({"queue": queue.short(), "replayed": n})))
}
