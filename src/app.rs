//! Building and running the processes: the same code serves the binaries and
//! the tests.

use std::{net::SocketAddr, sync::Arc};

use axum::http::StatusCode;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{context::Ctx, mq::Queue, store, workers};

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
        let listener = tokio::net::TcpListener::bind(ctx.cfg.http_addr).await?;
        http_addr = Some(listener.local_addr()?);
        let app = crate::api::router(ctx.clone());
        let c = cancel.clone();
        tasks.spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { c.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "http server failed");
            }
        });
        tracing::info!(addr = ?http_addr, "intake listening");
    }
    if roles.health_server {
        let listener = tokio::net::TcpListener::bind(ctx.cfg.metrics_addr).await?;
        health_addr = Some(listener.local_addr()?);
        let app = crate::api::health_router(ctx.clone());
        let c = cancel.clone();
        tasks.spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { c.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "health server failed");
            }
        });
    }
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
    if roles.intake || roles.health_server {
        // Processes that serve /metrics also report the queues.
        tasks.spawn(monitor_queues(ctx.clone(), cancel.clone()));
    }
    if roles.relay {
        tasks.spawn(store::outbox::run_relay(
            ctx.db.clone(),
            ctx.broker.clone(),
            ctx.cfg.outbox_interval,
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

/// Checks Postgres, Redis and RabbitMQ; 503 when any is down.
pub async fn readiness(ctx: &Ctx) -> (StatusCode, Value) {
    let timeout = std::time::Duration::from_secs(2);
    let pg = tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&ctx.db)).await;
    let pg = match pg {
        Ok(Ok(_)) => json!({"ok": true}),
        Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
        Err(_) => json!({"ok": false, "error": "timeout"}),
    };
    let redis = match ctx.locks.ping().await {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    let amqp = match tokio::time::timeout(timeout, ctx.broker.ping()).await {
        Ok(Ok(())) => json!({"ok": true}),
        Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
        Err(_) => json!({"ok": false, "error": "timeout"}),
    };
    let all = [&pg, &redis, &amqp].iter().all(|v| v["ok"] == json!(true));
    // A warning only: deadlines are still computed (weekends only).
    let calendar =
        match tokio::time::timeout(timeout, crate::timekeeping::calendar_status(ctx)).await {
            Ok(Ok(c)) => {
                metrics::gauge!("prereg_calendar_missing").set(if c.calendar_missing {
                    1.0
                } else {
                    0.0
                });
                json!(c)
            }
            Ok(Err(e)) => json!({"error": e.to_string()}),
            Err(_) => json!({"error": "timeout"}),
        };
    let code = if all {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        json!({"status": if all { "ready" } else { "not_ready" }, "checks": {"postgres": pg, "redis": redis, "rabbitmq": amqp},
               "details": {"calendar": calendar}}),
    )
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
