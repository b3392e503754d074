//! Invitations (batch invite and resend, delivery state, preview), offline
//! links with their QR code, and association attempts from upstream.

use axum::{
    body::Bytes,
    extract::{Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    auth::{PartnerAuth, UpstreamAuth},
    command::PartnerCommand,
    command::{self, Idem},
    error::{ApiError, ApiResult},
    json_body,
    partner::{developing_partner, parse_id_list, referral_not_permitted},
    views, AppState, PathId, RequestId,
};
use crate::{
    domain::{
        association::Causes,
        mask,
        validate::{self, FieldError, Fields},
    },
    jobs::{AssociationRequested, InvitationRequested},
    links, mail,
    mq::CloudEvent,
    store::{invitations, preregs},
};

/// Links expire after the invitation validity, never after the claim.
fn link_expiry(st: &AppState, claim_expires: Option<DateTime<Utc>>) -> DateTime<Utc> {
    crate::domain::invitation::link_expires_at(
        Utc::now(),
        st.ctx.cfg.invitation_validity,
        claim_expires,
    )
}

fn item_error(id: Uuid, code: &str, message: &str) -> Value {
    json!({"preregistration_id": id, "status": "error", "error": {"code": code, "message": message}})
}

/// Creates one queued email invitation per item and publishes its job.
async fn send_batch(
    st: &AppState,
    auth: &PartnerAuth,
    rid: &RequestId,
    items: Vec<(Uuid, Option<(String, String)>)>,
    idem: Option<Idem>,
) -> ApiResult<Response> {
    let partner = developing_partner(st, auth).await?;
    let mut tx = st.ctx.db.begin().await?;
    if let Some(r) = command::replay(&mut tx, idem.as_ref()).await? {
        return Ok(r);
    }
    let mut results: Vec<Value> = Vec::with_capacity(items.len());
    let mut jobs: Vec<(usize, Uuid, CloudEvent)> = Vec::new();
    for (id, choice) in items {
        let p = match preregs::get(&mut *tx, id).await? {
            Some(p) if p.partner_id == partner.id => p,
            _ => {
                results.push(item_error(id, "not_found", "pre-registration not found"));
                continue;
            }
        };
        if !p.status().invitable() {
            results.push(item_error(
                id,
                "not_invitable",
                &format!("a pre-registration that is {} cannot be invited", p.status),
            ));
            continue;
        }
        let (kind, locale) = match choice {
            Some(c) => c,
            None => {
                // Resend: as the latest invitation, or the partner's defaults.
                let last = invitations::for_prereg(&mut *tx, id)
                    .await?
                    .into_iter()
                    .next();
                match last {
                    Some(l) => (l.association_type, l.locale),
                    None => ("reseller".to_string(), partner.locale.clone()),
                }
            }
        };
        if kind == "referral" && !partner.referral {
            results.push(item_error(
                id,
                "referral_not_permitted",
                "your partner account does not have the referral permission",
            ));
            continue;
        }
        let inv_id = crate::flows::invitations::create_email(
            &mut tx,
            st.ctx.cfg.link_secret.as_bytes(),
            &crate::flows::invitations::NewEmail {
                preregistration_id: id,
                partner_id: partner.id,
                association_type: &kind,
                locale: &locale,
                link_expires_at: link_expiry(st, p.expires_at),
                request_id: Some(&rid.0),
            },
        )
        .await?;
        let job = command::job(
            inv_id.to_string(),
            &InvitationRequested {
                invitation_id: inv_id,
            },
        )?
        .subject(id)
        .correlation(Some(rid.0.clone()));
        jobs.push((results.len(), inv_id, job));
        results
            .push(json!({"preregistration_id": id, "status": "queued", "invitation_id": inv_id}));
    }
    // The jobs go to the outbox in the same transaction as the invitations
    // and the idempotency answer, then are published together (SPEC §8:
    // accepted is never lost; a concurrent request with the same key waits
    // for this answer).
    let staged = command::stage(
        st,
        &mut tx,
        jobs.iter()
            .map(|(_, inv_id, job)| {
                (
                    job.clone(),
                    vec![crate::store::undo::Undo::Invitation(*inv_id)],
                )
            })
            .collect(),
    )
    .await?;
    let answer = command::accepted(json!({"results": results.clone()}), None);
    if let Some(i) = &idem {
        i.save(&mut tx, &answer).await?;
    }
    tx.commit().await?;
    // Jobs the broker certainly did not take are withdrawn (their invitation
    // deleted); every other one runs, confirmed now or published later.
    let (withdrawn, wtx) = command::settle(st, &staged).await;
    let Some(mut wtx) = wtx else {
        return Ok(command::respond(&answer));
    };
    let mut failed = 0;
    for ((slot, _, _), w) in jobs.iter().zip(&withdrawn) {
        if *w {
            let pid = results[*slot]["preregistration_id"].clone();
            results[*slot] = json!({"preregistration_id": pid, "status": "error",
                "error": {"code": "service_unavailable", "message": "the message broker is unavailable; try again"}});
            failed += 1;
        }
    }
    let all_failed = failed > 0 && failed == jobs.len();
    let final_answer = command::accepted(json!({"results": results}), None);
    let fixed: Result<(), sqlx::Error> = async {
        if let Some(i) = &idem {
            if all_failed {
                i.forget(&mut wtx).await?;
            } else {
                i.save(&mut wtx, &final_answer).await?;
            }
        }
        wtx.commit().await
    }
    .await;
    if let Err(e) = fixed {
        // Nothing withdrawn after all: every job runs.
        tracing::warn!(error = %e, "could not withdraw refused invitation jobs; the relay will publish them");
        return Ok(command::respond(&answer));
    }
    if all_failed {
        return Err(ApiError::dependency_down(
            crate::deps::Dep::RabbitMq,
            "the message broker is unavailable; nothing was done, try again",
        ));
    }
    Ok(command::respond(&final_answer))
}

pub async fn invite(cmd: PartnerCommand) -> ApiResult<Response> {
    let (st, auth, rid, headers, body) = cmd.into_parts();
    let v = json_body(&body)?;
    let ids = parse_id_list(&v, "preregistration_ids")?;
    let mut f = Fields::new(&v);
    f.known(&["preregistration_ids"]);
    let kind = f
        .optional_enum("association_type", validate::ASSOCIATION_TYPES)
        .unwrap_or("reseller");
    let locale = f.optional_enum("locale", validate::LOCALES);
    f.finish().map_err(ApiError::validation)?;
    let partner = developing_partner(&st, &auth).await?;
    if kind == "referral" && !partner.referral {
        return Err(referral_not_permitted());
    }
    let locale = locale.map(str::to_string).unwrap_or(partner.locale.clone());
    let items = ids
        .into_iter()
        .map(|id| (id, Some((kind.to_string(), locale.clone()))))
        .collect();
    let idem = Idem::post(&headers, &auth.principal, "/v1/invitations", &body)?;
    send_batch(&st, &auth, &rid, items, idem).await
}

pub async fn resend(cmd: PartnerCommand) -> ApiResult<Response> {
    let (st, auth, rid, headers, body) = cmd.into_parts();
    let v = json_body(&body)?;
    validate::only_fields(&v, &["preregistration_ids"]).map_err(ApiError::validation)?;
    let ids = parse_id_list(&v, "preregistration_ids")?;
    let items = ids.into_iter().map(|id| (id, None)).collect();
    let idem = Idem::post(&headers, &auth.principal, "/v1/invitations/resend", &body)?;
    send_batch(&st, &auth, &rid, items, idem).await
}

pub async fn get_one(
    State(st): State<AppState>,
    auth: PartnerAuth,
    PathId(id): PathId,
) -> ApiResult<Json<Value>> {
    match invitations::get(&st.ctx.db, id).await? {
        Some(i) if i.partner_id == auth.partner_id => Ok(Json(views::invitation(&i))),
        _ => Err(ApiError::not_found("invitation")),
    }
}

#[derive(Deserialize)]
pub struct PreviewQuery {
    preregistration_id: Option<String>,
    association_type: Option<String>,
    locale: Option<String>,
    reveal: Option<String>,
}

/// Renders what an invitation sent now would say, with the customer's name
/// masked unless `reveal=true` (then it is exactly the email, and audited);
/// only the link's token is a placeholder (a real one exists once the
/// invitation does).
pub async fn preview(
    State(st): State<AppState>,
    auth: PartnerAuth,
    Query(q): Query<PreviewQuery>,
) -> ApiResult<Json<Value>> {
    let mut errors = Vec::new();
    let field = |f: &str, m: &str| FieldError {
        field: f.into(),
        code: "invalid",
        message: m.into(),
    };
    let id = q
        .preregistration_id
        .as_deref()
        .and_then(|s| Uuid::parse_str(s).ok());
    if id.is_none() {
        errors.push(field(
            "preregistration_id",
            "preregistration_id must be a UUID",
        ));
    }
    let kind = q.association_type.as_deref().unwrap_or("reseller");
    if !validate::ASSOCIATION_TYPES.contains(&kind) {
        errors.push(field(
            "association_type",
            "association_type must be reseller or referral",
        ));
    }
    if q.locale
        .as_deref()
        .is_some_and(|l| !validate::LOCALES.contains(&l))
    {
        errors.push(field("locale", "locale must be en or zh-CN"));
    }
    let reveal = super::partner::reveal_param(q.reveal.as_deref()).unwrap_or_else(|_| {
        errors.push(field("reveal", "reveal must be true or false"));
        false
    });
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let partner = developing_partner(&st, &auth).await?;
    let p = match preregs::get(&st.ctx.db, id.unwrap_or_default()).await? {
        Some(p) if p.partner_id == partner.id => p,
        _ => return Err(ApiError::not_found("pre-registration")),
    };
    let customer_name = if reveal {
        super::partner::audit_reveal(
            &st,
            &auth.principal.label(),
            "invitation_preview.revealed",
            p.id,
        )
        .await?;
        p.full_name.clone()
    } else {
        mask::name(&p.full_name)
    };
    let locale = q.locale.unwrap_or(partner.locale.clone());
    let link = links::link_url(&st.ctx.cfg.public_url, "PREVIEW-TOKEN");
    let rendered = mail::render_invitation(&mail::InvitationVars {
        locale: &locale,
        customer_name: &customer_name,
        partner_name: &partner.name,
        provider: &st.ctx.cfg.provider_name,
        association_type: kind,
        link: &link,
        expires_at: Some(link_expiry(&st, p.expires_at)),
        timezone: st.ctx.cfg.timezone,
    })
    .map_err(|e| {
        tracing::error!(error = %e, "template failed");
        ApiError::internal()
    })?;
    Ok(Json(serde_json::to_value(rendered).unwrap_or_default()))
}

/// An offline link and one-time code; earlier links of the claim stop working.
pub async fn offline_link(
    State(st): State<AppState>,
    auth: PartnerAuth,
    Extension(rid): Extension<RequestId>,
    PathId(id): PathId,
    body: Bytes,
) -> ApiResult<Response> {
    let kind = if body.is_empty() {
        "reseller"
    } else {
        let v = json_body(&body)?;
        let mut f = Fields::new(&v);
        let k = f
            .optional_enum("association_type", validate::ASSOCIATION_TYPES)
            .unwrap_or("reseller");
        f.finish().map_err(ApiError::validation)?;
        k
    };
    let partner = developing_partner(&st, &auth).await?;
    if kind == "referral" && !partner.referral {
        return Err(referral_not_permitted());
    }
    let offline = crate::flows::invitations::create_offline(
        &st.ctx,
        &partner,
        id,
        kind,
        &auth.principal.label(),
        &rid.0,
    )
    .await?;
    let url = links::link_url(&st.ctx.cfg.public_url, &offline.token);
    let (inv_id, code) = (offline.invitation_id, offline.code);
    let body = json!({
        "invitation_id": inv_id,
        "preregistration_id": id,
        "url": url,
        "code": code,
        "qr_url": format!("/v1/preregistrations/{id}/offline-link/qr.png"),
        "link_expires_at": null,
        "claim_expires_at": offline.claim_expires_at,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The QR code (PNG) of the pre-registration's live offline link.
pub async fn offline_qr(
    State(st): State<AppState>,
    auth: PartnerAuth,
    PathId(id): PathId,
) -> ApiResult<Response> {
    let p = match preregs::get(&st.ctx.db, id).await? {
        Some(p) if p.partner_id == auth.partner_id => p,
        _ => return Err(ApiError::not_found("pre-registration")),
    };
    let inv = invitations::for_prereg(&st.ctx.db, p.id)
        .await?
        .into_iter()
        .find(|i| i.method == "offline" && i.status == "sent")
        .ok_or_else(|| ApiError::not_found("live offline link"))?;
    let token = links::token(st.ctx.cfg.link_secret.as_bytes(), inv.id, &inv.nonce);
    let png = qr_png(&links::link_url(&st.ctx.cfg.public_url, &token)).map_err(|e| {
        tracing::error!(error = %e, "qr rendering failed");
        ApiError::internal()
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        png,
    )
        .into_response())
}

/// Renders `text` as a QR code PNG (8 px modules, 4-module quiet zone).
pub fn qr_png(text: &str) -> Result<Vec<u8>, String> {
    let code = qrcode::QrCode::new(text.as_bytes()).map_err(|e| e.to_string())?;
    let modules = code.width();
    let colors = code.to_colors();
    const SCALE: usize = 8;
    const QUIET: usize = 4;
    let size = (modules + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; size * size];
    for (i, c) in colors.iter().enumerate() {
        if *c == qrcode::Color::Dark {
            let (mx, my) = (i % modules + QUIET, i / modules + QUIET);
            for y in my * SCALE..(my + 1) * SCALE {
                pixels[y * size + mx * SCALE..y * size + (mx + 1) * SCALE].fill(0);
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, size as u32, size as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(&pixels).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// An association attempt from the account system: `{"token" | "code", "account_id"}`.
pub async fn submit_association(
    State(st): State<AppState>,
    auth: UpstreamAuth,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let v = json_body(&body)?;
    let mut f = Fields::new(&v);
    let token = f.optional_str("token", 512);
    let code = f.optional_str("code", 64);
    let account_id = f.required_str("account_id", 128);
    match (&token, &code) {
        (None, None) => f.error(
            "token",
            "required",
            "give the link's token or the offline code",
        ),
        (Some(_), Some(_)) => f.error("code", "invalid", "give either token or code, not both"),
        _ => {}
    }
    f.finish().map_err(ApiError::validation)?;
    let idem = Idem::from_headers(&headers, auth.0.label(), "POST", "/v1/associations", &body)?;
    let mut tx = st.ctx.db.begin().await?;
    if let Some(r) = command::replay(&mut tx, idem.as_ref()).await? {
        return Ok(r);
    }
    let id = Uuid::now_v7();
    let token_hash = token.as_deref().map(links::hash);
    let code_hash = code
        .as_deref()
        .map(|c| links::code_hash(st.ctx.cfg.link_secret.as_bytes(), c));
    // Guessing is throttled (SPEC §8): per upstream key, and per invitation.
    let submitter = auth.0.label();
    let cfg = &st.ctx.cfg;
    if invitations::unsuccessful_attempts_by(&mut *tx, &submitter, cfg.attempt_window).await?
        >= i64::from(cfg.attempt_key_limit)
    {
        return Ok(too_many_attempts(
            cfg.attempt_window,
            format!(
                "this key made {} unsuccessful association attempts within {} s; try again later",
                cfg.attempt_key_limit,
                cfg.attempt_window.as_secs()
            ),
        ));
    }
    if invitations::failed_attempts_on(
        &mut *tx,
        token_hash.as_deref(),
        code_hash.as_deref(),
        cfg.attempt_cooldown,
    )
    .await?
        >= i64::from(cfg.attempt_limit)
    {
        return Ok(too_many_attempts(
            cfg.attempt_cooldown,
            format!(
                "this invitation is locked after {} failed association attempts; try again later",
                cfg.attempt_limit
            ),
        ));
    }
    invitations::insert_attempt(
        &mut tx,
        id,
        &account_id.unwrap_or_default(),
        token_hash.as_deref(),
        code_hash.as_deref(),
        &submitter,
    )
    .await?;
    let job = command::job(id.to_string(), &AssociationRequested { attempt_id: id })?
        .correlation(Some(rid.0.clone()));
    command::accept(
        &st,
        tx,
        idem.as_ref(),
        &job,
        Some(crate::store::undo::Undo::AssociationAttempt(id)),
        json!({"id": id, "status": "queued"}),
        format!("/v1/associations/{id}"),
    )
    .await
}

/// `429` with `Retry-After` (whole seconds).
fn too_many_attempts(wait: std::time::Duration, message: String) -> Response {
    let mut resp =
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts", message).into_response();
    let secs = wait.as_secs().max(1).to_string();
    if let Ok(v) = axum::http::HeaderValue::from_str(&secs) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

pub async fn get_association(
    State(st): State<AppState>,
    _auth: UpstreamAuth,
    PathId(id): PathId,
) -> ApiResult<Json<Value>> {
    let a = invitations::get_attempt(&st.ctx.db, id)
        .await?
        .ok_or_else(|| ApiError::not_found("association attempt"))?;
    let cause = a
        .cause_code
        .as_deref()
        .and_then(|c| Causes::shipped().view(c, &st.ctx.cfg.provider_name));
    Ok(Json(json!({
        "id": a.id,
        "status": a.status,
        "cause": cause,
        "account_id": a.account_id,
        "invitation_id": a.invitation_id,
        "created_at": a.created_at,
        "decided_at": a.decided_at,
    })))
}
