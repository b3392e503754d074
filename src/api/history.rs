//! History records and exports.

use axum::{
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    auth::PartnerAuth,
    command::{self, Idem, PartnerCommand},
    error::{ApiError, ApiResult},
    parse_id,
    partner::{audit_page_reveal, encode_cursor, next_page, Paging},
    AppState,
};
use crate::{
    domain::{
        association::Causes,
        mask,
        validate::{self, FieldError},
    },
    flows::exports::Requested,
    jobs::ExportRequested,
    store::history,
};

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    q: Option<String>,
    status: Option<String>,
    method: Option<String>,
    tag: Option<String>,
    account_manager: Option<String>,
    #[serde(flatten)]
    page: Paging,
}

fn record_view(r: &history::Record, reveal: bool, provider: &str) -> Value {
    let (name, email, mobile) = if reveal {
        (r.full_name.clone(), r.email.clone(), r.mobile.clone())
    } else {
        (
            mask::name(&r.full_name),
            mask::email(&r.email),
            mask::mobile(&r.mobile),
        )
    };
    let cause = if r.state == "association_failed" {
        r.reason_code
            .as_deref()
            .and_then(|c| Causes::shipped().view(c, provider))
            .map(|v| json!(v))
    } else {
        None
    };
    json!({
        "preregistration_id": r.id,
        "full_name": name,
        "email": email,
        "mobile": mobile,
        "status": r.state,
        // Deprecated spelling of `status` (the name of the filter and of a
        // pre-registration's field); kept for a deprecation period.
        "state": r.state,
        "cause": cause,
        "method": r.last_method,
        "invited_at": r.invited_at,
        "link_expires_at": r.link_expires_at,
        "claim_expires_at": r.expires_at,
        "tags": r.tags,
        "remarks": r.remarks,
        "account_manager": r.manager_id.map(|id| json!({"id": id, "name": r.manager_name})),
        "account_id": r.account_id,
    })
}

pub async fn list(
    State(st): State<AppState>,
    auth: PartnerAuth,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<Json<Value>> {
    let mut errors = Vec::new();
    let (limit, reveal, cursor) = q.page.parse(&mut errors);
    let bad = |f: &str, m: &str| FieldError {
        field: f.into(),
        code: "invalid",
        message: m.into(),
    };
    let state = q.status.filter(|s| !s.is_empty());
    if state
        .as_deref()
        .is_some_and(|s| !history::STATES.contains(&s))
    {
        errors.push(bad(
            "status",
            &format!("status must be one of: {}", history::STATES.join(", ")),
        ));
    }
    let method = q.method.filter(|s| !s.is_empty());
    if method
        .as_deref()
        .is_some_and(|m| m != "email" && m != "offline")
    {
        errors.push(bad("method", "method must be email or offline"));
    }
    let account_manager = match q.account_manager.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match Uuid::parse_str(s) {
            Ok(u) => Some(u),
            Err(_) => {
                errors.push(bad(
                    "account_manager",
                    "account_manager must be an account manager id",
                ));
                None
            }
        },
    };
    let search = q.q.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    if search.as_deref().is_some_and(|s| s.chars().count() > 200) {
        errors.push(bad("q", "q must be at most 200 characters"));
    }
    for (name, value) in [("q", search.as_deref()), ("tag", q.tag.as_deref())] {
        if let Some(e) = value.and_then(|v| validate::text_error(name, v, false)) {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let filter = history::Filter {
        q: search,
        state,
        method,
        tag: q.tag.filter(|t| !t.is_empty()),
        account_manager,
        cursor,
    };
    let mut rows = history::page(&st.ctx.db, auth.partner_id, &filter, limit + 1).await?;
    let next_cursor = next_page(&mut rows, limit, |r| {
        r.invited_at.map(|t| encode_cursor(t, r.id))
    });
    if reveal {
        let details =
            json!({"ids": rows.iter().map(|r| r.id).collect::<Vec<_>>(), "filter": filter});
        audit_page_reveal(&st, &auth, "history.revealed", details).await?;
    }
    let provider = &st.ctx.cfg.provider_name;
    Ok(Json(json!({
        "items": rows.iter().map(|r| record_view(r, reveal, provider)).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })))
}

fn export_view(e: &history::Export) -> Value {
    json!({
        "id": e.id,
        "status": e.status,
        "rows": e.rows,
        "bytes": e.bytes,
        "failure": e.failure,
        "created_at": e.created_at,
        "completed_at": e.completed_at,
        "expires_at": e.expires_at,
        "download_url": (e.status == "completed").then(|| format!("/v1/exports/{}/download", e.id)),
    })
}

pub async fn create_export(cmd: PartnerCommand) -> ApiResult<Response> {
    let (st, auth, rid, headers, body) = cmd.into_parts();
    if !body.is_empty() {
        let v = super::json_body(&body)?;
        validate::only_fields(&v, &[]).map_err(ApiError::validation)?;
    }
    let idem = Idem::post(&headers, &auth.principal, "/v1/exports", &body)?;
    let mut tx = st.ctx.db.begin().await?;
    if let Some(r) = command::replay(&mut tx, idem.as_ref()).await? {
        return Ok(r);
    }
    // Exports are bounded per partner: at most `export_max_active` pending
    // or running at once.
    let max = st.ctx.cfg.export_max_active;
    let id = match crate::flows::exports::request(&mut tx, auth.partner_id, max).await? {
        Requested::Created(id) => id,
        Requested::TooMany(active) => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_exports",
                format!(
                    "{active} exports of yours are still pending or running (at most {max} at once); wait until one completes"
                ),
            ))
        }
    };
    let job =
        command::job(id.to_string(), &ExportRequested { export_id: id })?.correlation(Some(rid.0));
    command::accept(
        &st,
        tx,
        idem.as_ref(),
        &job,
        Some(crate::store::undo::Undo::Export(id)),
        json!({"id": id, "status": "pending"}),
        format!("/v1/exports/{id}"),
    )
    .await
}

async fn own_export(st: &AppState, auth: &PartnerAuth, id: &str) -> ApiResult<history::Export> {
    let id = parse_id(id)?;
    match history::get_export(&st.ctx.db, id).await? {
        Some(e) if e.partner_id == auth.partner_id => Ok(e),
        _ => Err(ApiError::not_found("export")),
    }
}

pub async fn get_export(
    State(st): State<AppState>,
    auth: PartnerAuth,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(export_view(&own_export(&st, &auth, &id).await?)))
}

/// Streams the CSV chunk by chunk.
pub async fn download(
    State(st): State<AppState>,
    auth: PartnerAuth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let e = own_export(&st, &auth, &id).await?;
    match e.status.as_str() {
        "completed" if e.expires_at.is_none_or(|t| t > chrono::Utc::now()) => {}
        "completed" | "expired" => {
            return Err(ApiError::new(
                StatusCode::GONE,
                "export_expired",
                "this export is no longer kept; request a new one",
            ))
        }
        "failed" => {
            return Err(ApiError::conflict(
                "export_failed",
                "this export failed; request a new one",
            ))
        }
        _ => {
            return Err(ApiError::conflict(
                "export_not_ready",
                "this export is not completed yet",
            ))
        }
    }
    let db = st.ctx.db.clone();
    let export_id = e.id;
    let stream = futures::stream::unfold(0i32, move |seq| {
        let db = db.clone();
        async move {
            let chunk = history::chunk(&db, export_id, seq).await;
            match chunk {
                Ok(Some(data)) => Some((Ok::<_, std::io::Error>(Bytes::from(data)), seq + 1)),
                Ok(None) => None,
                Err(err) => Some((Err(std::io::Error::other(err)), i32::MAX)),
            }
        }
    });
    let filename = format!("attachment; filename=\"history-{}.csv\"", e.id);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (header::CONTENT_DISPOSITION, filename),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
