//! Expiry sweep benchmark: 1,000,000 claims of which 100,000 are due; one
//! full sweep, then sweeps with nothing due, with the query plans.
//!
//!   cargo bench --bench sweep                      # or scripts/bench-sweep.sh
//!   BENCH_CLAIMS=1000000 BENCH_DUE=100000 PREREG_SWEEP_BATCH=5000 cargo bench --bench sweep
//!
//! Recreates the database `BENCH_DB` (default `prereg_bench_sweep`) on
//! `BENCH_PG` (default `postgres://postgres@127.0.0.1:5432`). Prints Markdown
//! for docs/benchmarks.md. Needs only PostgreSQL (the sweep writes its events
//! to the outbox; nothing is published).

mod common;

use common::{check_db_name, drop_db_unless_kept, env_or, loadavg, num_cpus, recreate_db};
use std::time::{Duration, Instant};

use prereg::{workers::sweeps, Config, Ctx};
use sqlx::{Connection, PgConnection, Row};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs bench targets without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("sweep benchmark: run with `cargo bench --bench sweep`");
        return Ok(());
    }
    let pg = env_or("BENCH_PG", "postgres://postgres@127.0.0.1:5432");
    let db = env_or("BENCH_DB", "prereg_bench_sweep");
    let claims: i64 = env_or("BENCH_CLAIMS", "1000000").parse()?;
    let due: i64 = env_or("BENCH_DUE", "100000").parse()?;
    check_db_name(&db)?;
    anyhow::ensure!(due <= claims, "BENCH_DUE must not exceed BENCH_CLAIMS");

    let mut admin = PgConnection::connect(&format!("{pg}/postgres")).await?;
    recreate_db(&mut admin, &db).await?;
    let mut cfg = Config::from_env().unwrap_or_default();
    cfg.database_url = format!("{pg}/{db}");
    cfg.job_timeout = Duration::from_secs(600);
    // The fill is one statement over a million rows: no statement timeout.
    cfg.db_statement_timeout = Duration::ZERO;
    let ctx = Ctx::new(cfg)?;
    prereg::store::migrate(&ctx.db).await?;

    eprintln!("filling {claims} claims ({due} due)…");
    let t = Instant::now();
    fill(&ctx, claims, due).await?;
    let fill_secs = t.elapsed().as_secs_f64();
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&ctx.db)
        .await?;

    let plan_due = explain_rolled_back(&ctx, ctx.cfg.sweep_batch).await?;

    let load_before = loadavg();
    eprintln!("sweeping…");
    let t = Instant::now();
    let stats = sweeps::run(&ctx).await?;
    let full = t.elapsed();
    // Each figure counted in the database on its own, not taken from the
    // sweep's own tally: the report must show what was written.
    let claims_expired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM preregistrations WHERE status = 'expired'")
            .fetch_one(&ctx.db)
            .await?;
    let timeline_written: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM preregistration_events WHERE to_status = 'expired'",
    )
    .fetch_one(&ctx.db)
    .await?;
    let outbox_written: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE routing_key = 'preregistration.expired'",
    )
    .fetch_one(&ctx.db)
    .await?;
    anyhow::ensure!(
        claims_expired == due && stats.claims_expired == due as u64,
        "expired {claims_expired} of {due} (the sweep reported {})",
        stats.claims_expired
    );

    // Nothing due: warm once, then measure.
    sweeps::run(&ctx).await?;
    let mut idle = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let s = sweeps::run(&ctx).await?;
        idle.push(t.elapsed());
        anyhow::ensure!(s.claims_expired == 0 && s.reminders == 0);
    }
    idle.sort();
    let plan_none = explain_rolled_back(&ctx, ctx.cfg.sweep_batch).await?;
    let plan_reminder = explain_reminder(&ctx).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM preregistrations")
        .fetch_one(&ctx.db)
        .await?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    println!("### Run\n");
    println!("- machine: {} CPUs; PostgreSQL {version}", num_cpus());
    println!(
        "- table: {rows} pre-registrations ({due} due, {} not due), filled in {fill_secs:.1} s, then `VACUUM ANALYZE`",
        claims - due
    );
    println!(
        "- batch size (`PREREG_SWEEP_BATCH`): {}; parallel batch loops (`PREREG_SWEEP_PARALLELISM`): {}",
        ctx.cfg.sweep_batch, ctx.cfg.sweep_parallelism
    );
    println!(
        "- load average (1, 5, 15 min) before the sweep: {load_before}; after the idle runs: {}",
        loadavg()
    );
    println!();
    println!("| case | result |\n|---|---|");
    println!(
        "| one sweep, {due} due | **{:.0} ms** ({} batches; {} claims expired, {} timeline entries and {} outbox events written) |",
        ms(full),
        stats.batches,
        claims_expired,
        timeline_written,
        outbox_written
    );
    println!(
        "| one sweep, none due (20 runs) | median **{:.2} ms**, min {:.2} ms, max {:.2} ms |",
        ms(idle[idle.len() / 2]),
        ms(idle[0]),
        ms(idle[idle.len() - 1])
    );
    println!(
        "\n### Plan of one batch with {due} rows due (EXPLAIN ANALYZE, BUFFERS; rolled back)\n"
    );
    println!("```\n{plan_due}\n```");
    println!("\n### Plan of one batch with none due\n");
    println!("```\n{plan_none}\n```");
    println!("\n### Plan of the claim-reminder probe with none due\n");
    println!("```\n{plan_reminder}\n```");

    ctx.db.close().await;
    drop_db_unless_kept(&mut admin, &db).await?;
    Ok(())
}

async fn fill(ctx: &Ctx, claims: i64, due: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO partners (id, name, country, contact_email)
         SELECT gen_random_uuid(), 'Partner ' || i, 'CN', 'ops' || i || '@partner.example'
         FROM generate_series(1, 1000) AS i",
    )
    .execute(&ctx.db)
    .await?;
    // Claims spread over partners and statuses; due ones expired up to a day
    // ago, the others expire 3 to 15 days ahead (beyond the 2-day reminder).
    sqlx::query(
        "WITH p AS (SELECT array_agg(id ORDER BY id) AS ids FROM partners)
         INSERT INTO preregistrations (id, partner_id, full_name, email, mobile, email_norm, mobile_norm, status,
              created_at, decided_at, preregistered_at, expires_at, updated_at)
         SELECT gen_random_uuid(), p.ids[1 + i % 1000], 'Customer ' || i,
                'c' || i || '@bench.example', '+86139' || lpad(i::text, 8, '0'),
                'c' || i || '@bench.example', '+86139' || lpad(i::text, 8, '0'),
                (ARRAY['preregistered', 'invited', 'association_failed'])[1 + i % 3],
                now() - interval '20 days', now() - interval '20 days', now() - interval '20 days',
                CASE WHEN i <= $2 THEN now() - (i % 1440) * interval '1 minute'
                     ELSE now() + interval '3 days' + (i % 12) * interval '1 day' + (i % 1440) * interval '1 minute' END,
                now() - interval '20 days'
         FROM p, generate_series(1, $1) AS i",
    )
    .bind(claims)
    .bind(due)
    .execute(&ctx.db)
    .await?;
    sqlx::query("VACUUM ANALYZE").execute(&ctx.db).await?;
    Ok(())
}

async fn explain_rolled_back(ctx: &Ctx, batch: i64) -> anyhow::Result<String> {
    let mut tx = ctx.db.begin().await?;
    let sql = format!(
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {}",
        sweeps::expire_claims_sql()
    );
    let rows = sqlx::query(&sql)
        .bind(batch)
        .bind("system:bench")
        .bind("urn:prereg")
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(lines(rows))
}

async fn explain_reminder(ctx: &Ctx) -> anyhow::Result<String> {
    let rows = sqlx::query(
        "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF)
         SELECT id FROM preregistrations
         WHERE status IN ('preregistered', 'invited', 'association_failed') AND expiry_reminder_sent_at IS NULL
           AND expires_at > now() AND expires_at <= now() + $1 * interval '1 millisecond'
         ORDER BY expires_at LIMIT 5000 FOR UPDATE SKIP LOCKED",
    )
    .bind(ctx.cfg.claim_reminder_before.as_millis() as i64)
    .fetch_all(&ctx.db)
    .await?;
    Ok(lines(rows))
}

fn lines(rows: Vec<sqlx::postgres::PgRow>) -> String {
    rows.iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n")
}
