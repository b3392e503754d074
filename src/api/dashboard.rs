//! `/admin`: the operators' dashboard, server-rendered HTML that works
//! offline (inline SVG charts, no script from elsewhere).
//!
//! Sessions (SPEC §8): signing in with an operator key creates a random
//! session id kept server-side (only its SHA-256 is stored); the cookie holds
//! that id, never the key, and is `HttpOnly`, `SameSite=Strict`, `Secure`
//! when `PREREG_PUBLIC_URL` is https. A session ends after
//! `PREREG_DASHBOARD_IDLE` without a request, `PREREG_DASHBOARD_LIFETIME`
//! after sign-in, at sign-out, or when its operator key is revoked. Failed
//! sign-ins are limited per client address; every state-changing form carries
//! the session's CSRF token, compared in constant time.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use askama::Template;
use axum::{
    extract::{ConnectInfo, FromRequest, Path, Query, Request, State},
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Redirect, Response},
    Form,
};
use base64::Engine;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rand::RngCore;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::{auth::authenticate_token, AppState};
use crate::{
    domain::mask,
    jobstats::{self, Series},
    mq::{
        dead_letters::{self, DeadLetter},
        Queue,
    },
    store::{
        self,
        keys::{Principal, Role},
    },
};

const COOKIE: &str = "prereg_session";
/// Failed sign-ins allowed per client address per window.
const SIGN_IN_FAILURES: u32 = 5;
const SIGN_IN_WINDOW: Duration = Duration::from_secs(60);

/// A signed-in operator.
struct Session {
    id_hash: Vec<u8>,
    key_id: Option<Uuid>,
    csrf: String,
    tz: Tz,
}

impl Session {
    fn actor(&self) -> String {
        Principal {
            key_id: self.key_id,
            role: Role::Operator,
            partner_id: None,
        }
        .label()
    }

    /// Whether a form's token is this session's (constant time).
    fn csrf_ok(&self, given: &str) -> bool {
        given.len() == self.csrf.len() && bool::from(given.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
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
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn cookie_attrs(st: &AppState) -> &'static str {
    if st.ctx.cfg.public_url.starts_with("https://") {
        "Path=/admin; HttpOnly; SameSite=Strict; Secure"
    } else {
        "Path=/admin; HttpOnly; SameSite=Strict"
    }
}

/// The session of a form post whose CSRF token matches; otherwise the
/// answer to give (to the login page, or "stale form").
async fn form_session(st: &AppState, headers: &HeaderMap, csrf: &str) -> Result<Session, Response> {
    let Some(s) = session(st, headers).await else {
        return Err(to_login());
    };
    if !s.csrf_ok(csrf) {
        return Err(stale_form());
    }
    Ok(s)
}

/// The live session of this request, touched (idle expiry moves on).
async fn session(st: &AppState, headers: &HeaderMap) -> Option<Session> {
    let id = cookie(headers)?;
    let idle = st.ctx.cfg.dashboard_idle.as_secs_f64();
    let id_hash = Sha256::digest(id.as_bytes()).to_vec();
    let row = store::dashboard::touch_session(&st.ctx.db, &id_hash, idle)
        .await
        .ok()??;
    let tz = row
        .tz
        .and_then(|t| t.parse::<Tz>().ok())
        .unwrap_or(st.ctx.cfg.timezone);
    Some(Session {
        id_hash,
        key_id: row.key_id,
        csrf: row.csrf,
        tz,
    })
}

fn page<T: Template>(status: StatusCode, t: &T) -> Response {
    match t.render() {
        Ok(html) => (
            status,
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::X_FRAME_OPTIONS, "DENY"),
                (header::REFERRER_POLICY, "no-referrer"),
            ],
            Html(html),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "dashboard template failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn to_login() -> Response {
    Redirect::to("/admin/login").into_response()
}

fn stale_form() -> Response {
    (
        StatusCode::FORBIDDEN,
        "stale or forged form (CSRF token mismatch); reload the dashboard",
    )
        .into_response()
}

// ----------------------------------------------------------------- sign-in

#[derive(Template)]
#[template(path = "login.html")]
struct Login {
    failed: bool,
    limited: bool,
}

pub async fn login_form() -> Response {
    page(
        StatusCode::OK,
        &Login {
            failed: false,
            limited: false,
        },
    )
}

#[derive(Deserialize)]
pub struct LoginForm {
    key: String,
    #[serde(default)]
    tz: String,
}

/// Failed sign-ins per client address: (count, window start).
static FAILURES: Mutex<Option<HashMap<String, (u32, Instant)>>> = Mutex::new(None);

/// Seconds until `client` may try again, when it is over the limit.
fn limited(client: &str) -> Option<u64> {
    let mut g = FAILURES.lock().ok()?;
    let map = g.get_or_insert_with(HashMap::new);
    let (n, since) = map.get(client)?;
    let left = SIGN_IN_WINDOW.checked_sub(since.elapsed())?;
    (*n >= SIGN_IN_FAILURES).then(|| left.as_secs().max(1))
}

fn count_failure(client: &str) {
    if let Ok(mut g) = FAILURES.lock() {
        let map = g.get_or_insert_with(HashMap::new);
        if map.len() > 10_000 {
            map.retain(|_, (_, t)| t.elapsed() < SIGN_IN_WINDOW);
        }
        let e = map.entry(client.to_string()).or_insert((0, Instant::now()));
        if e.1.elapsed() >= SIGN_IN_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }
}

pub async fn login(State(st): State<AppState>, req: Request) -> Response {
    // Per deployment (the broker prefix) and client address.
    let client = format!(
        "{}/{}",
        st.ctx.cfg.amqp_prefix,
        req.extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_else(|| "unknown".into())
    );
    if let Some(wait) = limited(&client) {
        let mut r = page(
            StatusCode::TOO_MANY_REQUESTS,
            &Login {
                failed: false,
                limited: true,
            },
        );
        if let Ok(v) = wait.to_string().parse() {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let Ok(Form(f)) = Form::<LoginForm>::from_request(req, &st).await else {
        return (StatusCode::BAD_REQUEST, "a sign-in form is expected").into_response();
    };
    let key = f.key.trim();
    let principal = match authenticate_token(key, &st).await {
        Ok(p) if p.role == Role::Operator && !key.is_empty() => p,
        _ => {
            count_failure(&client);
            tracing::info!(client = %client, "dashboard sign-in refused");
            return page(
                StatusCode::UNAUTHORIZED,
                &Login {
                    failed: true,
                    limited: false,
                },
            );
        }
    };
    let id = random_token();
    let tz = f.tz.trim().parse::<Tz>().ok().map(|t| t.name().to_string());
    let lifetime = st.ctx.cfg.dashboard_lifetime;
    let created = store::dashboard::create_session(
        &st.ctx.db,
        &Sha256::digest(id.as_bytes()),
        principal.key_id,
        &random_token(),
        lifetime.as_secs_f64(),
        tz.as_deref(),
    )
    .await;
    if let Err(e) = created {
        tracing::error!(error = %e, "cannot store the dashboard session");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is unavailable",
        )
            .into_response();
    }
    // Sessions past their absolute expiry are of no use to anyone.
    let _ = store::dashboard::delete_expired_sessions(&st.ctx.db).await;
    if let Ok(mut conn) = st.ctx.db.acquire().await {
        let _ = crate::store::audit(
            &mut conn,
            &principal.label(),
            "dashboard.signed_in",
            None,
            None,
        )
        .await;
    }
    let set = format!(
        "{COOKIE}={id}; {}; Max-Age={}",
        cookie_attrs(&st),
        lifetime.as_secs()
    );
    ([(header::SET_COOKIE, set)], Redirect::to("/admin")).into_response()
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn logout(
    State(st): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let s = match form_session(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(answer) => return answer,
    };
    let _ = store::dashboard::delete_session(&st.ctx.db, &s.id_hash).await;
    let clear = format!("{COOKIE}=; {}; Max-Age=0", cookie_attrs(&st));
    ([(header::SET_COOKIE, clear)], Redirect::to("/admin/login")).into_response()
}

// --------------------------------------------------------------- the page

/// One timestamp format everywhere, in the operator's time zone.
fn ts(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz)
        .format("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

fn ts_opt(t: Option<DateTime<Utc>>, tz: Tz) -> String {
    t.map(|t| ts(t, tz)).unwrap_or_else(|| "—".into())
}

fn rate(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(0.0) => "0".into(),
        Some(v) if v >= 10.0 => format!("{v:.0}/s"),
        Some(v) => format!("{v:.2}/s"),
    }
}

fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0 => "0 s".into(),
        1..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

struct QueueRow {
    name: &'static str,
    ready: u64,
    in_flight: String,
    consumers: u64,
    dead: u64,
    oldest: String,
    publish: String,
    deliver: String,
    ack: String,
    processed_hour: u64,
    failed_hour: u64,
}

struct RetryRow {
    delay: String,
    depth: u64,
}

struct ReviewRow {
    id: Uuid,
    partner: String,
    state: String,
    requested: String,
    due: String,
    overdue: bool,
    calendar_missing: bool,
}

struct ClaimRow {
    id: Uuid,
    partner: String,
    name: String,
    email: String,
    status: String,
    expires: String,
    left: String,
}

struct SweepRow {
    name: String,
    last: String,
    ago: String,
    stale: bool,
    stats: String,
}

struct DeadRow {
    message_id: String,
    reason: String,
    error: String,
    failed_at: String,
    retries: u32,
    routing_key: String,
    body: String,
    headers: Vec<(String, String)>,
}

struct DeadQueue {
    name: &'static str,
    total: u64,
    items: Vec<DeadRow>,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Dashboard {
    now: String,
    tz: String,
    actor: String,
    flash: Option<String>,
    overdue_reviews: usize,
    open_reviews: usize,
    dead_total: u64,
    last_sweep: String,
    sweep_stale: bool,
    calendar_years: String,
    calendar_warnings: Vec<String>,
    queue_error: Option<String>,
    queues: Vec<QueueRow>,
    retries: Vec<RetryRow>,
    chart_processed: String,
    chart_failed: String,
    chart_latency: String,
    reviews: Vec<ReviewRow>,
    claims: Vec<ClaimRow>,
    claims_total: i64,
    sweeps: Vec<SweepRow>,
    emails: Vec<(String, i64)>,
    dead_letters: Vec<DeadQueue>,
    mail: Option<usize>,
    csrf: String,
}

#[derive(Deserialize)]
pub struct DashboardQuery {
    done: Option<String>,
}

pub async fn dashboard(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DashboardQuery>,
) -> Response {
    let Some(s) = session(&st, &headers).await else {
        return to_login();
    };
    match build(&st, &s, q).await {
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

/// Masks what may be personal in a dead letter's JSON body.
pub fn mask_body(body: &str) -> String {
    fn walk(key: &str, v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    walk(k, x);
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| walk(key, x)),
            Value::String(s) => {
                let k = key.to_ascii_lowercase();
                *s = if k.contains("mobile") || k.contains("phone") {
                    mask::mobile(s)
                } else if k.contains("email") || k == "to" || s.contains('@') {
                    mask::email(s)
                } else if k.contains("name") {
                    mask::name(s)
                } else {
                    return;
                };
            }
            _ => {}
        }
    }
    match serde_json::from_str::<Value>(body) {
        Ok(mut v) => {
            walk("", &mut v);
            serde_json::to_string_pretty(&v).unwrap_or_default()
        }
        Err(_) => format!("(not JSON, {} bytes; not shown)", body.len()),
    }
}

/// Depths of the work, dead-letter and retry queues (passive declares).
async fn broker_depths(
    st: &AppState,
) -> anyhow::Result<(Vec<(Queue, u64, u64, u64)>, Vec<RetryRow>)> {
    let ctx = &st.ctx;
    let (_, ch) = ctx.broker.channel().await?;
    let names = &ctx.broker.names;
    let mut queues = Vec::new();
    for q in Queue::ALL {
        let (work, dlq) = dead_letters::depths(&ch, names, q).await?;
        queues.push((
            q,
            work.message_count() as u64,
            work.consumer_count() as u64,
            dlq.message_count() as u64,
        ));
    }
    let mut retries = Vec::new();
    for (tier, delay) in ctx.cfg.retry_delays.iter().enumerate() {
        if let Ok(r) = dead_letters::passive_declare(&ch, &names.retry_queue(tier)).await {
            retries.push(RetryRow {
                delay: format!("{delay:?}"),
                depth: r.message_count() as u64,
            });
        }
    }
    let _ = ch.close(200, "dashboard").await;
    Ok((queues, retries))
}

async fn build(st: &AppState, s: &Session, q: DashboardQuery) -> Result<Dashboard, sqlx::Error> {
    let ctx = &st.ctx;
    let db = &ctx.db;
    let tz = s.tz;
    let now = Utc::now();

    // Queues: the broker's depths, and this process's own job metrics.
    let hist = jobstats::history();
    let last = hist.last();
    // Rates over the last minute (or what history there is).
    let minute = hist
        .iter()
        .rev()
        .find(|x| last.is_some_and(|l| (l.at - x.at).num_seconds() >= 60))
        .or(hist.first());
    let runs_workers =
        last.is_some_and(|l| l.gauges.keys().any(|(m, _)| m == "prereg_jobs_in_flight"));
    let (mut queues, mut retries, mut queue_error, mut dead_total) =
        (Vec::new(), Vec::new(), None, 0);
    let mut dead_letters = Vec::new();
    match broker_depths(st).await {
        Ok((qs, rs)) => {
            retries = rs;
            for (queue, ready, consumers, dead) in qs {
                let name = queue.short();
                let gauge = |metric: &str| {
                    last.and_then(|l| l.gauges.get(&(metric.to_string(), name.to_string())))
                        .copied()
                };
                let (deliver, failed_rate, ack) = match (minute, last) {
                    (Some(a), Some(b)) if a.at < b.at => {
                        let (d, f, k) = jobstats::rates(a, b, name);
                        (Some(d), Some(f), Some(k))
                    }
                    _ => (None, None, None),
                };
                let _ = failed_rate;
                let depth_change = match (minute, last) {
                    (Some(a), Some(b)) if a.at < b.at => {
                        let key = ("prereg_queue_depth".to_string(), name.to_string());
                        match (a.gauges.get(&key), b.gauges.get(&key)) {
                            (Some(x), Some(y)) => {
                                Some((y - x) / ((b.at - a.at).num_milliseconds() as f64 / 1000.0))
                            }
                            _ => Some(0.0),
                        }
                    }
                    _ => None,
                };
                let publish = match (deliver, depth_change) {
                    (Some(d), Some(c)) => Some((d + c).max(0.0)),
                    _ => None,
                };
                let (processed_hour, failed_hour, _) = match (hist.first(), last) {
                    (Some(a), Some(b)) => jobstats::counts(a, b, name),
                    _ => (0.0, 0.0, 0.0),
                };
                dead_total += dead;
                queues.push(QueueRow {
                    name,
                    ready,
                    in_flight: match gauge("prereg_jobs_in_flight") {
                        Some(v) => format!("{v:.0}"),
                        // This process consumes but has not taken a job of this queue yet.
                        None if runs_workers => "0".into(),
                        None => "—".into(),
                    },
                    consumers,
                    dead,
                    oldest: if ready == 0 {
                        "—".into()
                    } else {
                        gauge("prereg_queue_oldest_message_age_seconds")
                            .map(age)
                            .unwrap_or_else(|| "—".into())
                    },
                    publish: rate(publish),
                    deliver: rate(deliver),
                    ack: rate(ack),
                    processed_hour: processed_hour as u64,
                    failed_hour: failed_hour as u64,
                });
                if dead > 0 {
                    let items = dead_letters::list(&ctx.broker, queue, 20)
                        .await
                        .unwrap_or_default();
                    dead_letters.push(DeadQueue {
                        name,
                        total: dead,
                        items: items.into_iter().map(|d| dead_row(d, tz)).collect(),
                    });
                }
            }
        }
        Err(e) => queue_error = Some(e.to_string()),
    }

    // Charts over the last hour, one point per sample from a 1-minute window.
    let window = jobstats::RATE_WINDOW;
    let series = |failed: bool| -> Vec<Series> {
        Queue::ALL
            .iter()
            .map(|q| Series {
                name: q.short().to_string(),
                points: jobstats::points(&hist, window, |a, b| {
                    let (all, f, _) = jobstats::rates(a, b, q.short());
                    Some(if failed { f } else { all })
                }),
            })
            .filter(|s| s.points.iter().any(|p| p.1 > 0.0))
            .collect()
    };
    let latency: Vec<Series> = [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)]
        .into_iter()
        .map(|(name, qn)| Series {
            name: name.into(),
            points: jobstats::points(&hist, window, |a, b| {
                jobstats::quantile(a, b, &[], qn).map(|v| v * 1000.0)
            }),
        })
        .collect();
    let chart_processed = jobstats::svg_chart(
        "chart-processed",
        "Processed jobs per kind",
        "jobs/s",
        &series(false),
        now,
    );
    let chart_failed = jobstats::svg_chart(
        "chart-failed",
        "Failed jobs per kind (retried or dead-lettered)",
        "jobs/s",
        &series(true),
        now,
    );
    let chart_latency = jobstats::svg_chart("chart-latency", "Job latency", "ms", &latency, now);

    // Reviews: open and overdue, soonest due first.
    let reviews: Vec<ReviewRow> = store::dashboard::undecided_reviews(db)
        .await?
        .into_iter()
        .map(|r| {
            let due = r.due_at;
            ReviewRow {
                id: r.id,
                partner: r.partner,
                overdue: r.state == "overdue" || due.is_some_and(|d| d <= now),
                state: r.state,
                requested: ts(r.requested_at, tz),
                due: ts_opt(due, tz),
                calendar_missing: r.calendar_missing,
            }
        })
        .collect();
    let overdue_reviews = reviews.iter().filter(|r| r.overdue).count();

    // Claims whose validity ends within 48 hours.
    let claims_total = store::dashboard::expiring_claims_count(db).await?;
    let claims: Vec<ClaimRow> = store::dashboard::expiring_claims(db)
        .await?
        .into_iter()
        .map(|r| {
            let exp = r.expires_at;
            ClaimRow {
                id: r.id,
                partner: r.partner,
                name: mask::name(&r.full_name),
                email: mask::email(&r.email),
                status: r.status,
                expires: ts(exp, tz),
                left: age((exp - now).num_seconds() as f64),
            }
        })
        .collect();

    // Sweeps.
    let stale_after = chrono::Duration::from_std(ctx.cfg.sweep_interval * 3)
        .unwrap_or(chrono::Duration::minutes(3));
    let sweeps: Vec<SweepRow> = store::dashboard::sweep_runs(db)
        .await?
        .into_iter()
        .map(|(name, t, stats)| SweepRow {
            name,
            last: ts(t, tz),
            ago: age((now - t).num_seconds() as f64),
            stale: now - t > stale_after,
            stats: stats
                .and_then(|v| v.as_object().cloned())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
        })
        .collect();
    let newest = sweeps.iter().map(|s| s.last.clone()).max();
    let (last_sweep, sweep_stale) = match sweeps.iter().min_by_key(|s| s.stale) {
        Some(s) => (newest.unwrap_or_default(), s.stale),
        None => ("never".to_string(), true),
    };

    // Calendar.
    let calendar = ctx.calendar().await?;
    let years = calendar.loaded_years();
    let this_year: i32 = now
        .with_timezone(&ctx.cfg.timezone)
        .format("%Y")
        .to_string()
        .parse()
        .unwrap_or(2026);
    let mut calendar_warnings = Vec::new();
    for y in [this_year, this_year + 1] {
        if !years.contains(&y) {
            calendar_warnings.push(format!(
                "No holiday calendar for {y}: working days count weekends only (calendar_missing). Load it with PUT /v1/admin/calendar/{y}."
            ));
        }
    }
    let missing_reviews = reviews.iter().filter(|r| r.calendar_missing).count();
    if missing_reviews > 0 {
        calendar_warnings.push(format!(
            "{missing_reviews} open review(s) have a due time computed without a calendar."
        ));
    }

    let emails = store::dashboard::invitations_by_status(db).await?;
    let flash = q.done.map(|d| match d.as_str() {
        "approved" => "Review approved.".to_string(),
        "rejected" => "Review rejected.".to_string(),
        other => other
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || " .,-()".contains(*c))
            .take(120)
            .collect(),
    });
    let mail = ctx
        .mailer
        .caught_dir()
        .map(|d| caught_mail(d, 10_000).len());
    Ok(Dashboard {
        now: ts(now, tz),
        tz: tz.name().to_string(),
        actor: s.actor(),
        flash,
        overdue_reviews,
        open_reviews: reviews.len(),
        dead_total,
        last_sweep,
        sweep_stale,
        calendar_years: years
            .iter()
            .map(|y| y.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        calendar_warnings,
        queue_error,
        queues,
        retries,
        chart_processed,
        chart_failed,
        chart_latency,
        reviews,
        claims,
        claims_total,
        sweeps,
        emails,
        dead_letters,
        mail,
        csrf: s.csrf.clone(),
    })
}

fn dead_row(d: DeadLetter, tz: Tz) -> DeadRow {
    DeadRow {
        message_id: d.message_id.unwrap_or_default(),
        reason: d
            .reason
            .unwrap_or_else(|| "(broker: delivery limit)".into()),
        error: d.error.unwrap_or_default(),
        failed_at: d
            .failed_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| ts(t.with_timezone(&Utc), tz))
            .unwrap_or_else(|| "—".into()),
        retries: d.retries.unwrap_or(0),
        routing_key: d.routing_key.unwrap_or_default(),
        body: mask_body(&d.body),
        headers: d
            .headers
            .into_iter()
            .map(|(k, v)| {
                // Times in the operator's zone; error texts may quote a
                // payload, so they are masked like bodies.
                let v = match DateTime::parse_from_rfc3339(&v) {
                    Ok(t) => ts(t.with_timezone(&Utc), tz),
                    Err(_) => mask::text(&v),
                };
                (k, v)
            })
            .collect(),
    }
}

// ----------------------------------------------------------------- actions

#[derive(Deserialize)]
pub struct DecisionForm {
    csrf: String,
    decision: String,
    #[serde(default)]
    note: String,
}

/// `POST /admin/reviews/{id}/decision`: approve or reject from the dashboard.
pub async fn decide(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<DecisionForm>,
) -> Response {
    let s = match form_session(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(answer) => return answer,
    };
    let Ok(id) = Uuid::parse_str(&id) else {
        return (StatusCode::NOT_FOUND, "no such review").into_response();
    };
    let approve = match f.decision.as_str() {
        "approve" => true,
        "reject" => false,
        _ => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                "decision: approve or reject",
            )
                .into_response()
        }
    };
    let note = Some(f.note.trim()).filter(|n| !n.is_empty());
    if !approve && note.is_none() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            "a rejection needs a note for the partner; go back and write one",
        )
            .into_response();
    }
    match super::admin::apply_decision(&st, &s.actor(), id, approve, note).await {
        Ok(_) => Redirect::to(&format!(
            "/admin?done={}",
            if approve { "approved" } else { "rejected" }
        ))
        .into_response(),
        Err(e) => (e.status, e.message).into_response(),
    }
}

#[derive(Deserialize)]
pub struct DeadLetterForm {
    csrf: String,
    /// One dead letter's message id; absent or empty: every dead letter.
    #[serde(default)]
    message_id: String,
}

/// Records an operator's dead-letter action in the audit log.
/// Audits a dead-letter operation and sends the operator back to the
/// dashboard saying `done` (already URL-encoded).
async fn audited_done(
    st: &AppState,
    s: &Session,
    action: &str,
    q: Queue,
    details: Value,
    done: &str,
) -> Response {
    audit_dead_letters(st, s, action, q, details).await;
    Redirect::to(&format!("/admin?done={done}")).into_response()
}

async fn audit_dead_letters(st: &AppState, s: &Session, action: &str, q: Queue, details: Value) {
    if let Ok(mut conn) = st.ctx.db.acquire().await {
        let _ = crate::store::audit(
            &mut conn,
            &s.actor(),
            action,
            Some(q.short()),
            Some(details),
        )
        .await;
    }
}

fn dead_letter_failed(what: &str, e: anyhow::Error) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{what} failed (RabbitMQ): {e}"),
    )
        .into_response()
}

/// `POST /admin/dead-letters/{queue}/replay`: replay one dead letter of a
/// queue (`message_id`), or every one.
pub async fn replay(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Form(f): Form<DeadLetterForm>,
) -> Response {
    let s = match form_session(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(answer) => return answer,
    };
    let Some(q) = Queue::parse(&queue) else {
        return (StatusCode::NOT_FOUND, "no such queue").into_response();
    };
    let one = f.message_id.trim();
    if !one.is_empty() {
        return match dead_letters::replay_one(&st.ctx.broker, q, one).await {
            Ok(true) => {
                let done = format!("Replayed+one+message+of+{}.#dlq", q.short());
                audited_done(
                    &st,
                    &s,
                    "dead_letters.replayed",
                    q,
                    serde_json::json!({"count": 1, "message_id": one}),
                    &done,
                )
                .await
            }
            Ok(false) => gone(q),
            Err(e) => dead_letter_failed("replay", e),
        };
    }
    match dead_letters::replay(&st.ctx.broker, q, 10_000).await {
        Ok(n) => {
            let done = format!("Replayed+{n}+message(s)+of+{}.", q.short());
            audited_done(
                &st,
                &s,
                "dead_letters.replayed",
                q,
                serde_json::json!({"count": n}),
                &done,
            )
            .await
        }
        Err(e) => dead_letter_failed("replay", e),
    }
}

/// The dead letter was no longer there (replayed or discarded meanwhile).
fn gone(q: Queue) -> Response {
    Redirect::to(&format!(
        "/admin?done=That+message+is+no+longer+among+the+dead+letters+of+{}.#dlq",
        q.short()
    ))
    .into_response()
}

/// `POST /admin/dead-letters/{queue}/discard`: delete one dead letter for good.
pub async fn discard(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(queue): Path<String>,
    Form(f): Form<DeadLetterForm>,
) -> Response {
    let Some(s) = session(&st, &headers).await else {
        return to_login();
    };
    if !s.csrf_ok(&f.csrf) {
        return stale_form();
    }
    let Some(q) = Queue::parse(&queue) else {
        return (StatusCode::NOT_FOUND, "no such queue").into_response();
    };
    let one = f.message_id.trim();
    if one.is_empty() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            "message_id: which dead letter to discard",
        )
            .into_response();
    }
    match dead_letters::discard_one(&st.ctx.broker, q, one).await {
        Ok(true) => {
            let done = format!("Discarded+one+message+of+{}.#dlq", q.short());
            audited_done(
                &st,
                &s,
                "dead_letters.discarded",
                q,
                serde_json::json!({"count": 1, "message_id": one}),
                &done,
            )
            .await
        }
        Ok(false) => gone(q),
        Err(e) => dead_letter_failed("discard", e),
    }
}

/// One caught message (development: lettre's file transport).
pub struct CaughtMail {
    pub id: String,
    pub at: String,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Reads `<id>.eml` from the caught-mail directory; headers only unless `body`.
fn read_caught(dir: &std::path::Path, id: &str, body: bool) -> Option<CaughtMail> {
    let uuid = uuid::Uuid::parse_str(id).ok()?;
    let path = dir.join(format!("{}.eml", uuid.hyphenated()));
    let raw = std::fs::read(&path).ok()?;
    let at = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .map(chrono::DateTime::<Utc>::from);
    let parsed = mailparse::parse_mail(&raw).ok()?;
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.get_key_ref().eq_ignore_ascii_case(name))
            .map(|h| h.get_value())
            .unwrap_or_default()
    };
    let (mut text, mut html) = (String::new(), String::new());
    if body {
        let mut parts = vec![&parsed];
        while let Some(p) = parts.pop() {
            match p.ctype.mimetype.as_str() {
                "text/plain" if text.is_empty() => text = p.get_body().unwrap_or_default(),
                "text/html" if html.is_empty() => html = p.get_body().unwrap_or_default(),
                _ => parts.extend(p.subparts.iter()),
            }
        }
    }
    Some(CaughtMail {
        id: uuid.hyphenated().to_string(),
        at: at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        to: header("To"),
        subject: header("Subject"),
        text,
        html,
    })
}

/// The newest caught messages, newest first.
pub fn caught_mail(dir: &std::path::Path, limit: usize) -> Vec<CaughtMail> {
    let mut files: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    let id = name.strip_suffix(".eml")?.to_string();
                    let at = e.metadata().and_then(|m| m.modified()).ok()?;
                    Some((at, id))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    files
        .into_iter()
        .take(limit)
        .filter_map(|(_, id)| read_caught(dir, &id, false))
        .collect()
}

#[derive(Template)]
#[template(path = "mail.html")]
struct MailPage {
    dir: String,
    items: Vec<CaughtMail>,
    open: Option<CaughtMail>,
}

/// `GET /admin/mail` and `GET /admin/mail/{id}`: caught email (development).
pub async fn mail_list(State(st): State<AppState>, headers: HeaderMap) -> Response {
    mail_page(st, headers, None).await
}

pub async fn mail_one(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    mail_page(st, headers, Some(id)).await
}

async fn mail_page(st: AppState, headers: HeaderMap, id: Option<String>) -> Response {
    let Some(s) = session(&st, &headers).await else {
        return to_login();
    };
    // One timestamp format, in the operator's zone, as on the dashboard.
    let local = |mut m: CaughtMail| {
        if let Ok(t) = DateTime::parse_from_rfc3339(&m.at) {
            m.at = ts(t.with_timezone(&Utc), s.tz);
        }
        m
    };
    let Some(dir) = st.ctx.mailer.caught_dir() else {
        return (
            StatusCode::NOT_FOUND,
            "email is sent through PREREG_SMTP_URL, not caught here (prereg dev catches it)",
        )
            .into_response();
    };
    let open = match id {
        Some(id) => match read_caught(dir, &id, true) {
            Some(m) => Some(local(m)),
            None => return (StatusCode::NOT_FOUND, "no such caught message").into_response(),
        },
        None => None,
    };
    page(
        StatusCode::OK,
        &MailPage {
            dir: dir.display().to_string(),
            items: caught_mail(dir, 200).into_iter().map(local).collect(),
            open,
        },
    )
}
