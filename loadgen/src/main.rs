//! `prereg-loadgen`: a load generator against a running intake (run by
//! `scripts/bench.sh`). It is its own binary so that its HTTP client is not a
//! dependency of `prereg`.
//!
//! It creates M partners through the operator API, sends N pre-registrations
//! to `POST /v1/preregistrations` over C concurrent connections (a share of
//! them reuse the email or mobile of an earlier customer, from the same
//! partner or another), optionally on a fixed-rate schedule, then polls
//! Postgres until every accepted pre-registration has left `queued`.
//!
//! It reports intake throughput and latency, end-to-end decisions per second,
//! the decisions by status and reason code, and the peak RSS (VmHWM) and CPU
//! time of the processes named with `--intake-pid` / `--worker-pid`, the CPU
//! time of RabbitMQ, Postgres and Redis (from `/proc`), CPU-seconds per 1,000
//! decisions for each, and the per-stage timings of the services (the
//! `prereg_stage_seconds` histograms scraped from `--metrics-url` before and
//! after).
//!
//! Postgres is only read: to poll for completion and to count the decisions.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Parser};
use futures::{StreamExt, TryStreamExt};
use prereg::Config;
use rand::{rngs::StdRng, Rng, SeedableRng};
use reqwest::{
    header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE},
    StatusCode,
};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "prereg-loadgen",
    about = "Load generator against a running prereg intake"
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(cfg, cli.args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Base URL of the intake.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Operator bearer token, to create the partners (default: PREREG_OPERATOR_TOKEN).
    #[arg(long)]
    operator_token: Option<String>,
    /// Pre-registrations to send.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    requests: u64,
    /// Partners to create and send from.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    partners: u64,
    /// Requests in flight at once (one connection each).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Requests per second on a fixed schedule; 0 sends as fast as possible.
    /// With a rate, latency runs from the scheduled send time (no coordinated omission).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    rate: f64,
    /// Share of requests that reuse the email and/or mobile of an earlier
    /// customer, half from the same partner, half from another.
    #[arg(long, default_value_t = 0.1, value_parser = parse_ratio)]
    duplicate_ratio: f64,
    /// Pid(s) of the intake process(es), comma-separated: peak RSS and CPU time.
    #[arg(long, value_delimiter = ',')]
    intake_pid: Vec<u32>,
    /// Pid(s) of the worker process(es), comma-separated: peak RSS and CPU time.
    #[arg(long, value_delimiter = ',')]
    worker_pid: Vec<u32>,
    /// How long to wait after the last response for every pre-registration
    /// to be decided: `600` (seconds), `90s`, `10m`.
    #[arg(long, default_value = "600s", value_parser = parse_timeout)]
    timeout: Duration,
    /// Seed of the request plan (the same seed gives the same mix of partners and duplicates).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Prometheus endpoints of the services (comma-separated), scraped before
    /// and after for the per-stage timings.
    #[arg(long, value_delimiter = ',')]
    metrics_url: Vec<String>,
    /// Also print the summary as one line of JSON (the last line of stdout).
    #[arg(long)]
    json: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("`{s}`: requests per second, 0 or more")),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}`: a fraction from 0 to below 1, e.g. 0.1")),
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => prereg::config::parse_duration(s),
    }
}

/// How often the drain phase counts what is still queued.
const POLL: Duration = Duration::from_millis(100);
/// Per-request limit; a request that takes longer counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Linux reports process CPU times in USER_HZ ticks, 100 per second.
const USER_HZ: f64 = 100.0;

pub async fn run(cfg: Config, args: BenchArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/').to_string();
    let token = args
        .operator_token
        .clone()
        .or_else(|| cfg.operator_token.clone())
        .context("an operator token is needed to create the partners: --operator-token or PREREG_OPERATOR_TOKEN")?;
    let n = args.requests as usize;
    let m = args.partners as usize;
    let concurrency = args.concurrency as usize;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")?;

    // Fail before sending anything when the intake or Postgres is not there.
    check_ready(&client, &base).await?;
    let db = prereg::store::connect(&cfg.database_url, 2).context("PREREG_DATABASE_URL")?;
    sqlx::query("SELECT 1")
        .execute(&db)
        .await
        .context("cannot reach Postgres at PREREG_DATABASE_URL (the intake's database)")?;

    let run_id = format!("{:08x}", rand::random::<u32>());
    let mobile_base = rand::random::<u64>() % 100_000_000;
    let plan = Arc::new(make_plan(
        n,
        m,
        args.duplicate_ratio,
        args.seed,
        &run_id,
        mobile_base,
    )?);

    eprintln!("bench: creating {m} partners at {base}");
    let partners = create_partners(&client, &base, &token, m, &run_id).await?;
    let partner_ids: Vec<Uuid> = partners.iter().map(|p| p.0).collect();
    let auth = Arc::new(
        partners
            .iter()
            .map(|(_, key)| {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
                    .context("the API key is not a header value")?;
                v.set_sensitive(true);
                Ok(v)
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    );

    let pids = watched_pids(&args);
    let cpu_before: Vec<Option<f64>> = pids.iter().map(|(_, pid)| cpu_seconds(pid).ok()).collect();
    let infra_before = infra_cpu();
    let stages_before = scrape_stages(&client, &args.metrics_url).await;

    // ---- send phase
    eprintln!(
        "bench: sending {n} pre-registrations, concurrency {concurrency}, {}",
        rate_label(args.rate)
    );
    let endpoint = format!("{base}/v1/preregistrations");
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let w = Sender {
            client: client.clone(),
            endpoint: endpoint.clone(),
            plan: plan.clone(),
            auth: auth.clone(),
            next: next.clone(),
            done: done.clone(),
            failed: failed.clone(),
            start,
            rate: args.rate,
        };
        workers.spawn(w.run());
    }
    let progress = {
        let (done, failed) = (done.clone(), failed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                Instant::now() + Duration::from_secs(5),
                Duration::from_secs(5),
            );
            loop {
                tick.tick().await;
                eprintln!(
                    "bench: {}/{n} answered, {} not accepted, {:.0} s",
                    done.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed),
                    start.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut out = SendOutcome::default();
    while let Some(joined) = workers.join_next().await {
        out.merge(joined.context("a sender task failed")?);
    }
    let send_elapsed = out
        .last_answer
        .map(|t| t - start)
        .unwrap_or_else(|| start.elapsed());
    progress.abort();
    out.latency_us.sort_unstable();
    out.service_us.sort_unstable();
    let accepted: u64 = out.accepted_by_kind.values().sum();

    // ---- drain phase: until nothing of ours is queued
    let (total_rows, _) = count_rows(&db, &partner_ids).await?;
    if accepted > 0 && total_rows == 0 {
        bail!(
            "the intake accepted {accepted} pre-registrations but the database at PREREG_DATABASE_URL holds none of them: \
             point PREREG_DATABASE_URL at the intake's database"
        );
    }
    if total_rows != accepted as i64 {
        eprintln!("bench: warning: {accepted} accepted but {total_rows} rows found for the bench partners");
    }
    eprintln!(
        "bench: sent in {:.2} s; waiting for the decisions",
        send_elapsed.as_secs_f64()
    );
    let drain = drain(&db, &partner_ids, args.timeout).await?;
    let e2e = drain.finished.map(|t| t - start);

    // ---- what was decided
    let decisions: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "SELECT status, reason_code, count(*) FROM preregistrations WHERE partner_id = ANY($1)
         GROUP BY status, reason_code ORDER BY count(*) DESC, status, reason_code",
    )
    .bind(&partner_ids)
    .fetch_all(&db)
    .await
    .context("counting the decisions")?;
    let db_span: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(decided_at) - min(created_at))::float8
         FROM preregistrations WHERE partner_id = ANY($1)",
    )
    .bind(&partner_ids)
    .fetch_one(&db)
    .await
    .context("reading the decision span")?;

    let procs: Vec<ProcReport> = pids
        .iter()
        .zip(cpu_before)
        .map(|((role, pid), before)| ProcReport::read(role, pid, before))
        .collect();
    let infra_after = infra_cpu();
    let infra: Vec<(&'static str, f64, u64)> = infra_after
        .iter()
        .filter_map(|(name, after, rss)| {
            let before = infra_before.iter().find(|(n, _, _)| n == name)?.1;
            Some((*name, after - before, *rss))
        })
        .collect();
    let stages = stage_delta(
        &stages_before,
        &scrape_stages(&client, &args.metrics_url).await,
    );

    let report = Report {
        args: &args,
        base: &base,
        run_id: &run_id,
        plan_mix: plan_mix(&plan),
        out: &out,
        accepted,
        send_elapsed,
        e2e,
        left: drain.left,
        db_span,
        decisions,
        procs,
        infra,
        stages,
    };
    print!("{}", report.text());
    if args.json {
        println!("{}", report.json());
    }

    if drain.left > 0 {
        bail!(
            "{} pre-registrations were still queued {} s after the last response",
            drain.left,
            args.timeout.as_secs()
        );
    }
    let not_accepted = out.not_accepted();
    if not_accepted > 0 {
        bail!("{not_accepted} of {n} requests were not answered 202");
    }
    Ok(())
}

async fn check_ready(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let resp = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .with_context(|| format!("cannot reach the intake at {base}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        bail!(
            "the intake at {base} is not ready ({status}): {}",
            truncate(&body, 300)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- the plan

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A customer not seen before.
    New,
    /// Reuses an earlier customer's email and/or mobile, same partner.
    DupSamePartner,
    /// Reuses an earlier customer's email and/or mobile, another partner.
    DupOtherPartner,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::New => "new",
            Kind::DupSamePartner => "duplicate_same_partner",
            Kind::DupOtherPartner => "duplicate_other_partner",
        }
    }
}

struct Planned {
    partner: usize,
    kind: Kind,
    body: Bytes,
}

/// The requests to send, decided up front (seeded) so the send loop does no
/// work but HTTP. Emails carry the run id and mobiles start at a random
/// offset, so two runs against one database do not collide.
fn make_plan(
    n: usize,
    partners: usize,
    dup_ratio: f64,
    seed: u64,
    run_id: &str,
    mobile_base: u64,
) -> anyhow::Result<Vec<Planned>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut serial: u64 = 0;
    let mut fresh = || {
        serial += 1;
        serial
    };
    let email = |s: u64| format!("c{s}.{run_id}@bench.example.com");
    let mobile = |s: u64| format!("+86138{:08}", (mobile_base + s) % 100_000_000);
    // (partner, email, mobile) of each customer sent as new.
    let mut originals: Vec<(usize, String, String)> = Vec::new();
    let mut plan = Vec::with_capacity(n);
    for _ in 0..n {
        let duplicate = !originals.is_empty() && rng.gen_bool(dup_ratio);
        let (partner, kind, name, em, mo) = if duplicate {
            let (orig_partner, orig_email, orig_mobile) =
                &originals[rng.gen_range(0..originals.len())];
            let same = partners == 1 || rng.gen_bool(0.5);
            let partner = if same {
                *orig_partner
            } else {
                (orig_partner + rng.gen_range(1..partners)) % partners
            };
            let kind = if same {
                Kind::DupSamePartner
            } else {
                Kind::DupOtherPartner
            };
            let s = fresh();
            // Half of the reused emails differ in case: the same customer once normalised.
            let reused_email = if rng.gen_bool(0.5) {
                orig_email.to_ascii_uppercase()
            } else {
                orig_email.clone()
            };
            let (em, mo) = match rng.gen_range(0..3) {
                0 => (reused_email, orig_mobile.clone()),
                1 => (reused_email, mobile(s)),
                _ => (email(s), orig_mobile.clone()),
            };
            (partner, kind, format!("Bench Customer {s}"), em, mo)
        } else {
            let s = fresh();
            let partner = rng.gen_range(0..partners);
            originals.push((partner, email(s), mobile(s)));
            (
                partner,
                Kind::New,
                format!("Bench Customer {s}"),
                email(s),
                mobile(s),
            )
        };
        let body = serde_json::to_vec(&json!({"full_name": name, "email": em, "mobile": mo}))?;
        plan.push(Planned {
            partner,
            kind,
            body: Bytes::from(body),
        });
    }
    Ok(plan)
}

fn plan_mix(plan: &[Planned]) -> BTreeMap<Kind, u64> {
    let mut mix = BTreeMap::new();
    for p in plan {
        *mix.entry(p.kind).or_insert(0) += 1;
    }
    mix
}

async fn create_partners(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    m: usize,
    run_id: &str,
) -> anyhow::Result<Vec<(Uuid, String)>> {
    let url = format!("{base}/v1/admin/partners");
    futures::stream::iter(0..m)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            let body = json!({
                "name": format!("Bench partner {i} ({run_id})"),
                "country": "CN",
                "contact_email": format!("partner{i}.{run_id}@bench.example.com"),
                "customer_development": true,
            });
            async move {
                let resp = client
                    .post(&url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .with_context(|| format!("POST {url}"))?;
                let status = resp.status();
                let text = resp
                    .text()
                    .await
                    .with_context(|| format!("POST {url}: reading the answer"))?;
                if status != StatusCode::CREATED {
                    bail!(
                        "creating a partner: POST {url} answered {status}: {}",
                        truncate(&text, 300)
                    );
                }
                let v: Value = serde_json::from_str(&text)
                    .context("creating a partner: the answer is not JSON")?;
                let id = v
                    .pointer("/partner/id")
                    .and_then(Value::as_str)
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .context("creating a partner: no partner.id in the answer")?;
                let key = v
                    .get("api_key")
                    .and_then(Value::as_str)
                    .context("creating a partner: no api_key in the answer")?;
                Ok((id, key.to_string()))
            }
        })
        .buffered(8)
        .try_collect()
        .await
}

// ---------------------------------------------------------------- sending

struct Sender {
    client: reqwest::Client,
    endpoint: String,
    plan: Arc<Vec<Planned>>,
    auth: Arc<Vec<HeaderValue>>,
    next: Arc<AtomicUsize>,
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    start: Instant,
    rate: f64,
}

#[derive(Default)]
struct SendOutcome {
    /// From the scheduled send time (with `--rate`) or the actual one, µs.
    latency_us: Vec<u64>,
    /// From the actual send time, µs (differs from latency only with `--rate`).
    service_us: Vec<u64>,
    by_status: BTreeMap<u16, u64>,
    transport_errors: BTreeMap<&'static str, u64>,
    /// The first answer or error seen per status / error kind.
    error_samples: BTreeMap<String, String>,
    accepted_by_kind: BTreeMap<Kind, u64>,
    /// The largest delay of a send behind its schedule (with `--rate`).
    max_lag: Duration,
    last_answer: Option<Instant>,
}

impl SendOutcome {
    fn merge(&mut self, o: SendOutcome) {
        self.latency_us.extend(o.latency_us);
        self.service_us.extend(o.service_us);
        for (k, v) in o.by_status {
            *self.by_status.entry(k).or_default() += v;
        }
        for (k, v) in o.transport_errors {
            *self.transport_errors.entry(k).or_default() += v;
        }
        for (k, v) in o.error_samples {
            self.error_samples.entry(k).or_insert(v);
        }
        for (k, v) in o.accepted_by_kind {
            *self.accepted_by_kind.entry(k).or_default() += v;
        }
        self.max_lag = self.max_lag.max(o.max_lag);
        self.last_answer = self.last_answer.max(o.last_answer);
    }

    fn not_accepted(&self) -> u64 {
        let statuses: u64 = self
            .by_status
            .iter()
            .filter(|(s, _)| **s != StatusCode::ACCEPTED.as_u16())
            .map(|(_, c)| c)
            .sum();
        statuses + self.transport_errors.values().sum::<u64>()
    }
}

impl Sender {
    async fn run(self) -> SendOutcome {
        let mut out = SendOutcome::default();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(p) = self.plan.get(i) else { break };
            let scheduled = (self.rate > 0.0)
                .then(|| self.start + Duration::from_secs_f64(i as f64 / self.rate));
            if let Some(at) = scheduled {
                tokio::time::sleep_until(at).await;
            }
            let sent = Instant::now();
            if let Some(at) = scheduled {
                out.max_lag = out.max_lag.max(sent - at);
            }
            let result = self
                .client
                .post(&self.endpoint)
                .header(AUTHORIZATION, self.auth[p.partner].clone())
                .header(CONTENT_TYPE, "application/json")
                .body(p.body.clone())
                .send()
                .await;
            let accepted = match result {
                Ok(resp) => {
                    let status = resp.status();
                    // Read the whole answer so the connection goes back to the pool.
                    let body = resp.bytes().await;
                    let answered = Instant::now();
                    out.latency_us
                        .push(micros(answered - scheduled.unwrap_or(sent)));
                    out.service_us.push(micros(answered - sent));
                    out.last_answer = Some(answered);
                    *out.by_status.entry(status.as_u16()).or_default() += 1;
                    if status != StatusCode::ACCEPTED {
                        let text = body
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                            .unwrap_or_default();
                        out.error_samples
                            .entry(status.as_u16().to_string())
                            .or_insert_with(|| truncate(&text, 300));
                    }
                    status == StatusCode::ACCEPTED
                }
                Err(e) => {
                    let kind = if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connect"
                    } else {
                        "other"
                    };
                    *out.transport_errors.entry(kind).or_default() += 1;
                    out.error_samples
                        .entry(kind.to_string())
                        .or_insert_with(|| format!("{e:#}"));
                    out.last_answer = Some(Instant::now());
                    false
                }
            };
            if accepted {
                *out.accepted_by_kind.entry(p.kind).or_default() += 1;
            } else {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        out
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------- waiting

/// (all rows, rows still queued) of the bench partners.
async fn count_rows(db: &PgPool, partners: &[Uuid]) -> anyhow::Result<(i64, i64)> {
    let row: (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'queued') FROM preregistrations WHERE partner_id = ANY($1)",
    )
    .bind(partners)
    .fetch_one(db)
    .await
    .context("counting the bench's pre-registrations")?;
    Ok(row)
}

struct Drain {
    /// When the queued count was first seen at 0.
    finished: Option<Instant>,
    /// Still queued at the end (0 when finished).
    left: i64,
}

async fn drain(db: &PgPool, partners: &[Uuid], timeout: Duration) -> anyhow::Result<Drain> {
    let deadline = Instant::now() + timeout;
    let mut last_report = Instant::now();
    let mut failures = 0;
    let mut left = -1;
    loop {
        match count_rows(db, partners).await {
            Ok((_, 0)) => {
                return Ok(Drain {
                    finished: Some(Instant::now()),
                    left: 0,
                })
            }
            Ok((_, queued)) => {
                failures = 0;
                left = queued;
            }
            // A hiccup of Postgres does not end the bench; a lasting outage does.
            Err(e) => {
                failures += 1;
                if failures >= 50 {
                    return Err(e.context("Postgres kept failing while waiting for the decisions"));
                }
            }
        }
        if Instant::now() >= deadline {
            return Ok(Drain {
                finished: None,
                left,
            });
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("bench: {left} still queued");
            last_report = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------- processes

fn watched_pids(args: &BenchArgs) -> Vec<(&'static str, String)> {
    let mut v: Vec<(&'static str, String)> = Vec::new();
    v.extend(args.intake_pid.iter().map(|p| ("intake", p.to_string())));
    v.extend(args.worker_pid.iter().map(|p| ("worker", p.to_string())));
    v.push(("bench", "self".to_string()));
    v
}

struct ProcReport {
    role: &'static str,
    pid: String,
    /// VmHWM and VmRSS in kB, or why they could not be read.
    memory: Result<(u64, u64), String>,
    /// CPU seconds (user + system) spent from the start of sending to now.
    cpu_s: Option<f64>,
}

impl ProcReport {
    fn read(role: &'static str, pid: &str, cpu_before: Option<f64>) -> Self {
        let memory = memory_kb(pid).map_err(|e| format!("{e:#}"));
        let cpu_s = match (cpu_before, cpu_seconds(pid).ok()) {
            (Some(b), Some(a)) => Some(a - b),
            _ => None,
        };
        Self {
            role,
            pid: pid.to_string(),
            memory,
            cpu_s,
        }
    }
}

/// (VmHWM, VmRSS) in kB from /proc/<pid>/status.
fn memory_kb(pid: &str) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// User + system CPU seconds of a process so far, from /proc/<pid>/stat.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: field 3 (state) is index 0, so utime (14) and stime (15) are 11 and 12.
    let tick = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64 / USER_HZ)
            .context("unexpected stat format")
    };
    Ok(tick(11)? + tick(12)?)
}

/// The shared services by process name: (name, CPU seconds so far, RSS kB).
/// Postgres counts every backend plus what exited backends left in the
/// postmaster's children times.
fn infra_cpu() -> Vec<(&'static str, f64, u64)> {
    const SERVICES: [(&str, &str); 3] = [
        ("rabbitmq", "beam.smp"),
        ("postgres", "postgres"),
        ("redis", "redis-server"),
    ];
    let mut out: Vec<(&'static str, f64, u64)> =
        SERVICES.iter().map(|(n, _)| (*n, 0.0, 0)).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let Some(i) = SERVICES.iter().position(|(_, c)| *c == comm.trim()) else {
            continue;
        };
        if let Ok(t) = cpu_seconds_with_children(&pid) {
            out[i].1 += t;
        }
        if let Ok((_, rss)) = memory_kb(&pid) {
            out[i].2 += rss;
        }
    }
    out
}

/// utime + stime + cutime + cstime.
fn cpu_seconds_with_children(pid: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let mut t = 0.0;
    for i in 11..=14 {
        t += f
            .get(i)
            .and_then(|v| v.parse::<i64>().ok())
            .context("stat")? as f64
            / USER_HZ;
    }
    Ok(t)
}

/// One `prereg_stage_seconds` series: sum, count and cumulative buckets.
#[derive(Debug, Default, Clone)]
struct Stage {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl Stage {
    fn mean_ms(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum / self.count as f64 * 1000.0
    }

    /// The upper bound of the bucket holding the 99th percentile (seconds).
    fn p99_le(&self) -> Option<f64> {
        let want = (self.count as f64 * 0.99).ceil() as u64;
        let mut b = self.buckets.clone();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b.iter().find(|(_, c)| *c >= want).map(|(le, _)| *le)
    }

    fn p99_label(&self) -> String {
        match self.p99_le() {
            Some(le) if le.is_finite() => format!("{:.1} ms", le * 1000.0),
            _ => "+Inf".into(),
        }
    }
}

/// Scrapes every endpoint and adds up the stage series by stage name.
async fn scrape_stages(client: &reqwest::Client, urls: &[String]) -> BTreeMap<String, Stage> {
    let mut out: BTreeMap<String, Stage> = BTreeMap::new();
    for url in urls {
        let text = match client.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => {
                eprintln!("bench: cannot scrape {url}: {e}");
                continue;
            }
        };
        parse_stages(&text, &mut out);
    }
    out
}

fn parse_stages(text: &str, out: &mut BTreeMap<String, Stage>) {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("prereg_stage_seconds_") else {
            continue;
        };
        let Some((head, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| -> Option<String> {
            let key = format!("{name}=\"");
            let start = head.find(&key)? + key.len();
            let end = head[start..].find('"')? + start;
            Some(head[start..end].to_string())
        };
        let Some(stage) = label("stage") else {
            continue;
        };
        let st = out.entry(stage).or_default();
        if head.starts_with("sum") {
            st.sum += v;
        } else if head.starts_with("count") {
            st.count += v as u64;
        } else if head.starts_with("bucket") {
            let le = match label("le").as_deref() {
                Some("+Inf") => f64::INFINITY,
                Some(x) => x.parse().unwrap_or(f64::INFINITY),
                None => continue,
            };
            match st.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some(b) => b.1 += v as u64,
                None => st.buckets.push((le, v as u64)),
            }
        }
    }
}

/// What happened between two scrapes.
fn stage_delta(
    before: &BTreeMap<String, Stage>,
    after: &BTreeMap<String, Stage>,
) -> BTreeMap<String, Stage> {
    after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k).cloned().unwrap_or_default();
            let buckets = a
                .buckets
                .iter()
                .map(|(le, c)| {
                    let prev = b.buckets.iter().find(|(l, _)| l == le).map_or(0, |x| x.1);
                    (*le, c.saturating_sub(prev))
                })
                .collect();
            (
                k.clone(),
                Stage {
                    sum: a.sum - b.sum,
                    count: a.count.saturating_sub(b.count),
                    buckets,
                },
            )
        })
        .filter(|(_, s)| s.count > 0)
        .collect()
}

// ---------------------------------------------------------------- report

struct Report<'a> {
    args: &'a BenchArgs,
    base: &'a str,
    run_id: &'a str,
    plan_mix: BTreeMap<Kind, u64>,
    out: &'a SendOutcome,
    accepted: u64,
    send_elapsed: Duration,
    e2e: Option<Duration>,
    left: i64,
    db_span: Option<f64>,
    decisions: Vec<(String, Option<String>, i64)>,
    procs: Vec<ProcReport>,
    /// (name, CPU seconds during the run, RSS kB now) of the shared services.
    infra: Vec<(&'static str, f64, u64)>,
    stages: BTreeMap<String, Stage>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn rate_label(rate: f64) -> String {
    if rate > 0.0 {
        format!("fixed rate {rate} req/s")
    } else {
        "as fast as possible".to_string()
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut t: String = s.chars().take(max).collect();
    if s.chars().count() > max {
        t.push('…');
    }
    t
}

impl Report<'_> {
    /// Accepted (202) requests per second of the send phase: a request
    /// answered with an error is not intake throughput.
    fn throughput(&self) -> f64 {
        self.accepted as f64 / self.send_elapsed.as_secs_f64().max(1e-9)
    }

    /// CPU seconds per 1,000 decisions.
    fn per_thousand(&self, cpu_s: f64) -> Option<f64> {
        (self.accepted > 0).then(|| cpu_s * 1000.0 / self.accepted as f64)
    }

    fn decisions_per_s(&self) -> Option<f64> {
        self.e2e
            .map(|d| self.accepted as f64 / d.as_secs_f64().max(1e-9))
    }

    fn latency(sorted: &[u64]) -> Value {
        json!({
            "p50": ms(percentile(sorted, 50.0)),
            "p90": ms(percentile(sorted, 90.0)),
            "p99": ms(percentile(sorted, 99.0)),
            "max": ms(sorted.last().copied().unwrap_or(0)),
        })
    }

    fn latency_line(sorted: &[u64]) -> String {
        format!(
            "p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
            ms(percentile(sorted, 50.0)),
            ms(percentile(sorted, 90.0)),
            ms(percentile(sorted, 99.0)),
            ms(sorted.last().copied().unwrap_or(0))
        )
    }

    fn text(&self) -> String {
        use std::fmt::Write;
        let a = self.args;
        let o = self.out;
        let mut s = String::new();
        let mix = |k: Kind| self.plan_mix.get(&k).copied().unwrap_or(0);
        let _ = writeln!(
            s,
            "\n== prereg bench (run {}, seed {}) ==",
            self.run_id, a.seed
        );
        let _ = writeln!(s, "target            {}", self.base);
        let _ = writeln!(
            s,
            "load              {} requests from {} partners, concurrency {}, {}",
            a.requests,
            a.partners,
            a.concurrency,
            rate_label(a.rate)
        );
        let _ = writeln!(
            s,
            "mix               {} new customers, {} duplicates from the same partner, {} from another (ratio {})",
            mix(Kind::New),
            mix(Kind::DupSamePartner),
            mix(Kind::DupOtherPartner),
            a.duplicate_ratio
        );
        let _ = writeln!(s, "\nintake");
        let _ = writeln!(
            s,
            "  answers         {} accepted (202), {} not accepted",
            self.accepted,
            o.not_accepted()
        );
        for (status, count) in o.by_status.iter().filter(|(st, _)| **st != 202) {
            let _ = writeln!(s, "    HTTP {status}: {count}");
        }
        for (kind, count) in &o.transport_errors {
            let _ = writeln!(s, "    {kind} error: {count}");
        }
        for (key, sample) in &o.error_samples {
            let _ = writeln!(s, "    first {key}: {sample}");
        }
        let _ = writeln!(
            s,
            "  send phase      {:.3} s",
            self.send_elapsed.as_secs_f64()
        );
        let _ = writeln!(s, "  throughput      {:.1} req/s", self.throughput());
        if a.rate > 0.0 {
            let _ = writeln!(
                s,
                "  latency (ms)    {}   (from the scheduled send time)",
                Self::latency_line(&o.latency_us)
            );
            let _ = writeln!(
                s,
                "  service (ms)    {}   (from the actual send time)",
                Self::latency_line(&o.service_us)
            );
            let _ = writeln!(
                s,
                "  max send lag    {:.2} ms behind schedule",
                o.max_lag.as_secs_f64() * 1000.0
            );
        } else {
            let _ = writeln!(s, "  latency (ms)    {}", Self::latency_line(&o.latency_us));
        }
        let _ = writeln!(
            s,
            "\nend to end (first request until none is queued, polled every {} ms)",
            POLL.as_millis()
        );
        match (self.e2e, self.decisions_per_s()) {
            (Some(d), Some(r)) => {
                let _ = writeln!(s, "  all decided in  {:.3} s", d.as_secs_f64());
                let _ = writeln!(s, "  decisions/s     {r:.1}");
            }
            _ => {
                let _ = writeln!(
                    s,
                    "  NOT FINISHED    {} still queued {} s after the last response",
                    self.left,
                    a.timeout.as_secs()
                );
            }
        }
        if let Some(span) = self.db_span {
            let _ = writeln!(
                s,
                "  db span         {span:.3} s (first created_at to last decided_at)"
            );
        }
        let _ = writeln!(s, "\ndecisions (status, reason_code)");
        for (status, reason, count) in &self.decisions {
            let _ = writeln!(
                s,
                "  {:<15} {:<40} {count:>8}",
                status,
                reason.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(
            s,
            "\nprocesses (peak = VmHWM; cpu = user+system seconds since sending began)"
        );
        let mut peaks: BTreeMap<&str, u64> = BTreeMap::new();
        for p in &self.procs {
            let cpu = p
                .cpu_s
                .map(|c| format!("{c:.2} s"))
                .unwrap_or_else(|| "?".into());
            match &p.memory {
                Ok((hwm, rss)) => {
                    *peaks.entry(p.role).or_default() += hwm;
                    let _ = writeln!(
                        s,
                        "  {:<6} pid {:<8} peak {:>8.1} MiB   now {:>8.1} MiB   cpu {cpu}",
                        p.role,
                        p.pid,
                        mib(*hwm),
                        mib(*rss)
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "  {:<6} pid {:<8} unavailable: {e}", p.role, p.pid);
                }
            }
        }
        let _ = writeln!(
            s,
            "\ncpu-seconds per 1,000 decisions (user+system, since sending began)"
        );
        for p in &self.procs {
            if let Some(k) = p.cpu_s.and_then(|c| self.per_thousand(c)) {
                let _ = writeln!(s, "  {:<10} {k:>8.3}", p.role);
            }
        }
        for (name, cpu, rss) in &self.infra {
            if let Some(k) = self.per_thousand(*cpu) {
                let _ = writeln!(
                    s,
                    "  {name:<10} {k:>8.3}   ({cpu:.2} s; rss now {:.1} MiB)",
                    mib(*rss)
                );
            }
        }
        if !self.stages.is_empty() {
            let _ = writeln!(
                s,
                "\nstages (prereg_stage_seconds during the run: count, mean, p99 bucket bound)"
            );
            for (name, st) in &self.stages {
                let _ = writeln!(
                    s,
                    "  {name:<22} {:>9}  mean {:>8.3} ms  p99 <= {}",
                    st.count,
                    st.mean_ms(),
                    st.p99_label()
                );
            }
        }
        for (role, count) in [
            ("intake", a.intake_pid.len()),
            ("worker", a.worker_pid.len()),
        ] {
            if count > 1 {
                let _ = writeln!(
                    s,
                    "  {role} total of peaks {:.1} MiB over {count} processes",
                    mib(peaks.get(role).copied().unwrap_or(0))
                );
            }
        }
        s
    }

    fn json(&self) -> Value {
        let a = self.args;
        let o = self.out;
        let procs: Vec<Value> = self
            .procs
            .iter()
            .map(|p| match &p.memory {
                Ok((hwm, rss)) => json!({"role": p.role, "pid": p.pid, "peak_rss_kb": hwm, "rss_kb": rss, "cpu_s": p.cpu_s}),
                Err(e) => json!({"role": p.role, "pid": p.pid, "error": e, "cpu_s": p.cpu_s}),
            })
            .collect();
        let peak = |role: &str| -> u64 {
            self.procs
                .iter()
                .filter(|p| p.role == role)
                .filter_map(|p| p.memory.as_ref().ok().map(|m| m.0))
                .sum()
        };
        json!({
            "run_id": self.run_id,
            "url": self.base,
            "requests": a.requests,
            "partners": a.partners,
            "concurrency": a.concurrency,
            "rate": a.rate,
            "duplicate_ratio": a.duplicate_ratio,
            "seed": a.seed,
            "mix": self.plan_mix.iter().map(|(k, v)| (k.label().to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "accepted": self.accepted,
            "not_accepted": o.not_accepted(),
            "status_counts": o.by_status.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "transport_errors": o.transport_errors,
            "send_seconds": self.send_elapsed.as_secs_f64(),
            "intake_rps": self.throughput(),
            "latency_ms": Self::latency(&o.latency_us),
            "service_ms": Self::latency(&o.service_us),
            "max_send_lag_ms": o.max_lag.as_secs_f64() * 1000.0,
            "e2e_seconds": self.e2e.map(|d| d.as_secs_f64()),
            "decisions_per_s": self.decisions_per_s(),
            "still_queued": self.left,
            "db_span_seconds": self.db_span,
            "decisions": self.decisions.iter().map(|(st, r, c)| json!({"status": st, "reason_code": r, "count": c})).collect::<Vec<_>>(),
            "processes": procs,
            "cpu_s_per_1000_decisions": self.procs.iter().filter_map(|p| Some((p.role.to_string(), json!(self.per_thousand(p.cpu_s?)))))
                .chain(self.infra.iter().map(|(n, c, _)| (n.to_string(), json!(self.per_thousand(*c)))))
                .collect::<serde_json::Map<_, _>>(),
            "stages": self.stages.iter().map(|(k, st)| (k.clone(), json!({"count": st.count, "mean_ms": st.mean_ms(), "p99_le": st.p99_le()}))).collect::<serde_json::Map<_, _>>(),
            "peak_rss_kb": {"intake": peak("intake"), "worker": peak("worker")},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn plan_is_seeded_and_mixed() {
        let a = make_plan(2000, 5, 0.2, 7, "r", 0).expect("plan");
        let b = make_plan(2000, 5, 0.2, 7, "r", 0).expect("plan");
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.body == y.body && x.partner == y.partner));
        let mix = plan_mix(&a);
        let dups = mix.get(&Kind::DupSamePartner).copied().unwrap_or(0)
            + mix.get(&Kind::DupOtherPartner).copied().unwrap_or(0);
        assert!((300..500).contains(&dups), "{dups}");
        for p in &a {
            let v: Value = serde_json::from_slice(&p.body).expect("json");
            let m = v["mobile"].as_str().expect("mobile");
            assert!(m.starts_with("+86138") && m.len() == 14, "{m}");
            assert!(p.partner < 5);
        }
        // New customers never share an email or a mobile.
        let news: Vec<Value> = a
            .iter()
            .filter(|p| p.kind == Kind::New)
            .map(|p| serde_json::from_slice(&p.body).expect("json"))
            .collect();
        let emails: std::collections::HashSet<_> =
            news.iter().map(|v| v["email"].to_string()).collect();
        let mobiles: std::collections::HashSet<_> =
            news.iter().map(|v| v["mobile"].to_string()).collect();
        assert_eq!(emails.len(), news.len());
        assert_eq!(mobiles.len(), news.len());
    }

    #[test]
    fn timeouts_and_ratios() {
        assert_eq!(parse_timeout("600").ok(), Some(Duration::from_secs(600)));
        assert_eq!(parse_timeout("10m").ok(), Some(Duration::from_secs(600)));
        assert!(parse_ratio("1").is_err());
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("NaN").is_err());
    }

    #[test]
    fn stages_are_parsed_and_subtracted() {
        let mut before = BTreeMap::new();
        parse_stages(
            "prereg_stage_seconds_bucket{stage=\"commit\",le=\"0.001\"} 1\nprereg_stage_seconds_bucket{stage=\"commit\",le=\"+Inf\"} 2\nprereg_stage_seconds_sum{stage=\"commit\"} 0.5\nprereg_stage_seconds_count{stage=\"commit\"} 2\n",
            &mut before,
        );
        let mut after = BTreeMap::new();
        parse_stages(
            "# TYPE x\nprereg_stage_seconds_bucket{stage=\"commit\",le=\"0.001\"} 100\nprereg_stage_seconds_bucket{stage=\"commit\",le=\"+Inf\"} 102\nprereg_stage_seconds_sum{stage=\"commit\"} 0.6\nprereg_stage_seconds_count{stage=\"commit\"} 102\n",
            &mut after,
        );
        let d = stage_delta(&before, &after);
        let c = &d["commit"];
        assert_eq!(c.count, 100);
        assert!((c.mean_ms() - 1.0).abs() < 1e-6);
        assert_eq!(c.p99_le(), Some(0.001));
    }

    #[test]
    fn proc_files_of_self() {
        let (hwm, rss) = memory_kb("self").expect("status");
        assert!(hwm >= rss && rss > 0);
        assert!(cpu_seconds("self").expect("stat") >= 0.0);
    }
}
