//! `Idempotency-Key`: a retried command returns the first answer.

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, Row};

#[derive(Debug, Clone)]
pub struct Stored {
    pub status: u16,
    pub body: Value,
    pub location: Option<String>,
}

pub enum Claim {
    /// First use of the key: go ahead (the answer is stored with `save`).
    New,
    /// Seen before with the same request: here is the first answer.
    Replay(Stored),
    /// Seen before with a different request.
    Mismatch,
}

pub fn request_hash(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().to_vec()
}

/// Looks the key up inside the caller's transaction. A concurrent first use of
/// the same key blocks on the primary key until the other commits.
pub async fn check(
    conn: &mut PgConnection,
    principal: &str,
    key: &str,
    hash: &[u8],
) -> Result<Claim, sqlx::Error> {
    let row = sqlx::query("SELECT request_hash, status, body, location FROM idempotency_keys WHERE principal = $1 AND key = $2")
        .bind(principal)
        .bind(key)
        .fetch_optional(conn)
        .await?;
    Ok(match row {
        None => Claim::New,
        Some(r) if r.get::<Vec<u8>, _>("request_hash") == hash => Claim::Replay(Stored {
            status: r.get::<i16, _>("status") as u16,
            body: r.get("body"),
            location: r.get("location"),
        }),
        Some(_) => Claim::Mismatch,
    })
}

pub async fn forget(
    conn: &mut PgConnection,
    principal: &str,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2")
        .bind(principal)
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

/// Claims the key for this request, inside the caller's transaction (the row
/// stays locked until it commits or rolls back). A concurrent request with
/// the same key blocks here until then; afterwards it sees the first answer,
/// or — if the first rolled back — claims the key itself.
pub async fn claim(
    conn: &mut PgConnection,
    principal: &str,
    key: &str,
    hash: &[u8],
) -> Result<Claim, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (principal, key, request_hash, status, body) VALUES ($1, $2, $3, 0, 'null')
         ON CONFLICT (principal, key) DO NOTHING",
    )
    .bind(principal)
    .bind(key)
    .bind(hash)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Claim::New);
    }
    Ok(match check(conn, principal, key, hash).await? {
        // Claimed and committed without an answer: not written by this code;
        // do not run the command a second time.
        Claim::Replay(s) if s.status == 0 => Claim::Replay(Stored {
            status: 409,
            body: serde_json::json!({"error": {"code": "idempotency_key_in_use",
                "message": "a request with this Idempotency-Key has no recorded answer"}}),
            location: None,
        }),
        // Withdrawn between the insert and the read: the key is free again.
        Claim::New => return Box::pin(claim(conn, principal, key, hash)).await,
        other => other,
    })
}

/// Records the answer of a claimed key (same transaction as the command).
pub async fn answer(
    conn: &mut PgConnection,
    principal: &str,
    key: &str,
    answer: &Stored,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE idempotency_keys SET status = $3, body = $4, location = $5 WHERE principal = $1 AND key = $2",
    )
    .bind(principal)
    .bind(key)
    .bind(answer.status as i16)
    .bind(&answer.body)
    .bind(answer.location.as_deref())
    .execute(conn)
    .await?;
    Ok(())
}
