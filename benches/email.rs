//! Invitation email benchmark: N queued email invitations through the real
//! email worker (pooled SMTP) into the local SMTP sink.
//!
//!   cargo bench --bench email                      # or scripts/bench-email.sh
//!   BENCH_EMAILS=5000 PREREG_WORKER_CONCURRENCY=64 PREREG_SMTP_POOL_SIZE=16 cargo bench --bench email
//!   PREREG_EMAIL_BATCH=1 cargo bench --bench email   # one delivery at a time
//!
//! Recreates the database `BENCH_DB` (default `prereg_bench_email`) on
//! `BENCH_PG`; uses RabbitMQ (`BENCH_AMQP`) under a unique prefix (deleted at
//! the end) and Redis (`BENCH_REDIS`). Prints Markdown for docs/benchmarks.md.

mod common;

use common::{check_db_name, drop_db_unless_kept, env_or, loadavg, num_cpus, recreate_db};
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use prereg::{
    app::{self, Roles},
    mq::{CloudEvent, Queue},
    Config, Ctx,
};
use prereg_devtools::smtp_sink::SmtpSink;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("email benchmark: run with `cargo bench --bench email`");
        return Ok(());
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_or("BENCH_LOG", "warn,lapin=error"))
        .with_writer(std::io::stderr)
        .try_init();
    let pg = env_or("BENCH_PG", "postgres://postgres@127.0.0.1:5432");
    let db = env_or("BENCH_DB", "prereg_bench_email");
    let n: i64 = env_or("BENCH_EMAILS", "5000").parse()?;
    check_db_name(&db)?;

    let mut admin = PgConnection::connect(&format!("{pg}/postgres")).await?;
    recreate_db(&mut admin, &db).await?;

    let sink = SmtpSink::start().await?;
    sink.keep_messages(false);

    let id = Uuid::new_v4().simple().to_string();
    let mut cfg = Config::from_env().unwrap_or_default();
    cfg.database_url = format!("{pg}/{db}");
    cfg.amqp_url = env_or("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2f");
    cfg.redis_url = env_or("BENCH_REDIS", "redis://127.0.0.1:6379");
    cfg.amqp_prefix = format!("bench-{}", &id[..12]);
    cfg.http_addr = "127.0.0.1:0".parse()?;
    cfg.metrics_addr = "127.0.0.1:0".parse()?;
    cfg.partner_email_rate = 0;
    cfg.smtp_url = sink.url();
    cfg.worker_concurrency = env_or("PREREG_WORKER_CONCURRENCY", "64").parse()?;
    cfg.smtp_pool_size = env_or("PREREG_SMTP_POOL_SIZE", "16").parse()?;
    cfg.db_max_connections = env_or("PREREG_DB_MAX_CONNECTIONS", "32").parse()?;
    cfg.outbox_interval = Duration::from_millis(50);
    let ctx = Ctx::new(cfg.clone())?;
    prereg::store::migrate(&ctx.db).await?;

    eprintln!("filling {n} claims and invitations…");
    let partner = Uuid::new_v4();
    sqlx::query("INSERT INTO partners (id, name, country, contact_email) VALUES ($1, 'Bench Partner', 'CN', 'ops@partner.example')")
        .bind(partner)
        .execute(&ctx.db)
        .await?;
    sqlx::query(
        "INSERT INTO preregistrations (id, partner_id, full_name, email, mobile, email_norm, mobile_norm, status,
              association_type, locale, created_at, decided_at, preregistered_at, expires_at, updated_at)
         SELECT gen_random_uuid(), $1, 'Customer ' || i, 'c' || i || '@bench.example', '+86139' || lpad(i::text, 8, '0'),
                'c' || i || '@bench.example', '+86139' || lpad(i::text, 8, '0'), 'preregistered',
                'reseller', 'en', now(), now(), now(), now() + interval '15 days', now()
         FROM generate_series(1, $2) AS i",
    )
    .bind(partner)
    .bind(n)
    .execute(&ctx.db)
    .await?;
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO invitations (id, preregistration_id, partner_id, association_type, method, locale, status,
              nonce, token_hash, link_expires_at)
         SELECT gen_random_uuid(), p.id, p.partner_id, 'reseller', 'email', 'en', 'queued',
                decode(md5(p.i::text), 'hex'), decode(md5('t' || p.i), 'hex'), now() + interval '7 days'
         FROM (SELECT id, partner_id, row_number() OVER (ORDER BY id) AS i FROM preregistrations) p
         RETURNING id",
    )
    .fetch_all(&ctx.db)
    .await?;
    anyhow::ensure!(ids.len() as i64 == n);
    sqlx::query("VACUUM ANALYZE").execute(&ctx.db).await?;

    let roles = Roles {
        workers: vec![Queue::Email],
        relay: true,
        ..Default::default()
    };
    let running = app::start(ctx.clone(), roles).await?;
    // Let the consumers attach before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let load_before = loadavg();
    eprintln!("publishing {n} invitation.requested…");
    let t = Instant::now();
    let publish_par: usize = env_or("BENCH_PUBLISH_PARALLELISM", "32").parse()?;
    let publish = {
        let ctx = ctx.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            stream::iter(ids)
                .map(|id| {
                    let ctx = ctx.clone();
                    async move {
                        let ev = CloudEvent::with_id(
                            format!("invitation.requested:{id}"),
                            "invitation.requested",
                            json!({"invitation_id": id}),
                        );
                        ctx.broker.publish_command(&ev).await
                    }
                })
                .buffer_unordered(publish_par)
                .collect::<Vec<_>>()
                .await
        })
    };
    let limit = Duration::from_secs(env_or("BENCH_TIMEOUT_SECS", "300").parse()?);
    let mut published_at = None;
    let mut publish = Some(publish);
    while sink.count() < n as usize {
        if t.elapsed() > limit {
            anyhow::bail!("only {} of {n} emails within {limit:?}", sink.count());
        }
        if publish.as_ref().is_some_and(|h| h.is_finished()) {
            let res = publish.take().unwrap().await?;
            let failed = res.iter().filter(|r| r.is_err()).count();
            anyhow::ensure!(failed == 0, "{failed} publishes failed");
            published_at = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t.elapsed();
    if let Some(h) = publish.take() {
        h.await?;
        published_at = Some(t.elapsed());
    }
    let load_after = loadavg();
    // Let the last `sent` updates commit, then check the rows.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM invitations WHERE status = 'sent'")
        .fetch_one(&ctx.db)
        .await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&ctx.db)
        .await?;

    let secs = elapsed.as_secs_f64();
    println!("### Run\n");
    println!("- machine: {} CPUs; PostgreSQL {version}", num_cpus());
    println!(
        "- email batch {} (linger {:?}), worker concurrency {}, SMTP pool {}, DB pool {}, partner send rate off, publish parallelism {publish_par}",
        cfg.email_batch, cfg.email_linger, cfg.worker_concurrency, cfg.smtp_pool_size, cfg.db_max_connections
    );
    println!("- load average (1, 5, 15 min) before: {load_before}; after: {load_after}");
    println!();
    println!("| case | result |\n|---|---|");
    println!(
        "| {n} invitation emails, first publish → last accepted by the sink | **{:.0} ms**, **{:.0} emails/s** |",
        secs * 1000.0,
        n as f64 / secs
    );
    println!(
        "| publishing {n} commands (confirmed) | {:.0} ms |",
        published_at
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    );
    println!(
        "| SMTP connections opened (`sink.connections()`) | {} |",
        sink.connections()
    );
    println!("| invitations `sent` in Postgres | {sent} of {n} |");

    running.shutdown().await;
    let _ = ctx.broker.delete_topology().await;
    ctx.broker.close().await;
    ctx.db.close().await;
    sink.shutdown();
    drop_db_unless_kept(&mut admin, &db).await?;
    Ok(())
}
