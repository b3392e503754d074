//! Partners and their account managers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Partner {
    pub id: Uuid,
    pub name: String,
    pub country: String,
    pub contact_email: Option<String>,
    pub contact_mobile: Option<String>,
    pub billing_mode: String,
    pub customer_development: bool,
    pub referral: bool,
    pub locale: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, FromRow, PartialEq, Eq)]
pub struct AccountManager {
    pub id: Uuid,
    pub name: String,
    pub email: String,
}

/// The settable fields of a partner; `None` leaves a field as it is.
#[derive(Debug, Default, Clone)]
pub struct PartnerFields {
    pub name: Option<String>,
    pub country: Option<String>,
    pub contact_email: Option<Option<String>>,
    pub contact_mobile: Option<Option<String>>,
    pub billing_mode: Option<String>,
    pub customer_development: Option<bool>,
    pub referral: Option<bool>,
    pub locale: Option<String>,
    pub account_managers: Option<Vec<(String, String)>>,
}

const COLUMNS: &str = "id, name, country, contact_email, contact_mobile, billing_mode, customer_development, referral, locale, created_at, updated_at";

/// `SELECT` of every column of `partners` rows matching `condition`.
fn select(condition: &str) -> String {
    format!("SELECT {COLUMNS} FROM partners WHERE {condition}")
}

super::by_id!(Partner);

/// The oldest partner of this name.
pub async fn first_named<'e>(
    db: impl PgExecutor<'e>,
    name: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM partners WHERE name = $1 ORDER BY created_at LIMIT 1")
        .bind(name)
        .fetch_optional(db)
        .await
}

pub async fn managers<'e>(
    db: impl PgExecutor<'e>,
    partner_id: Uuid,
) -> Result<Vec<AccountManager>, sqlx::Error> {
    sqlx::query_as::<_, AccountManager>(
        "SELECT id, name, email FROM account_managers WHERE partner_id = $1 ORDER BY name, id",
    )
    .bind(partner_id)
    .fetch_all(db)
    .await
}

/// Creates a partner; `fields.name` and `fields.country` are required by the caller.
pub async fn create(conn: &mut PgConnection, f: &PartnerFields) -> Result<Partner, sqlx::Error> {
    let id = Uuid::now_v7();
    let p = sqlx::query_as::<_, Partner>(&format!(
        "INSERT INTO partners (id, name, country, contact_email, contact_mobile, billing_mode, customer_development, referral, locale)
         VALUES ($1, $2, $3, $4, $5, COALESCE($6, 'postpaid'), COALESCE($7, true), COALESCE($8, false), COALESCE($9, 'en'))
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(f.name.as_deref().unwrap_or_default())
    .bind(f.country.as_deref().unwrap_or_default())
    .bind(f.contact_email.clone().flatten())
    .bind(f.contact_mobile.clone().flatten())
    .bind(f.billing_mode.as_deref())
    .bind(f.customer_development)
    .bind(f.referral)
    .bind(f.locale.as_deref())
    .fetch_one(&mut *conn)
    .await?;
    if let Some(m) = &f.account_managers {
        replace_managers(conn, id, m).await?;
    }
    Ok(p)
}

pub async fn update(
    conn: &mut PgConnection,
    id: Uuid,
    f: &PartnerFields,
) -> Result<Option<Partner>, sqlx::Error> {
    let p = sqlx::query_as::<_, Partner>(&format!(
        "UPDATE partners SET
            name = COALESCE($2, name),
            country = COALESCE($3, country),
            contact_email = CASE WHEN $4 THEN $5 ELSE contact_email END,
            contact_mobile = CASE WHEN $6 THEN $7 ELSE contact_mobile END,
            billing_mode = COALESCE($8, billing_mode),
            customer_development = COALESCE($9, customer_development),
            referral = COALESCE($10, referral),
            locale = COALESCE($11, locale),
            updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(f.name.as_deref())
    .bind(f.country.as_deref())
    .bind(f.contact_email.is_some())
    .bind(f.contact_email.clone().flatten())
    .bind(f.contact_mobile.is_some())
    .bind(f.contact_mobile.clone().flatten())
    .bind(f.billing_mode.as_deref())
    .bind(f.customer_development)
    .bind(f.referral)
    .bind(f.locale.as_deref())
    .fetch_optional(&mut *conn)
    .await?;
    if p.is_some() {
        if let Some(m) = &f.account_managers {
            replace_managers(conn, id, m).await?;
        }
    }
    Ok(p)
}

/// Replaces the list of account managers, keeping the ids of those whose
/// email stays (so assignments to customers survive).
async fn replace_managers(
    conn: &mut PgConnection,
    partner_id: Uuid,
    list: &[(String, String)],
) -> Result<(), sqlx::Error> {
    let emails: Vec<String> = list.iter().map(|(_, e)| e.to_lowercase()).collect();
    sqlx::query(
        "DELETE FROM account_managers am WHERE partner_id = $1 AND NOT (lower(email) = ANY($2))
           AND NOT EXISTS (SELECT 1 FROM preregistrations p WHERE p.account_manager_id = am.id)",
    )
    .bind(partner_id)
    .bind(&emails)
    .execute(&mut *conn)
    .await?;
    for (name, email) in list {
        sqlx::query(
            "INSERT INTO account_managers (id, partner_id, name, email) VALUES ($1, $2, $3, $4)
             ON CONFLICT (partner_id, email) DO UPDATE SET name = EXCLUDED.name",
        )
        .bind(Uuid::now_v7())
        .bind(partner_id)
        .bind(name)
        .bind(email.to_lowercase())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
