//! History records: every invited customer of a partner with its current
//! state; and the export of them as CSV.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgExecutor, Postgres, QueryBuilder};
use uuid::Uuid;

/// The state a history record shows.
pub const STATES: &[&str] = &[
    "invited",
    "link_expired",
    "associated",
    "association_failed",
    "claim_expired",
];

pub const STATE_SQL: &str = "CASE
    WHEN p.status = 'associated' THEN 'associated'
    WHEN p.status = 'association_failed' THEN 'association_failed'
    WHEN p.status = 'expired' THEN 'claim_expired'
    WHEN p.status = 'invited' AND p.link_expires_at <= now() THEN 'link_expired'
    WHEN p.status = 'invited' THEN 'invited'
    ELSE p.status END";

#[derive(Debug, Clone, FromRow)]
pub struct Record {
    pub id: Uuid,
    pub full_name: String,
    pub email: String,
    pub mobile: String,
    pub state: String,
    pub reason_code: Option<String>,
    pub last_method: Option<String>,
    pub invited_at: Option<DateTime<Utc>>,
    pub link_expires_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub remarks: Option<String>,
    pub account_id: Option<String>,
    pub manager_id: Option<Uuid>,
    pub manager_name: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Filter {
    pub q: Option<String>,
    pub state: Option<String>,
    pub method: Option<String>,
    pub tag: Option<String>,
    pub account_manager: Option<Uuid>,
    #[serde(skip)]
    pub cursor: Option<(DateTime<Utc>, Uuid)>,
}

/// The SELECT with only the conditions asked for, so that every search gets
/// a plan for its own predicates (trigram index for `q`, keyset order else).
pub fn query(partner_id: Uuid, f: &Filter, limit: Option<i64>) -> QueryBuilder<'static, Postgres> {
    let mut qb = QueryBuilder::new(format!(
        "SELECT p.id, p.full_name, p.email, p.mobile, {STATE_SQL} AS state, p.reason_code, p.last_method, p.invited_at,
            p.link_expires_at, p.expires_at, p.tags, p.remarks, p.account_id, am.id AS manager_id, am.name AS manager_name
         FROM preregistrations p LEFT JOIN account_managers am ON am.id = p.account_manager_id
         WHERE p.invited_at IS NOT NULL AND p.status <> 'deleted' AND p.partner_id = "
    ));
    qb.push_bind(partner_id);
    if let Some(q) = f.q.as_ref().filter(|q| !q.is_empty()) {
        qb.push(" AND p.search_text LIKE ");
        qb.push_bind(format!(
            "%{}%",
            super::preregs::escape_like(&q.to_lowercase())
        ));
    }
    if let Some(m) = &f.method {
        qb.push(" AND p.last_method = ");
        qb.push_bind(m.clone());
    }
    if let Some(t) = &f.tag {
        qb.push(" AND p.tags @> ARRAY[");
        qb.push_bind(t.clone());
        qb.push("]::text[]");
    }
    if let Some(am) = f.account_manager {
        qb.push(" AND p.account_manager_id = ");
        qb.push_bind(am);
    }
    match f.state.as_deref() {
        Some("invited") => qb.push(" AND p.status = 'invited' AND (p.link_expires_at IS NULL OR p.link_expires_at > now())"),
        Some("link_expired") => qb.push(" AND p.status = 'invited' AND p.link_expires_at <= now()"),
        Some("associated") => qb.push(" AND p.status = 'associated'"),
        Some("association_failed") => qb.push(" AND p.status = 'association_failed'"),
        Some("claim_expired") => qb.push(" AND p.status = 'expired'"),
        _ => &mut qb,
    };
    if let Some((at, id)) = f.cursor {
        qb.push(" AND (p.invited_at, p.id) < (");
        qb.push_bind(at);
        qb.push(", ");
        qb.push_bind(id);
        qb.push(")");
    }
    qb.push(" ORDER BY p.invited_at DESC, p.id DESC");
    if let Some(n) = limit {
        qb.push(" LIMIT ");
        qb.push_bind(n);
    }
    qb
}

pub async fn page<'e>(
    db: impl PgExecutor<'e>,
    partner_id: Uuid,
    f: &Filter,
    limit: i64,
) -> Result<Vec<Record>, sqlx::Error> {
    // Not a reused prepared statement: a plan made for a rare search term
    // (trigram index) is ruinous for a common one (keyset order), and the
    // other way round. Planning each search costs ~0.3 ms.
    query(partner_id, f, Some(limit))
        .build_query_as::<Record>()
        .persistent(false)
        .fetch_all(db)
        .await
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Export {
    pub id: Uuid,
    pub partner_id: Uuid,
    pub status: String,
    pub rows: Option<i64>,
    pub bytes: Option<i64>,
    pub failure: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

pub async fn get_export<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
) -> Result<Option<Export>, sqlx::Error> {
    sqlx::query_as::<_, Export>(
        "SELECT id, partner_id, status, rows, bytes, failure, created_at, started_at, completed_at, expires_at FROM exports WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Removes the files of exports past their retention. Returns how many.
pub async fn expire_exports<'e>(db: impl PgExecutor<'e>) -> Result<u64, sqlx::Error> {
    // Chunks go with ON DELETE CASCADE only when the export row goes; keep the
    // row (its state stays readable) and drop the data.
    let r = sqlx::query(
        "WITH due AS (
             UPDATE exports SET status = 'expired' WHERE status = 'completed' AND expires_at <= now() RETURNING id)
         DELETE FROM export_chunks WHERE export_id IN (SELECT id FROM due)",
    )
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// One CSV field: quoted when it holds a separator, quote or line break; a
/// field starting with `=`, `+`, `-`, `@`, a tab or a carriage return is
/// prefixed with `'` so that no spreadsheet runs it as a formula (SPEC §8;
/// this includes masked mobiles such as `'+86*******0000`).
pub fn csv_field(out: &mut String, value: &str) {
    let guarded;
    let v = if formula_start(value) {
        guarded = format!("'{value}");
        guarded.as_str()
    } else {
        value
    };
    if v.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

/// Whether a spreadsheet could read `value` as a formula.
pub fn formula_start(value: &str) -> bool {
    value.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

pub fn csv_row(out: &mut String, fields: &[&str]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(out, f);
    }
    out.push_str("\r\n");
}

/// Serialises export requests of one partner (until the transaction ends),
/// so two requests cannot both pass the limit.
pub async fn lock_partner_exports(
    conn: &mut sqlx::PgConnection,
    partner_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('exports:' || $1::text, 0))")
        .bind(partner_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The partner's exports still pending or running (of the last day).
pub async fn active_exports(
    conn: &mut sqlx::PgConnection,
    partner_id: Uuid,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM exports WHERE partner_id = $1 AND status IN {}
           AND created_at > now() - interval '1 day'",
        super::sets::exports_active()
    ))
    .bind(partner_id)
    .fetch_one(conn)
    .await
}

pub async fn insert_export(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    partner_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO exports (id, partner_id, status) VALUES ($1, $2, 'pending')")
        .bind(id)
        .bind(partner_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The export (re)starts: `running`, its earlier chunks gone.
pub async fn start_export(conn: &mut sqlx::PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE exports SET status = 'running', started_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM export_chunks WHERE export_id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn put_chunk<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
    seq: i32,
    data: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO export_chunks (export_id, seq, data) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(seq)
        .bind(data)
        .execute(db)
        .await?;
    Ok(())
}

/// One chunk of an export's file, `None` past the last.
pub async fn chunk<'e>(
    db: impl PgExecutor<'e>,
    id: Uuid,
    seq: i32,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar("SELECT data FROM export_chunks WHERE export_id = $1 AND seq = $2")
        .bind(id)
        .bind(seq)
        .fetch_optional(db)
        .await
}

pub async fn complete_export(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    rows: i64,
    bytes: i64,
    retention: chrono::Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE exports SET status = 'completed', rows = $2, bytes = $3, completed_at = now(), expires_at = now() + $4 WHERE id = $1",
    )
    .bind(id)
    .bind(rows)
    .bind(bytes)
    .bind(retention)
    .execute(conn)
    .await?;
    Ok(())
}

/// A pending or running export failed: its chunks are removed.
pub async fn fail_export<'e, E: PgExecutor<'e> + Copy>(
    db: E,
    id: Uuid,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE exports SET status = 'failed', failure = $2 WHERE id = $1 AND status IN {}",
        super::sets::exports_active()
    ))
    .bind(id)
    .bind(error)
    .execute(db)
    .await?;
    sqlx::query("DELETE FROM export_chunks WHERE export_id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_escaping() {
        let mut s = String::new();
        csv_row(
            &mut s,
            &[
                "a",
                "b,c",
                "say \"hi\"",
                "line\nbreak",
                "=SUM(A1)",
                "+86*******0000",
                "+cmd",
                "-x",
            ],
        );
        assert_eq!(
            s,
            "a,\"b,c\",\"say \"\"hi\"\"\",\"line\nbreak\",'=SUM(A1),'+86*******0000,'+cmd,'-x\r\n"
        );
    }

    #[test]
    fn formula_guard_covers_issue_10_item_6() {
        for (input, want) in [
            ("-1+cmd|' /C calc'!A0", "'-1+cmd|' /C calc'!A0"),
            (
                "+1+HYPERLINK(\"http://x\")",
                "\"'+1+HYPERLINK(\"\"http://x\"\")\"",
            ),
            ("\t=1+1", "'\t=1+1"),
            ("\r=1+1", "\"'\r=1+1\""),
            ("@SUM(1)", "'@SUM(1)"),
            ("plain", "plain"),
        ] {
            let mut s = String::new();
            csv_field(&mut s, input);
            assert_eq!(s, want, "{input:?}");
        }
    }
}
