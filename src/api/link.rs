//! `GET /i/{token}`: where an invitation link lands (SPEC §6). A valid link
//! redirects to the provider's registration page (`PREREG_SIGNUP_URL`) with
//! the token; otherwise a small page in the invitation's language gives the
//! cause's message and suggestion from the failure-cause table.

use askama::Template;
use axum::{
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
};
use chrono::Utc;

use super::AppState;
use crate::{domain::association::LinkState, links, store::invitations};

#[derive(Template)]
#[template(path = "link.html")]
struct LinkPage<'a> {
    lang: &'a str,
    title: &'a str,
    message: String,
    suggestion: String,
    provider: &'a str,
}

/// The texts of the link causes in Simplified Chinese (the failure-cause
/// table is written in English; these are its translations).
fn zh(code: &str) -> Option<(&'static str, &'static str)> {
    let again = "请重新发送邀请邮件。";
    Some(match code {
        "link_not_found" => ("邀请链接不存在。", again),
        "link_expired" => ("邀请链接已过期。", again),
        "link_used" => ("邀请链接已被使用。", again),
        "code_used" => ("邀请码已被使用。", again),
        _ => return None,
    })
}

/// `zh-CN` when the browser prefers Chinese, English otherwise (for links
/// whose invitation, and so its language, is unknown).
fn browser_lang(headers: &HeaderMap) -> &'static str {
    let prefers_zh = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|first| first.trim().to_ascii_lowercase().starts_with("zh"));
    if prefers_zh {
        "zh-CN"
    } else {
        "en"
    }
}

/// The registration page's URL with `token` added to its query.
pub fn signup_redirect(signup_url: &str, token: &str) -> Option<String> {
    let mut url = url::Url::parse(signup_url).ok()?;
    url.query_pairs_mut().append_pair("token", token);
    Some(url.into())
}

pub async fn open(
    State(st): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    let cfg = &st.ctx.cfg;
    let row = if token.len() > 512 {
        Ok(None)
    } else {
        invitations::link_by_token_hash(&st.ctx.db, &links::hash(&token)).await
    };
    let row = match row {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "invitation link: database unavailable");
            return super::error::ApiError::from(e).into_response();
        }
    };
    let (state, lang) = match &row {
        None => (LinkState::NotFound, browser_lang(&headers)),
        Some(r) => (
            LinkState::of(
                &r.status,
                r.link_expires_at,
                r.activated,
                r.claim_live,
                false,
                Utc::now(),
            ),
            if r.locale == "zh-CN" { "zh-CN" } else { "en" },
        ),
    };
    let private = [
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    let Some(code) = state.cause() else {
        return match signup_redirect(&cfg.signup_url, &token) {
            Some(to) => (StatusCode::FOUND, private, [(header::LOCATION, to)]).into_response(),
            None => {
                tracing::error!("PREREG_SIGNUP_URL is not a URL; cannot forward invitation links");
                super::error::ApiError::internal().into_response()
            }
        };
    };
    let (message, suggestion) = crate::domain::association::Causes::shipped()
        .view(code, &cfg.provider_name)
        .map(|v| (v.message, v.suggestion))
        .unwrap_or_default();
    let (title, message, suggestion) = match (lang, zh(code)) {
        ("zh-CN", Some((m, s))) => ("邀请链接", m.to_string(), s.to_string()),
        _ => ("Invitation link", message, suggestion),
    };
    let page = LinkPage {
        lang,
        title,
        message,
        suggestion,
        provider: &cfg.provider_name,
    };
    let status = if state == LinkState::NotFound {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::GONE
    };
    match page.render() {
        Ok(html) => (status, private, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "invitation link page failed to render");
            super::error::ApiError::internal().into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_keeps_the_signup_query_and_adds_the_token() {
        assert_eq!(
            signup_redirect("https://signup.example/register?src=mail", "a-b_c").unwrap(),
            "https://signup.example/register?src=mail&token=a-b_c"
        );
        assert!(signup_redirect("not a url", "t").is_none());
    }

    #[test]
    fn every_link_cause_has_a_chinese_text() {
        for s in [
            LinkState::NotFound,
            LinkState::Expired,
            LinkState::Used,
            LinkState::CodeUsed,
        ] {
            assert!(zh(s.cause().unwrap()).is_some(), "{s:?}");
        }
    }
}
