//! Bearer-key authentication and role extractors.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{extract::FromRequestParts, http::request::Parts};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{error::ApiError, AppState};
use crate::store::keys::{self, Principal, Role};

/// Positive lookups are cached briefly: a revoked key stops working within
/// `TTL`.
const TTL: Duration = Duration::from_secs(10);
const MAX_ENTRIES: usize = 10_000;

#[derive(Default)]
pub struct KeyCache {
    map: Mutex<HashMap<Vec<u8>, (Principal, Instant)>>,
}

impl KeyCache {
    fn get(&self, hash: &[u8]) -> Option<Principal> {
        let map = self.map.lock().ok()?;
        map.get(hash)
            .filter(|(_, t)| t.elapsed() < TTL)
            .map(|(p, _)| p.clone())
    }
    fn put(&self, hash: Vec<u8>, p: Principal) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
            map.insert(hash, (p, Instant::now()));
        }
    }
    pub fn clear(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.clear();
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn authenticate(parts: &Parts, st: &AppState) -> Result<Principal, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(ApiError::unauthorized)?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 256)
        .ok_or_else(ApiError::unauthorized)?;
    let started = Instant::now();
    let r = authenticate_token(token, st).await;
    crate::stages::since(crate::stages::Stage::Authentication, started);
    r
}

/// Who a key belongs to (the bootstrap operator key, or a stored key).
pub async fn authenticate_token(token: &str, st: &AppState) -> Result<Principal, ApiError> {
    let hash = keys::hash_token(token);
    if let Some(op) = &st.ctx.cfg.operator_token {
        if constant_time_eq(&Sha256::digest(op.as_bytes()), &hash) {
            return Ok(Principal {
                key_id: None,
                role: Role::Operator,
                partner_id: None,
            });
        }
    }
    if let Some(p) = st.keys.get(&hash) {
        return Ok(p);
    }
    match keys::lookup(&st.ctx.db, token).await? {
        Some(p) => {
            st.keys.put(hash, p.clone());
            Ok(p)
        }
        None => Err(ApiError::unauthorized()),
    }
}

fn require(p: Principal, role: Role) -> Result<Principal, ApiError> {
    if p.role == role {
        Ok(p)
    } else {
        Err(ApiError::forbidden(
            "wrong_role",
            format!(
                "this endpoint needs a {} key; yours is a {} key",
                role.as_str(),
                p.role.as_str()
            ),
        ))
    }
}

/// A partner key: acts only on its own partner's data.
pub struct PartnerAuth {
    pub principal: Principal,
    pub partner_id: Uuid,
}

impl FromRequestParts<AppState> for PartnerAuth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let p = require(authenticate(parts, st).await?, Role::Partner)?;
        let partner_id = p.partner_id.ok_or_else(ApiError::unauthorized)?;
        Ok(PartnerAuth {
            principal: p,
            partner_id,
        })
    }
}

/// An extractor that admits only principals of one role.
macro_rules! role_auth {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        pub struct $name(pub Principal);

        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;
            async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
                Ok($name(require(authenticate(parts, st).await?, $role)?))
            }
        }
    };
}

role_auth!(OperatorAuth, Role::Operator);
role_auth!(UpstreamAuth, Role::Upstream);
