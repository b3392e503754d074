//! Start-up steps whose failures a person must be able to act on: each error
//! names what failed, where, and the variable to change.

use sqlx::{migrate::MigrateDatabase, postgres::PgConnectOptions, Postgres};

use crate::Ctx;

/// `host:port/database` of a Postgres URL, without the password.
pub fn pg_where(url: &str) -> String {
    match url.parse::<PgConnectOptions>() {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("postgres")
        ),
        Err(_) => "(an unparsable URL)".into(),
    }
}

/// Creates the database of `url` when it does not exist yet.
pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let exists = Postgres::database_exists(url).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach PostgreSQL at {} ({}); start it (scripts/dev.sh does) or set PREREG_DATABASE_URL",
            pg_where(url),
            one_line(&e.to_string())
        )
    })?;
    if !exists {
        Postgres::create_database(url).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot create the database {} ({}); create it by hand or set PREREG_DATABASE_URL",
                pg_where(url),
                one_line(&e.to_string())
            )
        })?;
        tracing::info!(database = %pg_where(url), "database created");
    }
    Ok(())
}

/// Applies the migrations, with an error that says what to do.
pub async fn migrate(ctx: &Ctx) -> anyhow::Result<()> {
    let url = &ctx.cfg.database_url;
    crate::store::migrate(&ctx.db).await.map_err(|e| {
        let text = one_line(&e.to_string());
        if text.contains("does not exist") {
            anyhow::anyhow!(
                "the database {} does not exist: run `prereg migrate` (it creates it) or set PREREG_DATABASE_URL",
                pg_where(url)
            )
        } else {
            anyhow::anyhow!(
                "migrating {} failed: {text} (PREREG_DATABASE_URL)",
                pg_where(url)
            )
        }
    })?;
    tracing::info!(database = %pg_where(url), "migrations applied");
    Ok(())
}

/// An error text on one line, with repeats of the same clause removed
/// (`sqlx` nests the server's message inside its own).
pub fn one_line(text: &str) -> String {
    let flat = text.replace(['\n', '\r'], " ");
    let mut seen: Vec<String> = Vec::new();
    for part in flat.split(": ") {
        let p = part.trim().to_string();
        if !p.is_empty() && !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen.join(": ")
}

/// Binds `addr` for `what`, or says which variable moves it.
pub async fn bind(
    addr: std::net::SocketAddr,
    what: &str,
    var: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen for {what} on {addr}: the address is already in use (another process?); set {var} to another address, e.g. {var}=127.0.0.1:0 for any free port"
            )
        } else {
            anyhow::anyhow!("cannot listen for {what} on {addr}: {e}; set {var}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_hides_the_password() {
        assert_eq!(
            pg_where("postgres://u:secret@db.example:6543/prereg"),
            "db.example:6543/prereg"
        );
    }

    #[test]
    fn one_line_drops_repeats() {
        assert_eq!(
            one_line("error returned from database: database \"x\" does not exist: database \"x\" does not exist\n"),
            "error returned from database: database \"x\" does not exist"
        );
    }
}
