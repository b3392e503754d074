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

#[derive(Parser)]
#[command(name = "prereg", version, about = "Partner pre-registration back end")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply database migrations, then exit.
    Migrate,
    /// Serve the HTTP API (and publish the outbox).
    Intake,
    /// Consume job queues (all, or those named with --only).
    Worker {
        /// Comma-separated queues: registration, accounts, email, association, sweeps, deadlines, export.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Publish sweep and deadline ticks every PREREG_SWEEP_INTERVAL (safe to
    /// run on several nodes).
    Scheduler,
    /// Operator tasks from a terminal.
    Admin {
        #[command(subcommand)]
        command: admin_cli::AdminCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match rt.block_on(run(cli, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, cfg: Config) -> anyhow::Result<()> {
    prereg::telemetry::init(&cfg);
    match cli.command {
        Command::Migrate => {
            let ctx = Ctx::new(cfg)?;
            prereg::store::migrate(&ctx.db).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Intake => {
            let ctx = Ctx::new(cfg)?;
            let roles = Roles {
                intake: true,
                relay: true,
                ..Default::default()
            };
            app::start(ctx, roles).await?.run_until_signal().await;
            Ok(())
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
            let ctx = Ctx::new(cfg)?;
            let roles = Roles {
                workers: queues,
                relay: true,
                health_server: true,
                ..Default::default()
            };
            app::start(ctx, roles).await?.run_until_signal().await;
            Ok(())
        }
        Command::Scheduler => {
            let ctx = Ctx::new(cfg)?;
            let roles = Roles {
                scheduler: true,
                health_server: true,
                ..Default::default()
            };
            app::start(ctx, roles).await?.run_until_signal().await;
            Ok(())
        }
        Command::Admin { command } => admin_cli::run(cfg, command).await,
    }
}
