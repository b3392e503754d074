//! What every process shares: configuration, Postgres, RabbitMQ, Redis locks
//! and the working-day calendar.

use std::{
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::{
    config::{Config, ReviewSla},
    deps::Health,
    domain::workdays::{Calendar, Deadline},
    locks::Locks,
    mail::Mailer,
    mq::{Broker, Names},
    publisher::Publisher,
};

pub struct Ctx {
    pub cfg: Config,
    pub db: PgPool,
    pub broker: Arc<Broker>,
    pub locks: Locks,
    pub mailer: Mailer,
    /// Which dependencies are known to be down (shared by every request and
    /// job; kept current by the probe task).
    pub health: Arc<Health>,
    /// Pipelined publishing with confirms (intake batches, outbox relay).
    pub publisher: Arc<Publisher>,
    /// The intake's group commit, started on first use.
    intake: OnceLock<crate::intake::Intake>,
    calendar: RwLock<(Arc<Calendar>, Option<Instant>)>,
}

const CALENDAR_TTL: Duration = Duration::from_secs(30);

impl Ctx {
    /// Outside development mode (`PREREG_DEV_MODE`), a missing, short or
    /// publicly known operator token or link secret stops the process here.
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Self>> {
        if !cfg.dev_mode {
            cfg.check_secrets()?;
        }
        let db = crate::store::connect_with(
            &cfg.database_url,
            cfg.db_max_connections,
            cfg.db_acquire_timeout,
            cfg.db_statement_timeout,
        )?;
        let health = Arc::new(Health::new(cfg.retry_after.as_secs()));
        let names =
            Names::new(&cfg.amqp_prefix, cfg.retry_delays.clone()).expiring(cfg.amqp_queue_expires);
        let broker = Arc::new(
            Broker::new(&cfg.amqp_url, names, cfg.delivery_limit)
                .with_health(health.clone())
                .with_timeout(cfg.publish_timeout),
        );
        let locks = Locks::new(
            &cfg.redis_url,
            &cfg.amqp_prefix,
            cfg.lock_ttl,
            cfg.lock_wait,
        );
        let mailer = Mailer::with_ca_file(
            &cfg.smtp_url,
            &cfg.mail_from,
            cfg.smtp_pool_size,
            cfg.smtp_timeout,
            cfg.smtp_ca_file.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let publisher = Arc::new(Publisher::new(broker.clone(), cfg.publish_timeout));
        Ok(Arc::new(Self {
            cfg,
            db,
            broker,
            locks,
            mailer,
            health,
            publisher,
            intake: OnceLock::new(),
            calendar: RwLock::new((Arc::new(Calendar::cn_2026()), None)),
        }))
    }

    /// The intake's batcher (needs a running Tokio runtime on first use).
    pub fn intake(&self) -> &crate::intake::Intake {
        self.intake.get_or_init(|| {
            crate::intake::Intake::start(
                self.db.clone(),
                self.publisher.clone(),
                self.cfg.intake_batch_size,
                self.cfg.intake_batch_linger,
                self.cfg.outbox_grace,
            )
        })
    }

    /// The calendar: the shipped 2026 data, with every year operators uploaded
    /// replacing what it had. Cached for a short while.
    pub async fn calendar(&self) -> Result<Arc<Calendar>, sqlx::Error> {
        if let Ok(guard) = self.calendar.read() {
            if guard.1.is_some_and(|t| t.elapsed() < CALENDAR_TTL) {
                return Ok(guard.0.clone());
            }
        }
        let years = crate::store::calendar::all_years(&self.db).await?;
        let mut cal = Calendar::cn_2026();
        for (year, entries) in years {
            if let Err(e) = cal.load_year(year, &entries) {
                tracing::error!(year, error = %e, "stored calendar year is invalid; ignoring it");
            }
        }
        let cal = Arc::new(cal);
        if let Ok(mut guard) = self.calendar.write() {
            *guard = (cal.clone(), Some(Instant::now()));
        }
        Ok(cal)
    }

    pub fn invalidate_calendar(&self) {
        if let Ok(mut guard) = self.calendar.write() {
            guard.1 = None;
        }
    }

    /// When a review opened at `from` must be decided.
    pub async fn review_due(&self, from: DateTime<Utc>) -> Result<Deadline, sqlx::Error> {
        Ok(match self.cfg.review_sla {
            ReviewSla::Plain(d) => Deadline {
                at: from + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(2)),
                calendar_missing: false,
            },
            ReviewSla::WorkingDays(n) => {
                self.calendar()
                    .await?
                    .add_working_days(from, n, self.cfg.timezone)
            }
        })
    }

    pub fn claim_validity(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.cfg.claim_validity).unwrap_or(chrono::Duration::days(15))
    }
}
