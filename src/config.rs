//! Configuration from environment variables (a `.env` file is read when present),
//! with defaults for a local setup. Every duration is configurable so tests and
//! staging can run the whole life cycle in seconds.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use chrono_tz::Tz;
use thiserror::Error;

#[derive(Debug, Error)]
#[error("configuration: {var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

/// How long a manual review may stay undecided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewSla {
    WorkingDays(u32),
    Plain(Duration),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub amqp_url: String,
    pub redis_url: String,
    pub smtp_url: String,
    /// `PREREG_SMTP_CA_FILE`: PEM certificates trusted (besides the public
    /// roots) for the TLS connection to the mail server, e.g. a private CA.
    pub smtp_ca_file: Option<std::path::PathBuf>,
    pub http_addr: SocketAddr,
    /// How long a client has to send a complete request head (slowloris).
    pub http_header_timeout: Duration,
    /// How long reading a request body and answering it may take.
    pub http_request_timeout: Duration,
    pub metrics_addr: SocketAddr,
    /// Whether `PREREG_METRICS_ADDR` was given (otherwise a taken default
    /// port falls back to a free one).
    pub metrics_addr_set: bool,
    pub public_url: String,
    /// Dashboard sessions end after this long without a request
    /// (`PREREG_DASHBOARD_IDLE`) and at the latest this long after sign-in
    /// (`PREREG_DASHBOARD_LIFETIME`).
    pub dashboard_idle: Duration,
    pub dashboard_lifetime: Duration,
    /// The provider's registration page that invitation links lead to
    /// (`PREREG_SIGNUP_URL`); `/i/{token}` redirects there with `token=`.
    pub signup_url: String,
    pub operator_token: Option<String>,
    pub provider_name: String,
    pub escalation_email: String,
    pub reviewer_email: String,
    pub mail_from: String,
    pub timezone: Tz,
    pub claim_validity: Duration,
    pub invitation_validity: Duration,
    pub review_sla: ReviewSla,
    pub review_reminder_before: Duration,
    pub sweep_interval: Duration,
    /// Rows per sweep transaction (`PREREG_SWEEP_BATCH`).
    pub sweep_batch: i64,
    /// Batch loops one sweep runs at once (`PREREG_SWEEP_PARALLELISM`).
    pub sweep_parallelism: usize,
    /// How long before a claim expires the partner is reminded
    /// (`PREREG_CLAIM_REMINDER_BEFORE`; `0s` turns the reminder off).
    pub claim_reminder_before: Duration,
    pub partner_quota: i64,
    pub export_retention: Duration,
    pub amqp_prefix: String,
    /// `PREREG_AMQP_QUEUE_EXPIRES` (unset by default): the broker deletes a
    /// queue of this prefix once it has gone unused this long (`x-expires`).
    /// Only for throwaway prefixes (tests, previews, benchmarks), so that a
    /// run killed before its teardown leaves nothing behind on a shared
    /// broker; never set it where queues hold work worth keeping.
    pub amqp_queue_expires: Option<Duration>,
    pub worker_concurrency: usize,
    pub job_timeout: Duration,
    pub max_attempts: u32,
    pub retry_delays: Vec<Duration>,
    pub delivery_limit: u32,
    /// `PREREG_MAX_MESSAGE_BYTES`: a consumed message larger than this is
    /// dead-lettered (`too_large`) without being parsed.
    pub max_message_bytes: usize,
    /// Expiry of a Redis lock; renewed every third of it while its job runs,
    /// so a crashed worker's locks free themselves within this.
    pub lock_ttl: Duration,
    pub lock_wait: Duration,
    pub db_max_connections: u32,
    /// How long a request or job waits for a pooled Postgres connection.
    pub db_acquire_timeout: Duration,
    /// Postgres `statement_timeout` of every connection (`0s` = none): a
    /// lock wait or slow statement fails and is retried instead of hanging.
    pub db_statement_timeout: Duration,
    /// How long a publish waits for the broker's confirm.
    pub publish_timeout: Duration,
    /// How often each process probes its dependencies (4 times as often
    /// while one is down).
    pub health_probe_interval: Duration,
    /// `Retry-After` of a `503` answer.
    pub retry_after: Duration,
    pub outbox_interval: Duration,
    /// How long the intake's own outbox rows wait before the relay may
    /// publish them (the intake publishes them itself; the relay steps in
    /// after a crash or an unanswered confirm). Also the relay's lease.
    pub outbox_grace: Duration,
    /// Intake group commit: most commands written and published together.
    pub intake_batch_size: usize,
    /// Intake group commit: how long the first command of a batch waits for
    /// others to join.
    pub intake_batch_linger: Duration,
    /// Registration worker: most deliveries decided in one transaction
    /// (the queue's prefetch is at least twice this).
    pub registration_batch: usize,
    /// Registration worker: how long a batch waits for more deliveries
    /// after its first one arrived.
    pub registration_linger: Duration,
    /// Email worker: most invitation deliveries leased, sent and recorded
    /// together (`PREREG_EMAIL_BATCH`; 1: one at a time).
    pub email_batch: usize,
    /// Email worker: how long a batch waits for more deliveries after its
    /// first one arrived (`PREREG_EMAIL_LINGER`).
    pub email_linger: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub smtp_pool_size: u32,
    pub smtp_timeout: Duration,
    /// Invitation emails per partner per second (0 = no limit).
    pub partner_email_rate: u32,
    /// Key of the invitation link tokens (HMAC); keep it secret and stable.
    pub link_secret: String,
    /// `PREREG_DEV_MODE=1`: a laptop setup; weak or default secrets are
    /// accepted. Outside it, processes refuse to start with them.
    pub dev_mode: bool,
    /// Failed association attempts on one invitation before it is locked
    /// (`PREREG_ATTEMPT_LIMIT`, 5).
    pub attempt_limit: u32,
    /// Failed attempts per upstream key per `attempt_window` before that key
    /// is refused (`PREREG_ATTEMPT_KEY_LIMIT`, 20).
    pub attempt_key_limit: u32,
    /// The window of the per-key count (`PREREG_ATTEMPT_WINDOW`, 1m).
    pub attempt_window: Duration,
    /// How long a locked invitation refuses attempts (`PREREG_ATTEMPT_COOLDOWN`, 15m).
    pub attempt_cooldown: Duration,
    /// Pending or running exports one partner may have (`PREREG_EXPORT_MAX_ACTIVE`, 3).
    pub export_max_active: i64,
}

/// Secrets that shipped in examples or code: never accepted outside
/// development mode.
const KNOWN_DEFAULT_SECRETS: &[&str] = &[
    "dev-only-link-secret-change-me",
    "dev-operator-token",
    "test-operator-token",
    "bench-operator",
    "change-me",
    "changeme",
    "secret",
];

/// The shortest secret accepted outside development mode.
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self::from_map(&HashMap::new()).expect("defaults are valid")
    }
}

impl Config {
    /// Reads `.env` (when present) and the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let _ = dotenvy::dotenv();
        let vars: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("PREREG_"))
            .collect();
        Self::from_map(&vars)
    }

    /// The operator token and the link secret must be set, at least 32
    /// characters long and not a value that shipped anywhere.
    pub fn check_secrets(&self) -> Result<(), ConfigError> {
        let check = |var: &str, value: Option<&str>| -> Result<(), ConfigError> {
            let err = |m: &str| {
                ConfigError {
                var: var.to_string(),
                message: format!("{m} (set a random value of at least {MIN_SECRET_LEN} characters, e.g. `openssl rand -hex 32`, or PREREG_DEV_MODE=1 on a laptop)"),
            }
            };
            match value.map(str::trim) {
                None | Some("") => Err(err("missing")),
                Some(v) if KNOWN_DEFAULT_SECRETS.contains(&v) => {
                    Err(err("a default value that is publicly known"))
                }
                Some(v) if v.chars().count() < MIN_SECRET_LEN => Err(err(&format!(
                    "too short ({} characters)",
                    v.chars().count()
                ))),
                Some(_) => Ok(()),
            }
        };
        check("PREREG_OPERATOR_TOKEN", self.operator_token.as_deref())?;
        check("PREREG_LINK_SECRET", Some(&self.link_secret))
    }

    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |name: &str, default: &str| -> String {
            vars.get(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| default.to_string())
        };
        let err = |var: &str, message: String| ConfigError {
            var: var.to_string(),
            message,
        };
        let dur = |name: &str, default: &str| -> Result<Duration, ConfigError> {
            parse_duration(&get(name, default)).map_err(|m| err(name, m))
        };
        let num = |name: &str, default: &str| -> Result<u64, ConfigError> {
            get(name, default)
                .parse::<u64>()
                .map_err(|e| err(name, format!("not a whole number: {e}")))
        };
        let addr = |name: &str, default: &str| -> Result<SocketAddr, ConfigError> {
            get(name, default)
                .parse::<SocketAddr>()
                .map_err(|e| err(name, format!("not a socket address: {e}")))
        };
        let timezone = get("PREREG_TIMEZONE", "Asia/Shanghai")
            .parse::<Tz>()
            .map_err(|e| err("PREREG_TIMEZONE", e.to_string()))?;
        let review_sla = parse_review_sla(&get("PREREG_REVIEW_SLA", "2 working days"))
            .map_err(|m| err("PREREG_REVIEW_SLA", m))?;
        let retry_delays = get("PREREG_RETRY_DELAYS", "1s,5s,30s,2m,10m")
            .split(',')
            .map(|s| parse_duration(s.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| err("PREREG_RETRY_DELAYS", m))?;
        if retry_delays.is_empty() {
            return Err(err("PREREG_RETRY_DELAYS", "at least one delay".into()));
        }
        let log_format = match get("PREREG_LOG_FORMAT", "text").as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => return Err(err("PREREG_LOG_FORMAT", format!("`{other}`: json or text"))),
        };
        let sweep_interval = dur("PREREG_SWEEP_INTERVAL", "60s")?;
        if sweep_interval < Duration::from_millis(100) {
            return Err(err("PREREG_SWEEP_INTERVAL", "at least 100ms".into()));
        }
        let prefix = get("PREREG_AMQP_PREFIX", "prereg");
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(err(
                "PREREG_AMQP_PREFIX",
                "letters, digits, - _ . only".into(),
            ));
        }
        Ok(Self {
            database_url: get(
                "PREREG_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/prereg",
            ),
            amqp_url: get("PREREG_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            redis_url: get("PREREG_REDIS_URL", "redis://127.0.0.1:6379"),
            smtp_url: get("PREREG_SMTP_URL", "smtp://127.0.0.1:1025"),
            smtp_ca_file: Some(get("PREREG_SMTP_CA_FILE", ""))
                .filter(|v| !v.trim().is_empty())
                .map(std::path::PathBuf::from),
            http_addr: addr("PREREG_HTTP_ADDR", "127.0.0.1:8080")?,
            http_header_timeout: dur("PREREG_HTTP_HEADER_TIMEOUT", "10s")?
                .max(Duration::from_millis(50)),
            http_request_timeout: dur("PREREG_HTTP_REQUEST_TIMEOUT", "30s")?
                .max(Duration::from_millis(50)),
            metrics_addr: addr("PREREG_METRICS_ADDR", "127.0.0.1:9091")?,
            metrics_addr_set: vars
                .get("PREREG_METRICS_ADDR")
                .is_some_and(|v| !v.trim().is_empty()),
            public_url: get("PREREG_PUBLIC_URL", "http://localhost:8080")
                .trim_end_matches('/')
                .to_string(),
            dashboard_idle: dur("PREREG_DASHBOARD_IDLE", "30m")?,
            dashboard_lifetime: dur("PREREG_DASHBOARD_LIFETIME", "12h")?,
            signup_url: get("PREREG_SIGNUP_URL", "https://signup.example.com/register"),
            operator_token: vars
                .get("PREREG_OPERATOR_TOKEN")
                .filter(|v| !v.trim().is_empty())
                .cloned(),
            provider_name: get("PREREG_PROVIDER_NAME", "the provider"),
            escalation_email: get("PREREG_ESCALATION_EMAIL", "escalations@localhost"),
            reviewer_email: get("PREREG_REVIEWER_EMAIL", "reviewers@localhost"),
            mail_from: get("PREREG_MAIL_FROM", "Partner Programme <no-reply@localhost>"),
            timezone,
            claim_validity: dur("PREREG_CLAIM_VALIDITY", "15d")?,
            invitation_validity: dur("PREREG_INVITATION_VALIDITY", "7d")?,
            review_sla,
            review_reminder_before: dur("PREREG_REVIEW_REMINDER_BEFORE", "4h")?,
            sweep_interval,
            sweep_batch: num("PREREG_SWEEP_BATCH", "5000")?.clamp(1, 100_000) as i64,
            sweep_parallelism: num("PREREG_SWEEP_PARALLELISM", "2")?.clamp(1, 16) as usize,
            claim_reminder_before: dur("PREREG_CLAIM_REMINDER_BEFORE", "2d")?,
            partner_quota: num("PREREG_PARTNER_QUOTA", "100")? as i64,
            export_retention: dur("PREREG_EXPORT_RETENTION", "7d")?,
            amqp_prefix: prefix,
            amqp_queue_expires: match vars.get("PREREG_AMQP_QUEUE_EXPIRES") {
                Some(v) if !v.trim().is_empty() => {
                    Some(dur("PREREG_AMQP_QUEUE_EXPIRES", "")?.max(Duration::from_secs(1)))
                }
                _ => None,
            },
            worker_concurrency: num("PREREG_WORKER_CONCURRENCY", "32")?.max(1) as usize,
            job_timeout: dur("PREREG_JOB_TIMEOUT", "30s")?,
            max_attempts: num("PREREG_MAX_ATTEMPTS", "6")?.max(1) as u32,
            retry_delays,
            delivery_limit: num("PREREG_DELIVERY_LIMIT", "10")?.max(1) as u32,
            max_message_bytes: num("PREREG_MAX_MESSAGE_BYTES", "262144")?.max(1024) as usize,
            lock_ttl: dur("PREREG_LOCK_TTL", "1s")?.max(Duration::from_millis(30)),
            lock_wait: dur("PREREG_LOCK_WAIT", "3s")?,
            db_max_connections: num("PREREG_DB_MAX_CONNECTIONS", "20")?.max(1) as u32,
            db_acquire_timeout: dur("PREREG_DB_ACQUIRE_TIMEOUT", "5s")?
                .max(Duration::from_millis(10)),
            db_statement_timeout: dur("PREREG_DB_STATEMENT_TIMEOUT", "30s")?,
            publish_timeout: dur("PREREG_PUBLISH_TIMEOUT", "5s")?.max(Duration::from_millis(10)),
            health_probe_interval: dur("PREREG_HEALTH_PROBE_INTERVAL", "1s")?
                .max(Duration::from_millis(20)),
            retry_after: dur("PREREG_RETRY_AFTER", "2s")?.max(Duration::from_secs(1)),
            outbox_interval: dur("PREREG_OUTBOX_INTERVAL", "200ms")?,
            outbox_grace: dur("PREREG_OUTBOX_GRACE", "15s")?,
            intake_batch_size: num("PREREG_INTAKE_BATCH_SIZE", "128")?.clamp(1, 1000) as usize,
            intake_batch_linger: dur("PREREG_INTAKE_BATCH_LINGER", "1ms")?,
            registration_batch: num("PREREG_REGISTRATION_BATCH", "128")?.clamp(1, 500) as usize,
            registration_linger: dur("PREREG_REGISTRATION_LINGER", "3ms")?,
            email_batch: num("PREREG_EMAIL_BATCH", "64")?.clamp(1, 500) as usize,
            email_linger: dur("PREREG_EMAIL_LINGER", "3ms")?,
            shutdown_grace: dur("PREREG_SHUTDOWN_GRACE", "25s")?,
            log_format,
            smtp_pool_size: num("PREREG_SMTP_POOL_SIZE", "8")?.clamp(1, 256) as u32,
            smtp_timeout: dur("PREREG_SMTP_TIMEOUT", "10s")?,
            partner_email_rate: num("PREREG_PARTNER_EMAIL_RATE", "20")?.min(1_000_000) as u32,
            link_secret: get("PREREG_LINK_SECRET", "dev-only-link-secret-change-me"),
            dev_mode: matches!(
                get("PREREG_DEV_MODE", "0").to_ascii_lowercase().as_str(),
                "1" | "true" | "yes"
            ),
            attempt_limit: num("PREREG_ATTEMPT_LIMIT", "5")?.clamp(1, 1000) as u32,
            attempt_key_limit: num("PREREG_ATTEMPT_KEY_LIMIT", "20")?.clamp(1, 1_000_000) as u32,
            attempt_window: dur("PREREG_ATTEMPT_WINDOW", "1m")?,
            attempt_cooldown: dur("PREREG_ATTEMPT_COOLDOWN", "15m")?,
            export_max_active: num("PREREG_EXPORT_MAX_ACTIVE", "3")?.clamp(1, 1000) as i64,
        })
    }
}

/// Parses `15d`, `36h`, `90m`, `3s`, `250ms` (and sums such as `1h30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!(
                "`{s}`: expected a number, e.g. 15d, 36h, 3s, 250ms"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let too_large = || format!("`{s}`: duration too large");
        let secs = |factor: u64| value.checked_mul(factor).map(Duration::from_secs);
        let step = match unit {
            "ms" => Some(Duration::from_millis(value)),
            "s" => secs(1),
            "m" => secs(60),
            "h" => secs(3600),
            "d" => secs(86_400),
            "" => return Err(format!("`{s}`: missing unit (ms, s, m, h, d)")),
            other => return Err(format!("`{s}`: unknown unit `{other}` (ms, s, m, h, d)")),
        }
        .ok_or_else(too_large)?;
        total = total.checked_add(step).ok_or_else(too_large)?;
    }
    Ok(total)
}

/// `2 working days` (also `1 working day`, `3wd`) or a plain duration such as `5s`.
pub fn parse_review_sla(text: &str) -> Result<ReviewSla, String> {
    let s = text.trim().to_ascii_lowercase();
    let words: Vec<&str> = s.split_whitespace().collect();
    if let [n, "working", "day" | "days"] = words.as_slice() {
        let n = n
            .parse::<u32>()
            .map_err(|_| format!("`{text}`: bad number"))?;
        return Ok(ReviewSla::WorkingDays(n));
    }
    if let Some(n) = s.strip_suffix("wd") {
        if let Ok(n) = n.trim().parse::<u32>() {
            return Ok(ReviewSla::WorkingDays(n));
        }
    }
    parse_duration(&s)
        .map(ReviewSla::Plain)
        .map_err(|e| format!("{e}; or `N working days`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("15d").unwrap(),
            Duration::from_secs(15 * 86_400)
        );
        assert_eq!(
            parse_duration("36h").unwrap(),
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("3").is_err());
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn review_sla() {
        assert_eq!(
            parse_review_sla("2 working days").unwrap(),
            ReviewSla::WorkingDays(2)
        );
        assert_eq!(
            parse_review_sla("1 working day").unwrap(),
            ReviewSla::WorkingDays(1)
        );
        assert_eq!(
            parse_review_sla("5s").unwrap(),
            ReviewSla::Plain(Duration::from_secs(5))
        );
        assert!(parse_review_sla("two days").is_err());
    }

    #[test]
    fn defaults_and_errors() {
        let c = Config::default();
        assert_eq!(c.partner_quota, 100);
        assert_eq!(c.claim_validity, Duration::from_secs(15 * 86_400));
        assert_eq!(c.review_sla, ReviewSla::WorkingDays(2));
        assert_eq!(c.timezone, chrono_tz::Asia::Shanghai);
        let mut m = HashMap::new();
        m.insert("PREREG_CLAIM_VALIDITY".to_string(), "soon".to_string());
        let e = Config::from_map(&m).unwrap_err();
        assert_eq!(e.var, "PREREG_CLAIM_VALIDITY");
    }

    #[test]
    fn weak_secrets_are_named() {
        let strong = "0123456789abcdef0123456789abcdef";
        let cfg = |op: Option<&str>, link: Option<&str>| {
            let mut m = HashMap::new();
            if let Some(op) = op {
                m.insert("PREREG_OPERATOR_TOKEN".to_string(), op.to_string());
            }
            if let Some(l) = link {
                m.insert("PREREG_LINK_SECRET".to_string(), l.to_string());
            }
            Config::from_map(&m).unwrap()
        };
        assert!(cfg(Some(strong), Some(strong)).check_secrets().is_ok());
        let var = |c: Config| c.check_secrets().unwrap_err().var;
        assert_eq!(var(cfg(None, Some(strong))), "PREREG_OPERATOR_TOKEN");
        assert_eq!(
            var(cfg(Some("short"), Some(strong))),
            "PREREG_OPERATOR_TOKEN"
        );
        assert_eq!(var(cfg(Some(strong), None)), "PREREG_LINK_SECRET");
        assert_eq!(
            var(cfg(Some(strong), Some("x".repeat(31).as_str()))),
            "PREREG_LINK_SECRET"
        );
        let e = cfg(Some("dev-operator-token"), Some(strong))
            .check_secrets()
            .unwrap_err();
        assert!(e.to_string().contains("PREREG_OPERATOR_TOKEN"), "{e}");
    }
}
