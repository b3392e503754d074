//! Structured logs (JSON in production) and the Prometheus recorder.

use std::{io::IsTerminal, sync::OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::{Config, LogFormat};

/// Installs the global subscriber once (later calls, e.g. in tests, are no-ops).
/// Logs go to stderr (stdout stays for a command's output, e.g. `prereg admin
/// dlq list | jq`), with colours only when stderr is a terminal.
pub fn init(cfg: &Config) {
    let ansi = std::io::stderr().is_terminal();
    let filter = EnvFilter::try_from_default_env()
        // lapin logs every connection close at ERROR (so `prereg admin dlq
        // replay` printed errors on success); our own broker code reports
        // what failed, where and which variable to change.
        // `RUST_LOG=info,lapin=debug` shows lapin's view when needed.
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,lapin=off"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match cfg.log_format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .compact(),
            )
            .try_init(),
    };
    let _ = result;
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often the recorder's upkeep folds the histogram samples recorded
/// since into their buckets.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The process-wide Prometheus handle (installed on first use, with a thread
/// that runs the recorder's upkeep every [`UPKEEP_EVERY`]). Without the
/// upkeep, every histogram sample is kept raw until `/metrics` is scraped:
/// a worker nobody scraped grew by about 2.5 MiB per 25 minutes of the soak.
pub fn metrics() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ])
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            handle
        })
        .clone()
}
