//! History benchmark: 1,000,000 history records over 100 partners (the
//! biggest with 100,000); page latency of `store::history::page` for
//! representative filters, the plan of a search, and the CSV export of the
//! biggest partner through `workers::export::handle` with its memory.
//!
//!   cargo bench --bench history                    # or scripts/bench-history.sh
//!   BENCH_RECORDS=1000000 BENCH_BIG=100000 BENCH_REQUESTS=35 cargo bench --bench history
//!
//! Recreates the database `BENCH_DB` (default `prereg_bench_history`) on
//! `BENCH_PG`. Needs only PostgreSQL. Prints Markdown for docs/benchmarks.md.

mod common;

use common::{check_db_name, drop_db_unless_kept, env_or, loadavg, num_cpus, recreate_db};
use std::time::{Duration, Instant};

use prereg::{
    store::history::{self, Filter},
    workers::export::{self, ExportRequested},
    Config, Ctx,
};
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

const LIMIT: i64 = 51; // the API's default page of 50, plus one to know there is a next page

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("history benchmark: run with `cargo bench --bench history`");
        return Ok(());
    }
    let pg = env_or("BENCH_PG", "postgres://postgres@127.0.0.1:5432");
    let db = env_or("BENCH_DB", "prereg_bench_history");
    let records: i64 = env_or("BENCH_RECORDS", "1000000").parse()?;
    let big: i64 = env_or("BENCH_BIG", "100000").parse()?;
    let reps: usize = env_or("BENCH_REQUESTS", "35").parse()?;
    check_db_name(&db)?;
    anyhow::ensure!(big <= records);

    let mut admin = PgConnection::connect(&format!("{pg}/postgres")).await?;
    recreate_db(&mut admin, &db).await?;
    let mut cfg = Config::from_env().unwrap_or_default();
    // BENCH_DB_URL_SUFFIX, e.g. `?options=-c%20plan_cache_mode%3Dforce_custom_plan`.
    cfg.database_url = format!("{pg}/{db}{}", env_or("BENCH_DB_URL_SUFFIX", ""));
    cfg.job_timeout = Duration::from_secs(600);
    // The fill is one statement over a million rows: no statement timeout.
    cfg.db_statement_timeout = Duration::ZERO;
    let ctx = Ctx::new(cfg)?;
    prereg::store::migrate(&ctx.db).await?;

    eprintln!("filling {records} history records…");
    let t = Instant::now();
    let (big_id, small_id) = fill(&ctx, records, big).await?;
    let fill_secs = t.elapsed().as_secs_f64();
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&ctx.db)
        .await?;

    // Cursor of page 3 (after two pages of 50).
    let p1 = history::page(&ctx.db, big_id, &Filter::default(), 50).await?;
    let last = p1.last().unwrap();
    let f2 = Filter {
        cursor: Some((last.invited_at.unwrap(), last.id)),
        ..Default::default()
    };
    let p2 = history::page(&ctx.db, big_id, &f2, 50).await?;
    let last = p2.last().unwrap();
    let page3 = Filter {
        cursor: Some((last.invited_at.unwrap(), last.id)),
        ..Default::default()
    };

    let few_q = env_or("BENCH_Q_FEW", "zebra");
    let many_q = env_or("BENCH_Q_MANY", "gmail");
    let cases: Vec<(String, Filter)> = vec![
        ("no filter (first page)".into(), Filter::default()),
        (
            format!("q = \"{few_q}\""),
            Filter {
                q: Some(few_q.clone()),
                ..Default::default()
            },
        ),
        (
            format!("q = \"{many_q}\""),
            Filter {
                q: Some(many_q.clone()),
                ..Default::default()
            },
        ),
        (
            "method = offline".into(),
            Filter {
                method: Some("offline".into()),
                ..Default::default()
            },
        ),
        (
            "state = association_failed".into(),
            Filter {
                state: Some("association_failed".into()),
                ..Default::default()
            },
        ),
        (
            format!("q = \"{few_q}\" + state = associated"),
            Filter {
                q: Some(few_q.clone()),
                state: Some("associated".into()),
                ..Default::default()
            },
        ),
        ("page 3 (keyset cursor)".into(), page3),
    ];

    let load_before = loadavg();
    let mut results = Vec::new();
    let mut all = Vec::new();
    for (name, f) in &cases {
        // Warm-up.
        let rows = history::page(&ctx.db, big_id, f, LIMIT).await?.len();
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            let r = history::page(&ctx.db, big_id, f, LIMIT).await?;
            times.push(t.elapsed());
            std::hint::black_box(r);
        }
        all.extend(times.iter().copied());
        times.sort();
        // How many of the partner's records the filter matches, counted in
        // the database rather than assumed from how the table was filled.
        let matching = count_matching(&ctx, big_id, f).await?;
        results.push((
            format!("{name} ({matching} match)"),
            rows,
            pct(&times, 50),
            pct(&times, 95),
            times[times.len() - 1],
        ));
    }
    all.sort();
    let load_after = loadavg();

    let search = |q: &str| Filter {
        q: Some(q.to_string()),
        ..Default::default()
    };
    let few_plan = explain(&ctx, big_id, &search(&few_q)).await?;
    let many_plan = explain(&ctx, big_id, &search(&many_q)).await?;

    // Export: a small partner first, then the big one; VmHWM after each.
    let rss0 = status_kb("VmRSS:");
    let hwm0 = status_kb("VmHWM:");
    let (small_ms, small_rows, small_bytes) = run_export(&ctx, small_id).await?;
    let hwm1 = status_kb("VmHWM:");
    let load_export = loadavg();
    let (big_ms, big_rows, big_bytes) = run_export(&ctx, big_id).await?;
    let hwm2 = status_kb("VmHWM:");

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("### Run\n");
    println!("- machine: {} CPUs; PostgreSQL {version}", num_cpus());
    println!("- table: {records} history records over 100 partners (biggest {big}), filled in {fill_secs:.1} s, then `VACUUM ANALYZE`");
    println!("- {reps} timed requests per case after one warm-up, page of 50 (+1), one connection at a time");
    println!("- load average (1, 5, 15 min) before: {load_before}; after the searches: {load_after}; before the big export: {load_export}");
    println!();
    println!(
        "| filter (partner with {big} records) | rows | p50 | p95 | max |\n|---|---|---|---|---|"
    );
    for (name, rows, p50, p95, max) in &results {
        println!(
            "| {name} | {rows} | {:.2} ms | **{:.2} ms** | {:.2} ms |",
            ms(*p50),
            ms(*p95),
            ms(*max)
        );
    }
    println!(
        "| all {} requests | | {:.2} ms | **{:.2} ms** | {:.2} ms |",
        all.len(),
        ms(pct(&all, 50)),
        ms(pct(&all, 95)),
        ms(all[all.len() - 1])
    );
    println!();
    println!("| export | rows | bytes | time | peak RSS (VmHWM) after |\n|---|---|---|---|---|");
    println!(
        "| (process before exports: RSS {} KiB, VmHWM {} KiB) | | | | |",
        rss0, hwm0
    );
    println!("| small partner | {small_rows} | {small_bytes} | {small_ms:.0} ms | {hwm1} KiB (+{} KiB) |", hwm1.saturating_sub(hwm0));
    println!("| biggest partner | {big_rows} | {big_bytes} | **{big_ms:.0} ms** | {hwm2} KiB (+{} KiB over the small export) |", hwm2.saturating_sub(hwm1));
    println!("\n### Plan of q = \"{few_q}\" (EXPLAIN ANALYZE, BUFFERS)\n");
    println!("```\n{few_plan}\n```");
    println!("\n### Plan of q = \"{many_q}\" (EXPLAIN ANALYZE, BUFFERS)\n");
    println!("```\n{many_plan}\n```");

    ctx.db.close().await;
    drop_db_unless_kept(&mut admin, &db).await?;
    Ok(())
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    let i = ((sorted.len() * p).div_ceil(100))
        .saturating_sub(1)
        .min(sorted.len() - 1);
    sorted[i]
}

async fn run_export(ctx: &Ctx, partner: Uuid) -> anyhow::Result<(f64, i64, i64)> {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO exports (id, partner_id, status) VALUES ($1, $2, 'pending')")
        .bind(id)
        .bind(partner)
        .execute(&ctx.db)
        .await?;
    let t = Instant::now();
    export::handle(ctx, ExportRequested { export_id: id })
        .await
        .map_err(|e| anyhow::anyhow!("export: {e:?}"))?;
    let elapsed = t.elapsed().as_secs_f64() * 1000.0;
    let e = history::get_export(&ctx.db, id).await?.unwrap();
    anyhow::ensure!(e.status == "completed", "export {}", e.status);
    Ok((elapsed, e.rows.unwrap_or(0), e.bytes.unwrap_or(0)))
}

async fn explain(ctx: &Ctx, partner: Uuid, f: &Filter) -> anyhow::Result<String> {
    let sql = format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        history::query(partner, f, Some(LIMIT)).sql()
    );
    let pattern = format!("%{}%", f.q.clone().unwrap_or_default().to_lowercase());
    let rows = sqlx::query(&sql)
        .bind(partner)
        .bind(pattern)
        .bind(LIMIT)
        .fetch_all(&ctx.db)
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// 100 partners: the first has `big` records, the others share the rest.
async fn fill(ctx: &Ctx, records: i64, big: i64) -> anyhow::Result<(Uuid, Uuid)> {
    sqlx::query(
        "INSERT INTO partners (id, name, country, contact_email, created_at)
         SELECT gen_random_uuid(), 'Partner ' || i, 'CN', 'ops' || i || '@partner.example', now() - i * interval '1 second'
         FROM generate_series(1, 100) AS i",
    )
    .execute(&ctx.db)
    .await?;
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM partners ORDER BY created_at DESC")
        .fetch_all(&ctx.db)
        .await?;
    // States: invited (link live or expired), associated, association_failed,
    // expired; methods email / offline; every 5,000th has the rare word
    // "zebra" in its remarks; half the emails are @gmail.
    sqlx::query(
        "WITH p AS (SELECT array_agg(id ORDER BY created_at DESC) AS ids FROM partners)
         INSERT INTO preregistrations (id, partner_id, full_name, email, mobile, email_norm, mobile_norm, status,
              reason_code, association_type, locale, tags, remarks, created_at, decided_at, preregistered_at,
              expires_at, updated_at, invited_at, last_method, link_expires_at, search_text)
         SELECT gen_random_uuid(), CASE WHEN i <= $2 THEN p.ids[1] ELSE p.ids[2 + i % 99] END,
                x.full_name, x.email, x.mobile, x.email, x.mobile, x.status,
                CASE WHEN x.status = 'association_failed' THEN 'already_associated' END,
                'reseller', 'en', x.tags, x.remarks,
                x.at, x.at, x.at, x.at + interval '15 days', x.at, x.at + interval '1 minute',
                CASE WHEN i % 4 = 0 THEN 'offline' ELSE 'email' END,
                CASE WHEN i % 4 = 0 THEN NULL ELSE x.at + interval '7 days' END,
                lower(concat_ws(' ', x.full_name, x.email, x.remarks, array_to_string(x.tags, ' ')))
         FROM p, generate_series(1, $1) AS i,
              LATERAL (SELECT 'Customer ' || i AS full_name,
                              'c' || i || CASE WHEN i % 2 = 0 THEN '@gmail.example' ELSE '@corp' || (i % 37) || '.example' END AS email,
                              '+86139' || lpad(i::text, 8, '0') AS mobile,
                              (ARRAY['invited', 'invited', 'associated', 'association_failed', 'expired'])[1 + i % 5] AS status,
                              CASE WHEN i % 3 = 0 THEN ARRAY['vip', 'q' || (i % 10)] ELSE ARRAY['q' || (i % 10)] END AS tags,
                              CASE WHEN i % 5000 = 0 THEN 'met at the zebra conference'
                                   WHEN i % 7 = 0 THEN 'follow up after trial' END AS remarks,
                              now() - (i % 40) * interval '1 day' - (i % 86400) * interval '1 second' AS at) x",
    )
    .bind(records)
    .bind(big)
    .execute(&ctx.db)
    .await?;
    sqlx::query("VACUUM ANALYZE").execute(&ctx.db).await?;
    Ok((ids[0], ids[1]))
}

/// Every record of `partner` the filter selects (no page limit), streamed.
async fn count_matching(ctx: &Ctx, partner: Uuid, f: &Filter) -> anyhow::Result<usize> {
    use futures::TryStreamExt;
    let unpaged = Filter {
        cursor: None,
        ..f.clone()
    };
    let mut qb = history::query(partner, &unpaged, None);
    let mut rows = qb.build().fetch(&ctx.db);
    let mut n = 0;
    while rows.try_next().await?.is_some() {
        n += 1;
    }
    Ok(n)
}
