//! History exports (SPEC §4): requested (bounded per partner), started,
//! completed with `export.completed`, or failed.

use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    context::Ctx,
    mq::CloudEvent,
    store::{history, outbox},
};

/// The answer to an export request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// A `pending` export was written (its job goes in the same transaction).
    Created(Uuid),
    /// The partner already has this many exports pending or running.
    TooMany(i64),
}

/// Writes a pending export unless the partner has `max_active` pending or
/// running (serialised per partner in the caller's transaction).
pub async fn request(
    conn: &mut PgConnection,
    partner_id: Uuid,
    max_active: i64,
) -> Result<Requested, sqlx::Error> {
    history::lock_partner_exports(conn, partner_id).await?;
    let active = history::active_exports(conn, partner_id).await?;
    if active >= max_active {
        return Ok(Requested::TooMany(active));
    }
    let id = Uuid::now_v7();
    history::insert_export(conn, id, partner_id).await?;
    Ok(Requested::Created(id))
}

/// The export (re)starts from scratch (a redelivered job starts over).
pub async fn start(ctx: &Ctx, id: Uuid) -> Result<(), sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    history::start_export(&mut tx, id).await?;
    tx.commit().await
}

/// The file is written: `completed` with its size, and `export.completed`.
pub async fn complete(
    ctx: &Ctx,
    id: Uuid,
    partner_id: Uuid,
    rows: i64,
    bytes: i64,
) -> Result<(), sqlx::Error> {
    let retention =
        chrono::Duration::from_std(ctx.cfg.export_retention).unwrap_or(chrono::Duration::days(7));
    let mut tx = ctx.db.begin().await?;
    history::complete_export(&mut tx, id, rows, bytes, retention).await?;
    let ev = CloudEvent::with_id(
        format!("export.completed:{id}"),
        "export.completed",
        json!({"export_id": id, "partner_id": partner_id, "rows": rows}),
    );
    outbox::event(&mut tx, &ev).await?;
    tx.commit().await
}

/// Retries exhausted: the export failed, its partial file removed.
pub async fn fail(ctx: &Ctx, id: Uuid, error: &str) -> Result<(), sqlx::Error> {
    history::fail_export(&ctx.db, id, error).await
}
