//! API keys: generated with 256 random bits, shown once, stored as SHA-256.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Partner,
    Upstream,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Partner => "partner",
            Role::Upstream => "upstream",
            Role::Operator => "operator",
        }
    }
    fn parse(s: &str) -> Option<Role> {
        match s {
            "partner" => Some(Role::Partner),
            "upstream" => Some(Role::Upstream),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: Option<Uuid>,
    pub role: Role,
    pub partner_id: Option<Uuid>,
}

impl Principal {
    /// Stable label for audit entries, timelines and idempotency scopes.
    pub fn label(&self) -> String {
        match (self.role, self.partner_id, self.key_id) {
            (Role::Partner, Some(p), _) => format!("partner:{p}"),
            (r, _, Some(k)) => format!("{}:{k}", r.as_str()),
            (r, _, None) => format!("{}:bootstrap", r.as_str()),
        }
    }
}

pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

pub fn generate_token(role: Role) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let tag = match role {
        Role::Partner => "pk",
        Role::Upstream => "uk",
        Role::Operator => "ok",
    };
    format!(
        "prereg_{tag}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Creates a key and returns (key id, the token, shown only now).
pub async fn issue(
    conn: &mut PgConnection,
    role: Role,
    partner_id: Option<Uuid>,
    label: Option<&str>,
) -> Result<(Uuid, String), sqlx::Error> {
    let token = generate_token(role);
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO api_keys (id, key_hash, role, partner_id, label) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(hash_token(&token))
    .bind(role.as_str())
    .bind(partner_id)
    .bind(label)
    .execute(conn)
    .await?;
    Ok((id, token))
}

/// Revokes every live key of a partner (key rotation) except `keep`.
pub async fn revoke_partner_keys(
    conn: &mut PgConnection,
    partner_id: Uuid,
    keep: Uuid,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE partner_id = $1 AND id <> $2 AND revoked_at IS NULL")
        .bind(partner_id)
        .bind(keep)
        .execute(conn)
        .await?;
    Ok(r.rows_affected())
}

/// A stored key as operators list it (never the key itself).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct KeyInfo {
    pub id: Uuid,
    pub role: String,
    pub label: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every key of a role, newest first, revoked ones included.
pub async fn list(pool: &PgPool, role: Role) -> Result<Vec<KeyInfo>, sqlx::Error> {
    sqlx::query_as::<_, KeyInfo>(
        "SELECT id, role, label, created_at, revoked_at FROM api_keys WHERE role = $1 ORDER BY created_at DESC, id DESC",
    )
    .bind(role.as_str())
    .fetch_all(pool)
    .await
}

/// Revokes one key of `role`; false when there is no such live key.
pub async fn revoke(conn: &mut PgConnection, id: Uuid, role: Role) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND role = $2 AND revoked_at IS NULL",
    )
    .bind(id)
    .bind(role.as_str())
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn lookup(pool: &PgPool, token: &str) -> Result<Option<Principal>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, role, partner_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash_token(token))
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|r| {
        Some(Principal {
            key_id: Some(r.get("id")),
            role: Role::parse(r.get::<&str, _>("role"))?,
            partner_id: r.get("partner_id"),
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let a = generate_token(Role::Partner);
        let b = generate_token(Role::Partner);
        assert_ne!(a, b);
        assert!(a.starts_with("prereg_pk_") && a.len() >= 10 + 43);
        assert_eq!(hash_token(&a).len(), 32);
        assert_ne!(hash_token(&a), hash_token(&b));
    }
}
