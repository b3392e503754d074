//! What the bench targets share: settings from the environment, the load
//! average they report, and the throw-away database each one runs in.

use sqlx::PgConnection;

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The CPUs this process may use (1 if unknown).
pub fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `BENCH_DB` goes into SQL as an identifier: only lower-case letters and `_`.
pub fn check_db_name(db: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        db.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
        "BENCH_DB must be a plain identifier"
    );
    Ok(())
}

/// Drops `db` if it exists and creates it empty.
pub async fn recreate_db(admin: &mut PgConnection, db: &str) -> anyhow::Result<()> {
    drop_db(admin, db).await?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut *admin)
        .await?;
    Ok(())
}

/// Drops `db` at the end of a run, unless `BENCH_KEEP_DB` is set.
pub async fn drop_db_unless_kept(admin: &mut PgConnection, db: &str) -> anyhow::Result<()> {
    if std::env::var("BENCH_KEEP_DB").is_err() {
        drop_db(admin, db).await?;
    }
    Ok(())
}

async fn drop_db(admin: &mut PgConnection, db: &str) -> anyhow::Result<()> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(admin)
        .await?;
    Ok(())
}
