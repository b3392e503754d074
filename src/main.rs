//! The `prereg` binary: thin wrappers that load config, init telemetry, build
//! the app and run until a shutdown signal.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prereg::{
    app::{self, Roles},
    mq::Queue,
    Config, Ctx,
};

mod admin_cli;

/// The environment variables every subcommand reads (a `.env` file in the
/// working directory is read too). README.md has the full table.
const ENV_HELP: &str = "\
Environment (also read from ./.env):
  PREREG_DATABASE_URL        PostgreSQL URL [postgres://postgres@127.0.0.1:5432/prereg]
  PREREG_AMQP_URL            RabbitMQ URL [amqp://guest:guest@127.0.0.1:5672/%2f]
  PREREG_AMQP_PREFIX         prefix of every exchange and queue [prereg]
  PREREG_AMQP_QUEUE_EXPIRES  throwaway prefixes only: queues unused this long are deleted [unset]
  PREREG_REDIS_URL           Redis URL (locks) [redis://127.0.0.1:6379]
  PREREG_SMTP_URL            smtp://host:port, smtps://host, or file:///dir to catch mail [smtp://127.0.0.1:1025]
  PREREG_MAIL_FROM           sender of every email
  PREREG_HTTP_ADDR           where the intake listens [127.0.0.1:8080]
  PREREG_METRICS_ADDR        health and metrics of workers and schedulers [127.0.0.1:9091; scheduler 9092; a free port if taken]
  PREREG_PUBLIC_URL          base of invitation links [http://localhost:8080]
  PREREG_SIGNUP_URL          the provider's registration page links lead to
  PREREG_OPERATOR_TOKEN      bootstrap operator key
  PREREG_LINK_SECRET         key of invitation link tokens
  PREREG_DEV_MODE            1: development mode (weak secrets allowed; `prereg dev` sets it)
  PREREG_LOG_FORMAT          text or json [text]; RUST_LOG filters
  timings: PREREG_CLAIM_VALIDITY, PREREG_INVITATION_VALIDITY, PREREG_REVIEW_SLA, PREREG_REVIEW_REMINDER_BEFORE,
  PREREG_CLAIM_REMINDER_BEFORE, PREREG_SWEEP_INTERVAL, PREREG_SWEEP_BATCH, PREREG_SWEEP_PARALLELISM, PREREG_RETRY_DELAYS,
  PREREG_MAX_ATTEMPTS, PREREG_JOB_TIMEOUT, PREREG_SHUTDOWN_GRACE; see README.md for every variable.";

#[derive(Parser)]
#[command(
    name = "prereg",
    version,
    about = "Partner pre-registration back end",
    long_about = "Partner pre-registration back end: one binary for every role.\n\
                  On a laptop, `scripts/dev.sh` (or `prereg dev`) runs everything in one process.",
    after_help = ENV_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if it does not exist, apply migrations, then exit.
    #[command(after_help = ENV_HELP)]
    Migrate,
    /// Serve the HTTP API and the dashboard on PREREG_HTTP_ADDR (and publish the outbox).
    #[command(after_help = ENV_HELP)]
    Intake,
    /// Consume job queues (all, or those named with --only); health and
    /// metrics on PREREG_METRICS_ADDR.
    #[command(after_help = ENV_HELP)]
    Worker {
        /// Comma-separated queues: registration, accounts, email, association, sweeps, deadlines, export.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Publish sweep and deadline ticks every PREREG_SWEEP_INTERVAL (safe to
    /// run on several nodes); health and metrics on PREREG_METRICS_ADDR.
    #[command(after_help = ENV_HELP)]
    Scheduler,
    /// Everything in one process for a laptop, never for production: creates
    /// and migrates the database, runs intake, workers, relay and scheduler,
    /// catches email in a directory, prints the URLs and ready keys.
    #[command(after_help = ENV_HELP)]
    Dev {
        /// Where caught email is written (one .eml file per message) when
        /// PREREG_SMTP_URL is not set.
        #[arg(long, default_value = "target/dev-mail")]
        mail_dir: std::path::PathBuf,
        /// On exit, drop the database and delete this PREREG_AMQP_PREFIX's
        /// queues and exchanges (for throw-away runs such as CI's quick-start check).
        #[arg(long)]
        cleanup_on_exit: bool,
    },
    /// Print the AsyncAPI 3 document of every command, job and event (the
    /// one served at /asyncapi.json), for PREREG_AMQP_PREFIX's exchange names.
    /// Needs no service.
    #[command(after_help = ENV_HELP)]
    Asyncapi,
    /// Operator tasks from a terminal.
    #[command(after_help = ENV_HELP)]
    Admin {
        #[command(subcommand)]
        command: admin_cli::AdminCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let smtp_url_given = std::env::var("PREREG_SMTP_URL").is_ok_and(|v| !v.trim().is_empty());
    if matches!(cli.command, Command::Dev { .. }) {
        // The explicit development mode; no other thread exists yet.
        std::env::set_var(prereg::dev::DEV_MODE_VAR, "1");
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, cfg, smtp_url_given)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, mut cfg: Config, smtp_url_given: bool) -> anyhow::Result<()> {
    prereg::telemetry::init(&cfg);
    match cli.command {
        Command::Migrate => {
            prereg::startup::ensure_database(&cfg.database_url).await?;
            let ctx = Ctx::new(cfg)?;
            prereg::startup::migrate(&ctx).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Dev {
            mail_dir,
            cleanup_on_exit,
        } => {
            let cfg = prereg::dev::dev_config(cfg, smtp_url_given, &mail_dir);
            let session = prereg::dev::start(cfg.clone()).await?;
            println!("{}", session.banner(&cfg.public_url));
            session.running.run_until_signal().await;
            if cleanup_on_exit {
                prereg::dev::cleanup(cfg).await?;
            }
            Ok(())
        }
        Command::Intake => {
            run_roles(
                cfg,
                Roles {
                    intake: true,
                    relay: true,
                    ..Default::default()
                },
            )
            .await
        }
        Command::Worker { only } => {
            let queues = if only.is_empty() {
                Queue::ALL.to_vec()
            } else {
                only.iter()
                    .map(|s| {
                        Queue::parse(s.trim()).ok_or_else(|| anyhow::anyhow!("unknown queue `{s}`"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?
            };
            run_roles(
                cfg,
                Roles {
                    workers: queues,
                    relay: true,
                    health_server: true,
                    ..Default::default()
                },
            )
            .await
        }
        Command::Scheduler => {
            if !cfg.metrics_addr_set {
                // One default metrics port per role: workers 9091, schedulers 9092.
                cfg.metrics_addr.set_port(9092);
            }
            run_roles(
                cfg,
                Roles {
                    scheduler: true,
                    health_server: true,
                    ..Default::default()
                },
            )
            .await
        }
        Command::Asyncapi => {
            let doc = prereg::asyncapi::document(&cfg.amqp_prefix);
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(())
        }
        Command::Admin { command } => admin_cli::run(cfg, command).await,
    }
}

/// Runs this process as `roles` until a signal asks it to stop.
async fn run_roles(cfg: prereg::Config, roles: Roles) -> anyhow::Result<()> {
    app::start(Ctx::new(cfg)?, roles)
        .await?
        .run_until_signal()
        .await;
    Ok(())
}
