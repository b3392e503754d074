//! Exports: every history record of a partner as a CSV whose names, emails
//! and mobiles are always masked. Rows stream from Postgres and are written
//! in ~1 MiB chunks, so memory does not grow with the row count.

use chrono::Utc;
use futures::TryStreamExt;
use uuid::Uuid;

use super::{JobError, Outcome};
use crate::{
    context::Ctx,
    domain::mask,
    flows,
    store::history::{self, csv_row, Record},
};

const CHUNK: usize = 1 << 20;

pub const HEADER: &[&str] = &[
    "preregistration_id",
    "full_name",
    "email",
    "mobile",
    "state",
    "cause_code",
    "method",
    "invited_at",
    "link_expires_at",
    "claim_expires_at",
    "tags",
    "remarks",
    "account_manager",
    "account_id",
];

pub use crate::jobs::ExportRequested;

fn rfc3339(t: Option<chrono::DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

pub fn write_record(out: &mut String, r: &Record) {
    let id = r.id.to_string();
    let (name, email, mobile) = (
        mask::name(&r.full_name),
        mask::email(&r.email),
        mask::mobile(&r.mobile),
    );
    let cause = if r.state == "association_failed" {
        r.reason_code.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let tags = r.tags.join(";");
    let (invited, link, claim) = (
        rfc3339(r.invited_at),
        rfc3339(r.link_expires_at),
        rfc3339(r.expires_at),
    );
    csv_row(
        out,
        &[
            &id,
            &name,
            &email,
            &mobile,
            &r.state,
            &cause,
            r.last_method.as_deref().unwrap_or(""),
            &invited,
            &link,
            &claim,
            &tags,
            r.remarks.as_deref().unwrap_or(""),
            r.manager_name.as_deref().unwrap_or(""),
            r.account_id.as_deref().unwrap_or(""),
        ],
    );
}

pub async fn handle(ctx: &Ctx, job: ExportRequested) -> Result<Outcome, JobError> {
    let id = job.export_id;
    let Some(export) = history::get_export(&ctx.db, id).await? else {
        return Ok(Outcome::Skipped("withdrawn"));
    };
    if !crate::domain::status::EXPORT_ACTIVE.contains(&export.status.as_str()) {
        return Ok(Outcome::Skipped("already_done"));
    }
    // A redelivered job (the worker died mid-way) starts over.
    flows::exports::start(ctx, id).await?;

    let mut buf = String::with_capacity(CHUNK + 4096);
    csv_row(&mut buf, HEADER);
    let (mut seq, mut rows, mut bytes) = (0i32, 0i64, 0i64);
    let mut query = history::query(export.partner_id, &history::Filter::default(), None);
    let mut stream = query.build_query_as::<Record>().fetch(&ctx.db);
    while let Some(r) = stream.try_next().await? {
        write_record(&mut buf, &r);
        rows += 1;
        if buf.len() >= CHUNK {
            bytes += buf.len() as i64;
            put_chunk(ctx, id, seq, &buf).await?;
            seq += 1;
            buf.clear();
        }
    }
    drop(stream);
    bytes += buf.len() as i64;
    put_chunk(ctx, id, seq, &buf).await?;
    flows::exports::complete(ctx, id, export.partner_id, rows, bytes).await?;
    metrics::counter!("prereg_export_rows_total").increment(rows as u64);
    Ok(Outcome::Done)
}

async fn put_chunk(ctx: &Ctx, id: Uuid, seq: i32, data: &str) -> Result<(), sqlx::Error> {
    history::put_chunk(&ctx.db, id, seq, data.as_bytes()).await
}

/// Retries exhausted: the export failed.
pub async fn give_up(ctx: &Ctx, job: ExportRequested, error: &str) -> Result<(), sqlx::Error> {
    flows::exports::fail(ctx, job.export_id, error).await
}
