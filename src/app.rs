//! Building and running the processes: the same code serves the binaries and
//! the tests.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{context::Ctx, deps::Dep, mq::Queue, store, workers};

/// What a process runs.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    /// Serve the HTTP API.
    pub intake: bool,
    /// Consume these queues.
    pub workers: Vec<Queue>,
    /// Publish the transactional outbox.
    pub relay: bool,
    /// Serve `/healthz`, `/readyz` and `/metrics` on `PREREG_METRICS_ADDR`
    /// (worker processes, which have no API).
    pub health_server: bool,
    /// Publish sweep and deadline ticks every `PREREG_SWEEP_INTERVAL`.
    pub scheduler: bool,
}

pub struct Running {
    pub ctx: Arc<Ctx>,
    pub http_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops taking work, drains what is in flight, then returns.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.ctx.broker.close().await;
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Runs until SIGTERM or Ctrl-C, then shuts down gracefully.
    pub async fn run_until_signal(self) {
        shutdown_signal().await;
        tracing::info!("shutdown signal received; draining");
        self.shutdown().await;
        tracing::info!("stopped");
    }
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Starts the roles on `ctx`. The HTTP listener binds `PREREG_HTTP_ADDR`
/// (port 0 picks a free port; the chosen address is in `http_addr`).
pub async fn start(ctx: Arc<Ctx>, roles: Roles) -> anyhow::Result<Running> {
    crate::telemetry::metrics();
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut http_addr = None;
    let mut health_addr = None;
    if roles.intake {
        let listener =
            crate::startup::bind(ctx.cfg.http_addr, "the HTTP API", "PREREG_HTTP_ADDR").await?;
        let addr = listener.local_addr()?;
        http_addr = Some(addr);
        let serve = crate::api::serve::serve;
        let timeout = ctx.cfg.http_header_timeout;
        tasks.spawn(serve(
            listener,
            crate::api::router(ctx.clone()),
            timeout,
            cancel.clone(),
        ));
        tracing::info!(%addr, "intake listening on http://{addr} (API, dashboard at /admin, /metrics, /readyz)");
    }
    if roles.health_server {
        let listener = bind_metrics(&ctx.cfg).await?;
        let addr = listener.local_addr()?;
        health_addr = Some(addr);
        tracing::info!(%addr, "health and metrics on http://{addr} (/healthz, /readyz, /metrics)");
        let serve = crate::api::serve::serve;
        let router = crate::api::health_router(ctx.clone());
        tasks.spawn(serve(
            listener,
            router,
            ctx.cfg.http_header_timeout,
            cancel.clone(),
        ));
    }
    tasks.spawn(probe_services(ctx.clone(), cancel.clone()));
    if !roles.workers.is_empty() {
        tasks.spawn(workers::runtime::run(
            ctx.clone(),
            roles.workers.clone(),
            cancel.clone(),
        ));
    }
    if roles.scheduler {
        tasks.spawn(crate::scheduler::run(ctx.clone(), cancel.clone()));
    }
    if roles.intake {
        // The dashboard's last hour of job rates and latencies.
        tasks.spawn(crate::jobstats::run(cancel.clone()));
    }
    if roles.intake || roles.health_server {
        // Processes that serve /metrics also report the queues.
        tasks.spawn(monitor_queues(ctx.clone(), cancel.clone()));
    }
    // Every process keeps its dependency health current (the intake answers
    // 503 at once while Postgres or RabbitMQ is known down; publishers fail
    // fast; the probe brings them back).
    tasks.spawn(run_probe(ctx.clone(), cancel.clone()));
    if roles.relay {
        tasks.spawn(store::outbox::run_relay(
            ctx.db.clone(),
            ctx.publisher.clone(),
            ctx.cfg.outbox_interval,
            ctx.cfg.outbox_grace,
            cancel.clone(),
        ));
    }
    Ok(Running {
        ctx,
        http_addr,
        health_addr,
        cancel,
        tasks,
    })
}

/// Binds `PREREG_METRICS_ADDR`. When it was left at its default and that port
/// is taken (another worker or scheduler on this host), any free port is used
/// instead and logged, so several processes run on one host with defaults.
async fn bind_metrics(cfg: &crate::Config) -> anyhow::Result<tokio::net::TcpListener> {
    match crate::startup::bind(
        cfg.metrics_addr,
        "health and metrics",
        "PREREG_METRICS_ADDR",
    )
    .await
    {
        Ok(l) => Ok(l),
        Err(e) if !cfg.metrics_addr_set => {
            let mut any = cfg.metrics_addr;
            any.set_port(0);
            let l = tokio::net::TcpListener::bind(any).await?;
            tracing::warn!(
                default = %cfg.metrics_addr,
                addr = %l.local_addr()?,
                "the default metrics address is in use; using a free port instead (set PREREG_METRICS_ADDR to choose one): {e}"
            );
            Ok(l)
        }
        Err(e) => Err(e),
    }
}

/// At start: says at once, and in words a person can act on, when Postgres or
/// RabbitMQ cannot be reached, then checks again with back-off until both
/// answer (the roles themselves reconnect on their own).
async fn probe_services(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut delay = std::time::Duration::from_secs(1);
    let (mut pg_ok, mut amqp_ok) = (false, false);
    loop {
        if !pg_ok {
            match crate::store::ping(&ctx.db).await {
                Ok(_) => {
                    pg_ok = true;
                    tracing::info!(database = %crate::startup::pg_where(&ctx.cfg.database_url), "PostgreSQL reachable");
                }
                Err(e) => {
                    let text = crate::startup::one_line(&e.to_string());
                    let hint = if text.contains("does not exist") {
                        "run `prereg migrate` (it creates the database) or set PREREG_DATABASE_URL"
                    } else {
                        "start PostgreSQL or set PREREG_DATABASE_URL"
                    };
                    tracing::warn!(
                        database = %crate::startup::pg_where(&ctx.cfg.database_url),
                        retry_in = ?delay,
                        "PostgreSQL unavailable: {text}; {hint}"
                    );
                }
            }
        }
        if !amqp_ok {
            match ctx.broker.ping().await {
                Ok(()) => {
                    amqp_ok = true;
                    tracing::info!(broker = %amqp_where(&ctx.cfg.amqp_url), "RabbitMQ reachable");
                }
                Err(e) => tracing::warn!(
                    broker = %amqp_where(&ctx.cfg.amqp_url),
                    retry_in = ?delay,
                    "RabbitMQ unreachable: {e}; start it or set PREREG_AMQP_URL (commands answer 503 meanwhile)"
                ),
            }
        }
        if pg_ok && amqp_ok {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(60));
    }
}

/// `host:port/vhost` of an AMQP URL, without credentials.
pub fn amqp_where(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    rest.split('?').next().unwrap_or(rest).to_string()
}

/// Refreshes the queue gauges every 15 s.
async fn monitor_queues(ctx: Arc<Ctx>, cancel: CancellationToken) {
    loop {
        if let Err(e) = queue_stats(&ctx).await {
            tracing::debug!(error = %e, "queue stats unavailable");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(15)) => {}
        }
    }
}

/// Depth and consumers of every work queue and its dead-letter queue.
pub async fn queue_stats(ctx: &Ctx) -> anyhow::Result<Vec<Value>> {
    crate::mq::dead_letters::queue_stats(&ctx.broker).await
}

/// Probes Postgres (one dedicated connection, not the pool, so a busy pool
/// is not mistaken for an outage), RabbitMQ and Redis until cancelled.
async fn run_probe(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let interval = ctx.cfg.health_probe_interval;
    // A refused or reset connection fails at once; only a server that hangs
    // needs the timeout, which must not mistake a busy machine for an outage.
    let timeout = ctx.cfg.db_acquire_timeout.min(Duration::from_secs(3));
    let mut pg: Option<PgConnection> = None;
    loop {
        // Postgres.
        let ok = match pg.as_mut() {
            Some(c) => matches!(
                tokio::time::timeout(timeout, crate::store::ping(&mut *c)).await,
                Ok(Ok(_))
            ),
            None => false,
        };
        if ok {
            ctx.health.mark_up(Dep::Postgres);
        } else {
            pg = None;
            match tokio::time::timeout(timeout, PgConnection::connect(&ctx.cfg.database_url)).await
            {
                Ok(Ok(c)) => {
                    pg = Some(c);
                    ctx.health.mark_up(Dep::Postgres);
                }
                Ok(Err(e)) => ctx.health.mark_down(Dep::Postgres, e.to_string()),
                Err(_) => ctx.health.mark_down(Dep::Postgres, "connect timed out"),
            }
        }
        // RabbitMQ (the process's own connection; blocked by an alarm counts
        // as down).
        // Each connect attempt is bounded by the broker's own timeout.
        match tokio::time::timeout(ctx.cfg.publish_timeout * 4, ctx.broker.probe()).await {
            Ok(Ok(())) => ctx.health.mark_up(Dep::RabbitMq),
            Ok(Err(e)) => ctx.health.mark_down(Dep::RabbitMq, e.to_string()),
            Err(_) => ctx.health.mark_down(Dep::RabbitMq, "probe timed out"),
        }
        // Redis.
        match ctx.locks.ping().await {
            Ok(()) => ctx.health.mark_up(Dep::Redis),
            Err(e) => ctx.health.mark_down(Dep::Redis, e.to_string()),
        }
        let wait = if ctx.health.any_down() {
            interval / 4
        } else {
            interval
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.health.woken() => {
                // Coalesce a burst of wake-ups.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if let Some(c) = pg {
        let _ = c.close().await;
    }
}
