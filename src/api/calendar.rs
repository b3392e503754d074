//! Operator endpoints of time: the working-day calendar (one year at a time)
//! and running the expiry sweep on demand.

use std::collections::HashMap;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Extension, Json,
};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde_json::{json, Value};

use super::{
    auth::OperatorAuth,
    error::{ApiError, ApiResult},
    json_body, AppState, RequestId,
};
use crate::{
    domain::{
        validate::{FieldError, Fields},
        workdays::{CalendarEntry, DayKind, CN_2026_YEAR},
    },
    store,
};

pub use crate::domain::workdays::YEARS;

fn year_param(s: &str) -> ApiResult<i32> {
    let year: i32 = s
        .parse()
        .map_err(|_| ApiError::not_found("calendar year"))?;
    if !YEARS.contains(&year) {
        return Err(ApiError::validation(vec![FieldError {
            field: "year".into(),
            code: "out_of_range",
            message: format!("year must be between {} and {}", YEARS.start(), YEARS.end()),
        }]));
    }
    Ok(year)
}

/// Reads `[{"date", "kind", "name"}, ...]` for `year`, naming every bad field
/// (`[3].date`).
pub fn entries_from_json(year: i32, v: &Value) -> Result<Vec<CalendarEntry>, Vec<FieldError>> {
    let Some(items) = v.as_array() else {
        return Err(vec![FieldError {
            field: "body".into(),
            code: "invalid_type",
            message: "the body must be a JSON array of {date, kind, name}".into(),
        }]);
    };
    if items.len() > 366 {
        return Err(vec![FieldError {
            field: "body".into(),
            code: "too_long",
            message: "a year has at most 366 dates".into(),
        }]);
    }
    let mut errors = Vec::new();
    let mut entries = Vec::with_capacity(items.len());
    let mut first: HashMap<NaiveDate, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let mut f = Fields::new(item);
        let date_text = f.required_str("date", 10);
        let kind = f.optional_enum("kind", &["holiday", "workday"]);
        if kind.is_none() && matches!(item.get("kind"), None | Some(Value::Null)) {
            f.error("kind", "required", "kind is required: holiday or workday");
        }
        let name = f.required_str("name", 200);
        let date = date_text.as_deref().and_then(|t| {
            let d = NaiveDate::parse_from_str(t, "%Y-%m-%d")
                .ok()
                .filter(|_| t.len() == 10);
            if d.is_none() {
                f.error("date", "invalid", "date must be YYYY-MM-DD");
            }
            d
        });
        if let Some(d) = date {
            if d.year() != year {
                f.error("date", "wrong_year", format!("date {d} is not in {year}"));
            } else if let Some(j) = first.get(&d) {
                f.error(
                    "date",
                    "duplicate",
                    format!("date {d} is already listed at [{j}]"),
                );
            } else {
                first.insert(d, i);
            }
        }
        f.check_unknown();
        for e in f.errors {
            let field = if e.field == "body" {
                format!("[{i}]")
            } else {
                format!("[{i}].{}", e.field)
            };
            errors.push(FieldError { field, ..e });
        }
        if let (Some(date), Some(kind), Some(name)) = (date, kind.and_then(DayKind::parse), name) {
            entries.push(CalendarEntry {
                date,
                kind,
                name: name.trim().to_string(),
            });
        }
    }
    if errors.is_empty() {
        entries.sort_by_key(|e| e.date);
        Ok(entries)
    } else {
        Err(errors)
    }
}

fn year_view(
    year: i32,
    source: &str,
    loaded_at: Option<DateTime<Utc>>,
    entries: &[CalendarEntry],
) -> Value {
    json!({"year": year, "source": source, "loaded_at": loaded_at, "items": entries})
}

/// `PUT /v1/admin/calendar/{year}`
pub async fn put_year(
    State(st): State<AppState>,
    OperatorAuth(op): OperatorAuth,
    Path(year): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let year = year_param(&year)?;
    let v = json_body(&body)?;
    let entries = entries_from_json(year, &v).map_err(ApiError::validation)?;
    let (loaded_at, recomputed) =
        crate::flows::calendar::load_year(&st.ctx, &op.label(), year, &entries).await?;
    let mut out = year_view(year, "uploaded", Some(loaded_at), &entries);
    out["reviews_recomputed"] = json!(recomputed);
    Ok(Json(out))
}

/// `GET /v1/admin/calendar/{year}`: the uploaded year, or the shipped default
/// for 2026; 404 when the year is not loaded (weekends only apply).
pub async fn get_year(
    State(st): State<AppState>,
    _op: OperatorAuth,
    Path(year): Path<String>,
) -> ApiResult<Json<Value>> {
    let year = year_param(&year)?;
    if let Some((loaded_at, entries)) = store::calendar::get_year(&st.ctx.db, year).await? {
        return Ok(Json(year_view(year, "uploaded", Some(loaded_at), &entries)));
    }
    if year == CN_2026_YEAR {
        let cal = crate::domain::workdays::Calendar::cn_2026();
        return Ok(Json(year_view(
            year,
            "default",
            None,
            &cal.entries_for_year(year),
        )));
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "calendar_year_not_loaded",
        format!("no calendar is loaded for {year}; only weekends are rest days there"),
    ))
}

/// `POST /v1/admin/sweeps`: queues an expiry sweep now (202 once the broker
/// confirmed it).
pub async fn request_sweep(
    State(st): State<AppState>,
    OperatorAuth(op): OperatorAuth,
    Extension(rid): Extension<RequestId>,
) -> ApiResult<Response> {
    let id = uuid::Uuid::now_v7();
    let ev = super::command::job(
        id.to_string(),
        &crate::jobs::SweepRequested {
            requested_by: Some(op.label()),
            ..Default::default()
        },
    )?
    .correlation(Some(rid.0));
    st.ctx.broker.publish_command(&ev).await?;
    let mut conn = st.ctx.db.acquire().await?;
    store::audit(
        &mut conn,
        &op.label(),
        "sweep.requested",
        Some(&id.to_string()),
        None,
    )
    .await?;
    let last = store::calendar::last_run(&mut *conn, store::calendar::SWEEP_RUN).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": "queued",
                    "last_success_at": last.as_ref().map(|l| l.0), "last_stats": last.and_then(|l| l.1)})),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_bad_field() {
        let v = json!([
            {"date": "2027-01-01", "kind": "holiday", "name": "New Year"},
            {"date": "2027-13-01", "kind": "holiday", "name": "x"},
            {"date": "2026-01-01", "kind": "day-off", "name": ""},
            {"date": "2027-01-01", "kind": "workday", "name": "again"},
            "nope",
            {"kind": "workday", "name": "no date"}
        ]);
        let errors = entries_from_json(2027, &v).unwrap_err();
        let fields: Vec<(&str, &str)> = errors.iter().map(|e| (e.field.as_str(), e.code)).collect();
        assert_eq!(
            fields,
            [
                ("[1].date", "invalid"),
                ("[2].kind", "invalid"),
                ("[2].name", "required"),
                ("[2].date", "wrong_year"),
                ("[3].date", "duplicate"),
                ("[4]", "invalid_type"),
                ("[4].date", "required"),
                ("[4].kind", "required"),
                ("[4].name", "required"),
                ("[5].date", "required"),
            ]
        );
        assert!(entries_from_json(2027, &json!({})).is_err());
    }

    #[test]
    fn reads_a_year_sorted() {
        let v = json!([
            {"date": "2027-10-09", "kind": "workday", "name": "Make-up"},
            {"date": "2027-10-01", "kind": "holiday", "name": "National Day"}
        ]);
        let e = entries_from_json(2027, &v).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].date, NaiveDate::from_ymd_opt(2027, 10, 1).unwrap());
        assert_eq!(e[1].kind, DayKind::Workday);
        assert!(entries_from_json(2027, &json!([])).unwrap().is_empty());
    }
}
