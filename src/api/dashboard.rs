//! `GET /admin`: the operators' dashboard, server-rendered HTML (no build
//! step). Sign-in with an operator key sets an HttpOnly, SameSite=Strict
//! cookie; the replay buttons also carry a CSRF token derived from it.

use askama::Template;
use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Redirect, Response},
    Form,
};
use chrono::Utc;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use sqlx::Row;

use super::{auth::authenticate_token, AppState};
use crate::{
    mq::{
        dead_letters::{self, DeadLetter},
        Queue,
    },
    store::keys::Role,
};

const COOKIE: &str = "prereg_operator";

struct QueueRow {
    name: &'static str,
    messages: u64,
    consumers: u64,
    dead: u64,
}

struct DeadQueue {
    name: &'static str,
    items: Vec<DeadLetter>,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Dashboard {
    now: String,
    flash: Option<String>,
    overdue_reviews: i64,
    open_reviews: i64,
    last_sweep: String,
    sweep_stale: bool,
    calendar: String,
    calendar_missing: bool,
    dead_total: u64,
    queue_error: Option<String>,
    queues: Vec<QueueRow>,
    emails: Vec<(String, i64)>,
    dead_letters: Vec<DeadQueue>,
    csrf: String,
}

#[derive(Template)]
#[template(path = "login.html")]
struct Login {
    failed: bool,
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

fn csrf_for(st: &AppState, key: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(st.ctx.cfg.link_secret.as_bytes())
        .unwrap_or_else(|_| <Hmac<Sha256> as Mac>::new_from_slice(b"prereg").expect("static key"));
    mac.update(b"csrf:");
    mac.update(key.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The operator key from the cookie, if it still is one.
async fn operator(st: &AppState, headers: &HeaderMap) -> Option<String> {
    let key = cookie(headers)?;
    match authenticate_token(&key, st).await {
        Ok(p) if p.role == Role::Operator => Some(key),
        _ => None,
    }
}

fn page<T: Template>(status: StatusCode, t: &T) -> Response {
    match t.render() {
        Ok(html) => (status, [(header::CACHE_CONTROL, "no-store")], Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "dashboard template failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

pub async fn login_form() -> Response {
    page(StatusCode::OK, &Login { failed: false })
}

#[derive(Deserialize)]
pub struct LoginForm {
    key: String,
}

pub async fn login(State(st): State<AppState>, Form(f): Form<LoginForm>) -> Response {
    let key = f.key.trim().to_string();
    match authenticate_token(&key, &st).await {
        Ok(p) if p.role == Role::Operator && !key.contains([';', ',', ' ']) => {
            let set =
                format!("{COOKIE}={key}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=43200");
            ([(header::SET_COOKIE, set)], Redirect::to("/admin")).into_response()
        }
        _ => page(StatusCode::UNAUTHORIZED, &Login { failed: true }),
    }
}

#[derive(Deserialize)]
pub struct DashboardQuery {
    replayed: Option<String>,
    n: Option<usize>,
}

pub async fn dashboard(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DashboardQuery>,
) -> Response {
    let Some(key) = operator(&st, &headers).await else {
        return Redirect::to("/admin/login").into_response();
    };
    match build(&st, &key, q).await {
        Ok(d) => page(StatusCode::OK, &d),
        Err(e) => {
            tracing::error!(error = %e, "dashboard data unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable",
            )
                .into_response()
        }
    }
}

async fn build(st: &AppState, key: &str, q: DashboardQuery) -> Result<Dashboard, sqlx::Error> {
    let ctx = &st.ctx;
    let db = &ctx.db;
    let reviews = sqlx::query(
        "SELECT count(*) FILTER (WHERE state = 'overdue') AS overdue, count(*) FILTER (WHERE state IN ('open', 'overdue')) AS open FROM reviews",
    )
    .fetch_one(db)
    .await?;
    let last: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(last_success_at) FROM sweep_runs")
            .fetch_one(db)
            .await?;
    let now = Utc::now();
    let stale_after = chrono::Duration::from_std(ctx.cfg.sweep_interval * 3)
        .unwrap_or(chrono::Duration::minutes(3));
    let (last_sweep, sweep_stale) = match last {
        Some(t) => (
            format!("{}s ago", (now - t).num_seconds().max(0)),
            now - t > stale_after,
        ),
        None => ("never".to_string(), true),
    };
    let calendar = ctx.calendar().await?;
    let years = calendar.loaded_years();
    let this_year: i32 = now
        .with_timezone(&ctx.cfg.timezone)
        .format("%Y")
        .to_string()
        .parse()
        .unwrap_or(2026);
    let reviews_missing: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM reviews WHERE calendar_missing AND state IN ('open', 'overdue'))")
        .fetch_one(db)
        .await?;
    let calendar_missing = reviews_missing || !years.contains(&this_year);
    let calendar_text = format!(
        "{}{}",
        years
            .iter()
            .map(|y| y.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        if calendar_missing {
            " — calendar_missing"
        } else {
            ""
        }
    );
    let emails: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM invitations GROUP BY status ORDER BY status")
            .fetch_all(db)
            .await?;
    let (mut queues, mut queue_error, mut dead_letters, mut dead_total) =
        (Vec::new(), None, Vec::new(), 0);
    match dead_letters::queue_stats(&ctx.broker).await {
        Ok(stats) => {
            for s in stats {
                let name = Queue::parse(s["queue"].as_str().unwrap_or_default());
                let Some(qn) = name else { continue };
                let dead = s["dead_letters"].as_u64().unwrap_or(0);
                dead_total += dead;
                queues.push(QueueRow {
                    name: qn.short(),
                    messages: s["messages"].as_u64().unwrap_or(0),
                    consumers: s["consumers"].as_u64().unwrap_or(0),
                    dead,
                });
                if dead > 0 {
                    let items = dead_letters::list(&ctx.broker, qn, 20)
                        .await
                        .unwrap_or_default();
                    dead_letters.push(DeadQueue {
                        name: qn.short(),
                        items,
                    });
                }
            }
        }
        Err(e) => queue_error = Some(e.to_string()),
    }
    let flash = q
        .replayed
        .map(|queue| format!("Replayed {} message(s) of {queue}.", q.n.unwrap_or(0)));
    Ok(Dashboard {
        now: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        flash,
        overdue_reviews: reviews.get("overdue"),
        open_reviews: reviews.get("open"),
        last_sweep,
        sweep_stale,
        calendar: calendar_text,
        calendar_missing,
        dead_total,
        queue_error,
        queues,
        emails,
        dead_letters,
        csrf: csrf_for(st, key),
    })
}

#[derive(Deserialize)]
pub struct ReplayForm {
    csrf: String,
}

pub async fn replay(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Form(f): Form<ReplayForm>,
) -> Response {
    let Some(key) = operator(&st, &headers).await else {
        return Redirect::to("/admin/login").into_response();
    };
    if f.csrf != csrf_for(&st, &key) {
        return (StatusCode::FORBIDDEN, "stale form; reload the dashboard").into_response();
    }
    let Some(q) = Queue::parse(&queue) else {
        return (StatusCode::NOT_FOUND, "no such queue").into_response();
    };
    match dead_letters::replay(&st.ctx.broker, q, 10_000).await {
        Ok(n) => {
            if let Ok(mut conn) = st.ctx.db.acquire().await {
                let _ = crate::store::audit(
                    &mut conn,
                    "operator:dashboard",
                    "dead_letters.replayed",
                    Some(q.short()),
                    Some(serde_json::json!({"count": n})),
                )
                .await;
            }
            Redirect::to(&format!("/admin?replayed={}&n={n}", q.short())).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("replay failed: {e}"),
        )
            .into_response(),
    }
}
