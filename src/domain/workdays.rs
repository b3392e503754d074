//! Working-day calendar and deadline arithmetic.
//!
//! Working days are Monday to Friday; Saturday and Sunday are rest days.
//! A calendar overrides single dates: a `holiday` makes a date a rest day and
//! a `workday` (make-up workday) makes it a working day, which beats the
//! weekend. Operators load the overrides one year at a time; for a year that
//! is not loaded only the weekend rule applies, and any deadline computed
//! through such a year is flagged with [`Deadline::calendar_missing`].
//!
//! Deadlines are computed on the local date and time of day in a configured
//! time zone ([`DEFAULT_TIME_ZONE`] is Asia/Shanghai); the API takes and
//! returns UTC instants.
//!
//! The module is pure: the only "I/O" is the calendar file embedded with
//! `include_str!` ([`CN_2026_TSV`], loaded by [`Calendar::cn_2026`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{
    DateTime, Datelike, Days, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeDelta,
    TimeZone, Utc, Weekday,
};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// Years an operator may load.
pub const YEARS: std::ops::RangeInclusive<i32> = 2000..=2100;

/// The shipped mainland-China calendar for 2026, in the TSV format read by
/// [`parse_tsv`].
pub const CN_2026_TSV: &str = include_str!("data/calendar-cn-2026.tsv");

/// The year covered by [`CN_2026_TSV`].
pub const CN_2026_YEAR: i32 = 2026;

/// The time zone working days are computed in unless configured otherwise.
pub const DEFAULT_TIME_ZONE: Tz = chrono_tz::Asia::Shanghai;

/// The column header line every calendar file must start with (after any
/// comment lines).
pub const TSV_HEADER: [&str; 3] = ["date", "kind", "name"];

/// How far an erroneous line is quoted back in an error message.
const QUOTE_LIMIT: usize = 80;

/// What a calendar entry makes of its date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DayKind {
    /// A rest day, even if it falls Monday to Friday.
    Holiday,
    /// A working day, even if it falls on a weekend (make-up workday).
    Workday,
}

impl DayKind {
    /// The spelling used in the TSV file and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DayKind::Holiday => "holiday",
            DayKind::Workday => "workday",
        }
    }

    /// Parses the TSV / JSON spelling (`holiday` or `workday`, exact).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "holiday" => Some(DayKind::Holiday),
            "workday" => Some(DayKind::Workday),
            _ => None,
        }
    }
}

impl std::fmt::Display for DayKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One override of the weekend rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalendarEntry {
    pub date: NaiveDate,
    pub kind: DayKind,
    pub name: String,
}

/// Errors from parsing a calendar file or loading a year. Line numbers are
/// 1-based and count every physical line, comments included.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    #[error("calendar file has no header line (expected `date<TAB>kind<TAB>name`)")]
    MissingHeader,
    #[error("line {line}: expected header `date<TAB>kind<TAB>name`, found `{found}`")]
    BadHeader { line: usize, found: String },
    #[error("line {line}: expected 3 tab-separated fields (date, kind, name), found {found}")]
    FieldCount { line: usize, found: usize },
    #[error("line {line}: invalid date `{value}` (expected YYYY-MM-DD)")]
    InvalidDate { line: usize, value: String },
    #[error("line {line}: invalid kind `{value}` (expected `holiday` or `workday`)")]
    InvalidKind { line: usize, value: String },
    #[error("line {line}: empty name")]
    EmptyName { line: usize },
    #[error("line {line}: date {date} is already listed on line {first_line}")]
    DuplicateLine {
        line: usize,
        date: NaiveDate,
        first_line: usize,
    },
    #[error("date {date} is outside the year {year} being loaded")]
    DateOutsideYear { year: i32, date: NaiveDate },
    #[error("date {date} is listed more than once")]
    DuplicateDate { date: NaiveDate },
}

/// Parses a calendar file: `#` comment lines and blank lines are skipped,
/// the first other line must be the header `date\tkind\tname`, and every
/// following line is `YYYY-MM-DD\t(holiday|workday)\tname`. Fields are
/// trimmed; `\r\n` line ends and a leading byte-order mark are accepted.
/// A date listed twice is an error. Entries are returned in file order.
pub fn parse_tsv(text: &str) -> Result<Vec<CalendarEntry>, CalendarError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut header_seen = false;
    let mut first_lines: HashMap<NaiveDate, usize> = HashMap::new();
    let mut entries = Vec::new();

    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = raw.split('\t').map(str::trim).collect();

        if !header_seen {
            if fields != TSV_HEADER {
                return Err(CalendarError::BadHeader {
                    line,
                    found: quote(trimmed),
                });
            }
            header_seen = true;
            continue;
        }

        let [date_text, kind_text, name] = fields[..] else {
            return Err(CalendarError::FieldCount {
                line,
                found: fields.len(),
            });
        };
        let date = parse_date(date_text).ok_or_else(|| CalendarError::InvalidDate {
            line,
            value: quote(date_text),
        })?;
        let kind = DayKind::parse(kind_text).ok_or_else(|| CalendarError::InvalidKind {
            line,
            value: quote(kind_text),
        })?;
        if name.is_empty() {
            return Err(CalendarError::EmptyName { line });
        }
        if let Some(&first_line) = first_lines.get(&date) {
            return Err(CalendarError::DuplicateLine {
                line,
                date,
                first_line,
            });
        }
        first_lines.insert(date, line);
        entries.push(CalendarEntry {
            date,
            kind,
            name: name.to_string(),
        });
    }

    if !header_seen {
        return Err(CalendarError::MissingHeader);
    }
    Ok(entries)
}

/// The one year every entry is dated in: `Ok(None)` for no entries,
/// `Err(years)` when they span several.
pub fn single_year(entries: &[CalendarEntry]) -> Result<Option<i32>, Vec<i32>> {
    let years: BTreeSet<i32> = entries.iter().map(|e| e.date.year()).collect();
    match years.len() {
        0 => Ok(None),
        1 => Ok(years.into_iter().next()),
        _ => Err(years.into_iter().collect()),
    }
}

/// Strict `YYYY-MM-DD`.
fn parse_date(text: &str) -> Option<NaiveDate> {
    let bytes = text.as_bytes();
    let shape_ok = bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shape_ok {
        return None;
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
}

/// Shortens user-supplied text quoted back in an error message.
fn quote(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars.by_ref().take(QUOTE_LIMIT).collect();
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// A working-day calendar: per-date overrides of the weekend rule plus the
/// set of years whose overrides have been loaded.
#[derive(Debug, Clone, Default)]
pub struct Calendar {
    /// Invariant: every key lies in a year of `years`.
    overrides: BTreeMap<NaiveDate, CalendarEntry>,
    years: BTreeSet<i32>,
}

/// The result of [`Calendar::add_working_days`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: DateTime<Utc>,
    /// Set when any date examined, from the start date to the result date
    /// (both included), lies in a year whose calendar is not loaded, so that
    /// only the weekend rule was applied there.
    pub calendar_missing: bool,
}

impl Calendar {
    /// An empty calendar: no year loaded, weekend rule only.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shipped default: mainland China, year 2026 loaded.
    pub fn cn_2026() -> Self {
        let entries = parse_tsv(CN_2026_TSV).expect("embedded 2026 calendar parses");
        let mut calendar = Self::new();
        calendar
            .load_year(CN_2026_YEAR, &entries)
            .expect("embedded 2026 calendar loads");
        calendar
    }

    /// Loads (or replaces entirely) one year's overrides. Every entry must be
    /// dated in `year` and no date may appear twice; on error the calendar is
    /// left unchanged. Loading an empty list marks the year as loaded with
    /// no overrides.
    pub fn load_year(&mut self, year: i32, entries: &[CalendarEntry]) -> Result<(), CalendarError> {
        let mut seen = BTreeSet::new();
        for entry in entries {
            if entry.date.year() != year {
                return Err(CalendarError::DateOutsideYear {
                    year,
                    date: entry.date,
                });
            }
            if !seen.insert(entry.date) {
                return Err(CalendarError::DuplicateDate { date: entry.date });
            }
        }
        self.overrides.retain(|date, _| date.year() != year);
        for entry in entries {
            self.overrides.insert(entry.date, entry.clone());
        }
        self.years.insert(year);
        Ok(())
    }

    /// Removes a year's overrides and marks it as not loaded. Returns whether
    /// it was loaded.
    pub fn unload_year(&mut self, year: i32) -> bool {
        self.overrides.retain(|date, _| date.year() != year);
        self.years.remove(&year)
    }

    /// Loaded years, ascending.
    pub fn loaded_years(&self) -> Vec<i32> {
        self.years.iter().copied().collect()
    }

    /// The overrides of one year, by date (empty if the year is not loaded).
    pub fn entries_for_year(&self, year: i32) -> Vec<CalendarEntry> {
        self.overrides
            .values()
            .filter(|entry| entry.date.year() == year)
            .cloned()
            .collect()
    }

    /// The override for a date, if any.
    pub fn entry(&self, date: NaiveDate) -> Option<&CalendarEntry> {
        self.overrides.get(&date)
    }

    /// Whether `date` is a working day: its override if it has one,
    /// otherwise Monday to Friday.
    pub fn is_working_day(&self, date: NaiveDate) -> bool {
        match self.overrides.get(&date).map(|entry| entry.kind) {
            Some(DayKind::Holiday) => false,
            Some(DayKind::Workday) => true,
            None => !matches!(date.weekday(), Weekday::Sat | Weekday::Sun),
        }
    }

    /// Whether the calendar of `date`'s year is loaded.
    pub fn covers(&self, date: NaiveDate) -> bool {
        self.years.contains(&date.year())
    }

    /// Adds `n` working days to `from`, on the local clock of `tz`.
    ///
    /// Takes the local date and time of `from`; if that date is not a working
    /// day, starts from 00:00 of the next working day instead. Then steps
    /// forward one day at a time, counting only working days, `n` times, and
    /// keeps the local time of day. With `n == 0` on a working day the
    /// instant is returned unchanged.
    ///
    /// If the resulting local time does not exist (DST gap) the first valid
    /// instant after it is used (the moment the clocks jump); if it is
    /// ambiguous (DST overlap) the earlier instant is used. Should the
    /// computation run off the end of the representable dates, the result
    /// saturates at [`DateTime::<Utc>::MAX_UTC`] with `calendar_missing` set.
    pub fn add_working_days(&self, from: DateTime<Utc>, n: u32, tz: Tz) -> Deadline {
        let Some(local) = local_time(tz, from) else {
            // Only at the very edges of the representable range.
            return Deadline {
                at: from,
                calendar_missing: true,
            };
        };
        let mut date = local.date();
        let mut time = local.time();
        let mut missing = !self.covers(date);
        let mut moved = false;

        while !self.is_working_day(date) {
            let Some(next) = date.succ_opt() else {
                return Deadline::saturated();
            };
            date = next;
            time = NaiveTime::MIN;
            moved = true;
            missing |= !self.covers(date);
        }

        let mut remaining = n;
        while remaining > 0 {
            // Whole weeks through unloaded years: from a working day (a
            // weekday there), five working days later is the same weekday a
            // week on. Keeps huge `n` cheap.
            if !self.covers(date) && self.is_working_day(date) {
                let weeks = self.unloaded_weeks_ahead(date).min(remaining / 5);
                if weeks > 0 {
                    let Some(next) = date.checked_add_days(Days::new(7 * u64::from(weeks))) else {
                        return Deadline::saturated();
                    };
                    date = next;
                    remaining -= 5 * weeks;
                    moved = true;
                    continue;
                }
            }
            let Some(next) = date.succ_opt() else {
                return Deadline::saturated();
            };
            date = next;
            moved = true;
            missing |= !self.covers(date);
            if self.is_working_day(date) {
                remaining -= 1;
            }
        }

        if !moved {
            return Deadline {
                at: from,
                calendar_missing: missing,
            };
        }
        match resolve_local(tz, date.and_time(time)) {
            Some(at) => Deadline {
                at,
                calendar_missing: missing,
            },
            None => Deadline::saturated(),
        }
    }

    /// How many whole weeks after `date` (in an unloaded year) stay within
    /// unloaded years, i.e. before 1 January of the next loaded year.
    fn unloaded_weeks_ahead(&self, date: NaiveDate) -> u32 {
        let limit = self
            .years
            .range(date.year().saturating_add(1)..)
            .next()
            .and_then(|&year| NaiveDate::from_ymd_opt(year, 1, 1))
            .and_then(|first| first.pred_opt())
            .unwrap_or(NaiveDate::MAX);
        let weeks = (limit - date).num_days().max(0) / 7;
        u32::try_from(weeks).unwrap_or(u32::MAX)
    }
}

impl Deadline {
    fn saturated() -> Self {
        Deadline {
            at: DateTime::<Utc>::MAX_UTC,
            calendar_missing: true,
        }
    }
}

/// The local date-time of `instant` in `tz`, without the panic of
/// `DateTime::naive_local` at the edges of the representable range.
fn local_time(tz: Tz, instant: DateTime<Utc>) -> Option<NaiveDateTime> {
    let offset = tz.offset_from_utc_datetime(&instant.naive_utc()).fix();
    instant
        .naive_utc()
        .checked_add_signed(TimeDelta::seconds(i64::from(offset.local_minus_utc())))
}

/// Maps a local date-time in `tz` to an instant: the only one, the earlier of
/// two (overlap), or the first valid instant after it (gap). `None` only at
/// the edges of the representable range.
fn resolve_local(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(at) => Some(at.with_timezone(&Utc)),
        LocalResult::Ambiguous(first, second) => Some(first.min(second).with_timezone(&Utc)),
        LocalResult::None => first_instant_after_gap(tz, local),
    }
}

/// For a local time skipped by a forward transition, the transition instant
/// itself (the first instant whose local time is later than `local`), found
/// by bisection over whole seconds. Offsets are far below 26 hours, so the
/// transition lies within 26 hours of `local` read as UTC.
fn first_instant_after_gap(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    let margin = TimeDelta::hours(26);
    let mut low = local.checked_sub_signed(margin)?.and_utc().timestamp();
    let mut high = local.checked_add_signed(margin)?.and_utc().timestamp();
    let reached = |seconds: i64| -> Option<bool> {
        let instant = DateTime::from_timestamp(seconds, 0)?;
        Some(local_time(tz, instant)? >= local)
    };
    if reached(low)? || !reached(high)? {
        return None;
    }
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if reached(middle)? {
            high = middle;
        } else {
            low = middle;
        }
    }
    DateTime::from_timestamp(high, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Asia::Shanghai;
    use chrono_tz::Europe::Berlin;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
    }

    fn at(tz: Tz, y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(y, m, d, h, min, 0)
            .single()
            .expect("unambiguous test time")
            .with_timezone(&Utc)
    }

    fn sh(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        at(Shanghai, y, m, d, h, min)
    }

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0)
            .single()
            .expect("valid UTC time")
    }

    fn add_sh(calendar: &Calendar, from: DateTime<Utc>, n: u32) -> Deadline {
        calendar.add_working_days(from, n, Shanghai)
    }

    fn covered(at: DateTime<Utc>) -> Deadline {
        Deadline {
            at,
            calendar_missing: false,
        }
    }

    fn entry(d: NaiveDate, kind: DayKind, name: &str) -> CalendarEntry {
        CalendarEntry {
            date: d,
            kind,
            name: name.to_string(),
        }
    }

    /// The 2026 calendar plus extra overrides (e.g. to put a workday on a
    /// DST-change Sunday).
    fn cn_2026_with(extra: &[CalendarEntry]) -> Calendar {
        let mut entries = Calendar::cn_2026().entries_for_year(2026);
        entries.extend_from_slice(extra);
        let mut calendar = Calendar::new();
        calendar.load_year(2026, &entries).expect("loads");
        calendar
    }

    #[test]
    fn single_year_of_a_file() {
        let entries = parse_tsv(CN_2026_TSV).expect("parses");
        assert_eq!(single_year(&entries), Ok(Some(2026)));
        assert_eq!(single_year(&[]), Ok(None));
        let mixed = [
            entry(date(2026, 1, 1), DayKind::Holiday, "a"),
            entry(date(2027, 1, 1), DayKind::Holiday, "b"),
        ];
        assert_eq!(single_year(&mixed), Err(vec![2026, 2027]));
    }

    // --- the four examples of the spec -------------------------------------

    #[test]
    fn example_friday_afternoon_plus_two_is_tuesday() {
        let calendar = Calendar::cn_2026();
        assert_eq!(
            add_sh(&calendar, sh(2026, 11, 20, 15, 0), 2),
            covered(sh(2026, 11, 24, 15, 0))
        );
    }

    #[test]
    fn example_saturday_plus_two_is_wednesday_midnight() {
        let calendar = Calendar::cn_2026();
        assert_eq!(
            add_sh(&calendar, sh(2026, 11, 21, 10, 0), 2),
            covered(sh(2026, 11, 25, 0, 0))
        );
    }

    #[test]
    fn example_mid_autumn_holidays_are_skipped() {
        let calendar = Calendar::cn_2026();
        assert_eq!(
            add_sh(&calendar, sh(2026, 9, 24, 11, 0), 2),
            covered(sh(2026, 9, 29, 11, 0))
        );
    }

    #[test]
    fn example_make_up_saturday_counts() {
        let calendar = Calendar::cn_2026();
        assert_eq!(
            add_sh(&calendar, sh(2026, 10, 9, 9, 0), 2),
            covered(sh(2026, 10, 12, 9, 0))
        );
    }

    #[test]
    fn result_is_utc_of_the_local_time() {
        let calendar = Calendar::cn_2026();
        // 2026-11-24 15:00 +08:00 is 07:00 UTC.
        assert_eq!(
            add_sh(&calendar, utc(2026, 11, 20, 7, 0), 2).at,
            utc(2026, 11, 24, 7, 0)
        );
        // Friday 20:00 UTC is already Saturday 04:00 in Shanghai.
        assert_eq!(
            add_sh(&calendar, utc(2026, 11, 20, 20, 0), 2).at,
            sh(2026, 11, 25, 0, 0)
        );
    }

    // --- n = 0 ---------------------------------------------------------------

    #[test]
    fn zero_days_on_a_working_day_keeps_the_instant() {
        let calendar = Calendar::cn_2026();
        let from = sh(2026, 11, 20, 15, 0) + TimeDelta::nanoseconds(123_456_789);
        assert_eq!(add_sh(&calendar, from, 0), covered(from));
        // A make-up Saturday is a working day too.
        let saturday = sh(2026, 10, 10, 8, 30);
        assert_eq!(add_sh(&calendar, saturday, 0), covered(saturday));
    }

    #[test]
    fn zero_days_on_a_rest_day_moves_to_midnight_of_the_next_working_day() {
        let calendar = Calendar::cn_2026();
        assert_eq!(
            add_sh(&calendar, sh(2026, 11, 21, 10, 0), 0),
            covered(sh(2026, 11, 23, 0, 0))
        );
        // National Day: 1–7 October, then Thursday 8 October.
        assert_eq!(
            add_sh(&calendar, sh(2026, 10, 1, 23, 59), 0),
            covered(sh(2026, 10, 8, 0, 0))
        );
    }

    // --- holiday blocks and make-up days ------------------------------------

    #[test]
    fn spring_festival_block() {
        let calendar = Calendar::cn_2026();
        let friday = sh(2026, 2, 13, 9, 0);
        // Saturday 14 February is a make-up workday.
        assert_eq!(add_sh(&calendar, friday, 1), covered(sh(2026, 2, 14, 9, 0)));
        // 15–23 February are holidays.
        assert_eq!(add_sh(&calendar, friday, 2), covered(sh(2026, 2, 24, 9, 0)));
        assert_eq!(add_sh(&calendar, friday, 5), covered(sh(2026, 2, 27, 9, 0)));
        // Saturday 28 February is a make-up workday.
        assert_eq!(add_sh(&calendar, friday, 6), covered(sh(2026, 2, 28, 9, 0)));
        assert_eq!(add_sh(&calendar, friday, 7), covered(sh(2026, 3, 2, 9, 0)));
        // Starting inside the block.
        let inside = sh(2026, 2, 18, 14, 0);
        assert_eq!(add_sh(&calendar, inside, 0), covered(sh(2026, 2, 24, 0, 0)));
        assert_eq!(add_sh(&calendar, inside, 1), covered(sh(2026, 2, 25, 0, 0)));
        for day in 15..=23 {
            assert!(
                !calendar.is_working_day(date(2026, 2, day)),
                "2026-02-{day}"
            );
        }
    }

    #[test]
    fn make_up_workday_beats_the_weekend() {
        let calendar = Calendar::cn_2026();
        assert!(calendar.is_working_day(date(2026, 2, 14))); // Saturday
        assert!(calendar.is_working_day(date(2026, 2, 28))); // Saturday
        assert!(calendar.is_working_day(date(2026, 5, 9))); // Saturday
        assert!(calendar.is_working_day(date(2026, 9, 20))); // Sunday
        assert!(calendar.is_working_day(date(2026, 10, 10))); // Saturday
        assert!(!calendar.is_working_day(date(2026, 10, 17))); // plain Saturday
        assert!(!calendar.is_working_day(date(2026, 10, 18))); // plain Sunday

        let custom = cn_2026_with(&[entry(date(2026, 10, 17), DayKind::Workday, "test")]);
        assert!(custom.is_working_day(date(2026, 10, 17)));
        assert_eq!(
            custom.add_working_days(sh(2026, 10, 16, 9, 0), 1, Shanghai),
            covered(sh(2026, 10, 17, 9, 0))
        );
    }

    #[test]
    fn holiday_beats_a_weekday() {
        let calendar = Calendar::cn_2026();
        assert_eq!(date(2026, 5, 4).weekday(), Weekday::Mon);
        assert!(!calendar.is_working_day(date(2026, 5, 4)));
        assert!(calendar.is_working_day(date(2026, 5, 6)));
    }

    #[test]
    fn new_year() {
        let calendar = Calendar::cn_2026();
        for day in 1..=3 {
            assert!(
                !calendar.is_working_day(date(2026, 1, day)),
                "2026-01-0{day}"
            );
        }
        assert_eq!(date(2026, 1, 4).weekday(), Weekday::Sun);
        assert!(calendar.is_working_day(date(2026, 1, 4)));

        let new_years_day = sh(2026, 1, 1, 10, 0);
        assert_eq!(
            add_sh(&calendar, new_years_day, 0),
            covered(sh(2026, 1, 4, 0, 0))
        );
        assert_eq!(
            add_sh(&calendar, new_years_day, 1),
            covered(sh(2026, 1, 5, 0, 0))
        );
        // Starting in 2025 (not loaded) examines 2025-12-31: flagged.
        assert_eq!(
            add_sh(&calendar, sh(2025, 12, 31, 10, 0), 1),
            Deadline {
                at: sh(2026, 1, 4, 10, 0),
                calendar_missing: true,
            }
        );
    }

    // --- missing calendar years ---------------------------------------------

    #[test]
    fn deadline_into_an_unloaded_year_uses_weekends_only_and_is_flagged() {
        let calendar = Calendar::cn_2026();
        let wednesday = sh(2026, 12, 30, 10, 0);
        assert_eq!(
            add_sh(&calendar, wednesday, 1),
            covered(sh(2026, 12, 31, 10, 0))
        );
        // 2027-01-01 (Friday) counts as a working day: 2027 is not loaded.
        assert_eq!(
            add_sh(&calendar, wednesday, 2),
            Deadline {
                at: sh(2027, 1, 1, 10, 0),
                calendar_missing: true,
            }
        );
        assert_eq!(
            add_sh(&calendar, wednesday, 3),
            Deadline {
                at: sh(2027, 1, 4, 10, 0),
                calendar_missing: true,
            }
        );

        // Once 2027 is loaded the holiday applies and the flag clears.
        let mut loaded = calendar.clone();
        loaded
            .load_year(
                2027,
                &[entry(date(2027, 1, 1), DayKind::Holiday, "New Year's Day")],
            )
            .expect("loads");
        assert_eq!(loaded.loaded_years(), vec![2026, 2027]);
        assert_eq!(
            add_sh(&loaded, wednesday, 3),
            covered(sh(2027, 1, 5, 10, 0))
        );
    }

    #[test]
    fn gap_year_between_loaded_years_is_flagged() {
        let mut calendar = Calendar::cn_2026();
        calendar.load_year(2028, &[]).expect("loads");
        let result = add_sh(&calendar, sh(2026, 12, 31, 9, 0), 300);
        assert!(result.calendar_missing);
        // 300 weekday steps from Thursday 2026-12-31 across 2027 (no
        // overrides) into 2028 (loaded, empty) is plain weekday arithmetic.
        assert_eq!(result.at, sh(2028, 2, 24, 9, 0));
    }

    #[test]
    fn unloaded_calendar_uses_weekends_only() {
        let calendar = Calendar::new();
        assert!(calendar.loaded_years().is_empty());
        assert!(!calendar.covers(date(2026, 10, 1)));
        assert!(calendar.entries_for_year(2026).is_empty());
        assert!(calendar.is_working_day(date(2026, 10, 1)));
        assert!(!calendar.is_working_day(date(2026, 10, 10)));
        assert_eq!(
            add_sh(&calendar, sh(2026, 10, 9, 9, 0), 2),
            Deadline {
                at: sh(2026, 10, 13, 9, 0),
                calendar_missing: true,
            }
        );
        let from = sh(2026, 10, 1, 9, 0);
        assert_eq!(
            add_sh(&calendar, from, 0),
            Deadline {
                at: from,
                calendar_missing: true,
            }
        );
        assert_eq!(
            add_sh(&calendar, sh(2026, 10, 10, 9, 0), 0),
            Deadline {
                at: sh(2026, 10, 12, 0, 0),
                calendar_missing: true,
            }
        );
    }

    #[test]
    fn week_skipping_matches_day_by_day_counting() {
        let calendar = Calendar::new();
        let from = sh(2026, 11, 18, 16, 45); // Wednesday
        let mut day = date(2026, 11, 18);
        for n in 0..40u32 {
            if n > 0 {
                day = day.succ_opt().expect("date");
                while matches!(day.weekday(), Weekday::Sat | Weekday::Sun) {
                    day = day.succ_opt().expect("date");
                }
            }
            let expected = Shanghai
                .from_local_datetime(&day.and_hms_opt(16, 45, 0).expect("time"))
                .single()
                .expect("unambiguous")
                .with_timezone(&Utc);
            assert_eq!(add_sh(&calendar, from, n).at, expected, "n = {n}");
        }
    }

    // --- time zones ---------------------------------------------------------

    #[test]
    fn berlin_across_the_spring_dst_change_keeps_local_time() {
        let calendar = Calendar::cn_2026();
        // Friday 27 March 10:00 CET (09:00 UTC); DST starts Sunday 29 March.
        let from = at(Berlin, 2026, 3, 27, 10, 0);
        assert_eq!(from, utc(2026, 3, 27, 9, 0));
        // Monday 30 March 10:00 CEST is 08:00 UTC.
        assert_eq!(
            calendar.add_working_days(from, 1, Berlin),
            covered(utc(2026, 3, 30, 8, 0))
        );
        // Autumn: Friday 23 October 10:00 CEST -> Monday 26 October 10:00 CET.
        assert_eq!(
            calendar.add_working_days(at(Berlin, 2026, 10, 23, 10, 0), 1, Berlin),
            covered(utc(2026, 10, 26, 9, 0))
        );
    }

    #[test]
    fn dst_gap_takes_the_first_valid_instant_after() {
        // Make Sunday 29 March a workday so that the deadline lands on it;
        // 02:30 does not exist in Berlin that day (02:00 -> 03:00).
        let calendar = cn_2026_with(&[entry(date(2026, 3, 29), DayKind::Workday, "test")]);
        let from = at(Berlin, 2026, 3, 27, 2, 30);
        // 03:00 CEST = 01:00 UTC, the moment the clocks jump.
        assert_eq!(
            calendar.add_working_days(from, 1, Berlin),
            covered(utc(2026, 3, 29, 1, 0))
        );
    }

    #[test]
    fn dst_overlap_takes_the_earlier_instant() {
        // Sunday 25 October 02:30 happens twice in Berlin (CEST, then CET).
        let calendar = cn_2026_with(&[entry(date(2026, 10, 25), DayKind::Workday, "test")]);
        let from = at(Berlin, 2026, 10, 23, 2, 30);
        assert_eq!(
            calendar.add_working_days(from, 1, Berlin),
            covered(utc(2026, 10, 25, 0, 30))
        );
    }

    #[test]
    fn skipped_midnight_moves_to_the_transition() {
        // Chile starts DST at 24:00 on Saturday 5 September 2026: Sunday
        // 00:00 does not exist, the day starts at 01:00 (-03).
        let santiago = chrono_tz::America::Santiago;
        let calendar = cn_2026_with(&[entry(date(2026, 9, 6), DayKind::Workday, "test")]);
        let from = at(santiago, 2026, 9, 5, 10, 0); // Saturday
        assert_eq!(
            calendar.add_working_days(from, 0, santiago),
            covered(utc(2026, 9, 6, 4, 0))
        );
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let calendar = Calendar::cn_2026();
        let huge = calendar.add_working_days(sh(2026, 11, 20, 15, 0), u32::MAX, Shanghai);
        assert!(huge.calendar_missing);
        let big = calendar.add_working_days(sh(2026, 11, 20, 15, 0), 5_000_000, Shanghai);
        assert!(big.calendar_missing);
        assert!(big.at > sh(20_000, 1, 1, 0, 0));
        for tz in [
            Shanghai,
            chrono_tz::America::New_York,
            chrono_tz::Pacific::Kiritimati,
        ] {
            for n in [0, 1, 10] {
                let _ = calendar.add_working_days(DateTime::<Utc>::MAX_UTC, n, tz);
                let _ = calendar.add_working_days(DateTime::<Utc>::MIN_UTC, n, tz);
            }
        }
    }

    // --- parsing and loading ------------------------------------------------

    #[test]
    fn shipped_tsv_parses_to_exactly_its_rows() {
        let entries = parse_tsv(CN_2026_TSV).expect("parses");
        let data_rows = CN_2026_TSV
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .count()
            - 1; // header
        assert_eq!(data_rows, 39);
        assert_eq!(entries.len(), 39);
        let holidays = entries
            .iter()
            .filter(|e| e.kind == DayKind::Holiday)
            .count();
        assert_eq!(holidays, 33);
        assert_eq!(entries.len() - holidays, 6);
        assert_eq!(
            entries[0],
            entry(date(2026, 1, 1), DayKind::Holiday, "New Year's Day")
        );
        assert_eq!(
            entries[3],
            entry(
                date(2026, 1, 4),
                DayKind::Workday,
                "New Year's Day make-up workday"
            )
        );
        assert_eq!(
            entries[38],
            entry(
                date(2026, 10, 10),
                DayKind::Workday,
                "National Day make-up workday"
            )
        );

        let calendar = Calendar::cn_2026();
        assert_eq!(calendar.loaded_years(), vec![2026]);
        assert_eq!(calendar.entries_for_year(2026), entries);
        assert!(calendar.entries_for_year(2025).is_empty());
        assert!(calendar.covers(date(2026, 12, 31)));
        assert!(!calendar.covers(date(2027, 1, 1)));
        assert_eq!(
            calendar.entry(date(2026, 9, 20)).map(|e| e.kind),
            Some(DayKind::Workday)
        );
    }

    #[test]
    fn parse_accepts_crlf_bom_blank_lines_and_padding() {
        let text = "\u{feff}# comment\r\n\r\ndate\tkind\tname\r\n 2026-01-01 \tholiday\t New Year \r\n\n  # indented comment\n2026-01-04\tworkday\tMake-up\n";
        assert_eq!(
            parse_tsv(text),
            Ok(vec![
                entry(date(2026, 1, 1), DayKind::Holiday, "New Year"),
                entry(date(2026, 1, 4), DayKind::Workday, "Make-up"),
            ])
        );
        assert_eq!(parse_tsv("date\tkind\tname\n"), Ok(vec![]));
    }

    #[test]
    fn parse_errors_name_the_line() {
        let head = "# c1\n# c2\ndate\tkind\tname\n2026-01-01\tholiday\tNew Year\n";

        let bad_date = format!("{head}2026-02-30\tholiday\tX\n");
        let err = parse_tsv(&bad_date).expect_err("bad date");
        assert_eq!(
            err,
            CalendarError::InvalidDate {
                line: 5,
                value: "2026-02-30".into()
            }
        );
        assert!(err.to_string().starts_with("line 5:"), "{err}");

        for text in ["2026-1-01", "26-01-01", "2026/01/01", "+2026-01-1"] {
            let input = format!("{head}{text}\tholiday\tX\n");
            assert!(
                matches!(
                    parse_tsv(&input),
                    Err(CalendarError::InvalidDate { line: 5, .. })
                ),
                "{text}"
            );
        }

        let bad_kind = format!("{head}2026-01-02\tHoliday\tX\n");
        assert_eq!(
            parse_tsv(&bad_kind),
            Err(CalendarError::InvalidKind {
                line: 5,
                value: "Holiday".into()
            })
        );

        let short = format!("{head}\n2026-01-02 holiday X\n");
        let err = parse_tsv(&short).expect_err("one field");
        assert_eq!(err, CalendarError::FieldCount { line: 6, found: 1 });
        assert!(err.to_string().contains("line 6"), "{err}");

        let long = format!("{head}2026-01-02\tholiday\tX\textra\n");
        assert_eq!(
            parse_tsv(&long),
            Err(CalendarError::FieldCount { line: 5, found: 4 })
        );

        let unnamed = format!("{head}2026-01-02\tholiday\t\n");
        assert_eq!(
            parse_tsv(&unnamed),
            Err(CalendarError::EmptyName { line: 5 })
        );

        let duplicate = format!("{head}# c3\n2026-01-01\tworkday\tAgain\n");
        let err = parse_tsv(&duplicate).expect_err("duplicate");
        assert_eq!(
            err,
            CalendarError::DuplicateLine {
                line: 6,
                date: date(2026, 1, 1),
                first_line: 4,
            }
        );
        assert!(err.to_string().contains("line 6") && err.to_string().contains("line 4"));

        assert_eq!(
            parse_tsv("# only comments\n\n"),
            Err(CalendarError::MissingHeader)
        );
        assert_eq!(parse_tsv(""), Err(CalendarError::MissingHeader));
        assert_eq!(
            parse_tsv("# c\n2026-01-01\tholiday\tX\n"),
            Err(CalendarError::BadHeader {
                line: 2,
                found: "2026-01-01\tholiday\tX".into()
            })
        );
        let long_header = "x".repeat(500);
        match parse_tsv(&long_header) {
            Err(CalendarError::BadHeader { line: 1, found }) => {
                assert!(found.chars().count() <= QUOTE_LIMIT + 1)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn load_year_rejects_a_date_from_another_year() {
        let mut calendar = Calendar::cn_2026();
        let entries = [
            entry(date(2027, 1, 1), DayKind::Holiday, "New Year's Day"),
            entry(date(2026, 12, 31), DayKind::Holiday, "Stray"),
        ];
        let err = calendar.load_year(2027, &entries).expect_err("stray date");
        assert_eq!(
            err,
            CalendarError::DateOutsideYear {
                year: 2027,
                date: date(2026, 12, 31),
            }
        );
        assert!(err.to_string().contains("2026-12-31"));
        // Nothing changed.
        assert_eq!(calendar.loaded_years(), vec![2026]);
        assert_eq!(calendar.entries_for_year(2026).len(), 39);
        assert!(calendar.is_working_day(date(2026, 12, 31)));
    }

    #[test]
    fn load_year_rejects_duplicates() {
        let mut calendar = Calendar::new();
        let entries = [
            entry(date(2027, 1, 1), DayKind::Holiday, "A"),
            entry(date(2027, 1, 1), DayKind::Workday, "B"),
        ];
        assert_eq!(
            calendar.load_year(2027, &entries),
            Err(CalendarError::DuplicateDate {
                date: date(2027, 1, 1)
            })
        );
        assert!(calendar.loaded_years().is_empty());
    }

    #[test]
    fn load_year_replaces_the_year_entirely() {
        let mut calendar = Calendar::cn_2026();
        let replacement = [entry(date(2026, 3, 2), DayKind::Holiday, "Only one")];
        calendar.load_year(2026, &replacement).expect("loads");
        assert_eq!(calendar.entries_for_year(2026), replacement.to_vec());
        assert!(calendar.is_working_day(date(2026, 10, 1)));
        assert!(!calendar.is_working_day(date(2026, 10, 10)));
        assert!(!calendar.is_working_day(date(2026, 3, 2)));

        assert!(calendar.unload_year(2026));
        assert!(!calendar.unload_year(2026));
        assert!(calendar.loaded_years().is_empty());
        assert!(calendar.is_working_day(date(2026, 3, 2)));
    }

    #[test]
    fn serde_spellings() {
        assert_eq!(
            serde_json::to_string(&DayKind::Holiday).expect("json"),
            "\"holiday\""
        );
        assert_eq!(
            serde_json::from_str::<DayKind>("\"workday\"").expect("json"),
            DayKind::Workday
        );
        let e = entry(date(2026, 1, 4), DayKind::Workday, "Make-up");
        let json = serde_json::to_string(&e).expect("json");
        assert_eq!(
            json,
            r#"{"date":"2026-01-04","kind":"workday","name":"Make-up"}"#
        );
        assert_eq!(
            serde_json::from_str::<CalendarEntry>(&json).expect("json"),
            e
        );
        assert_eq!(
            DayKind::parse(DayKind::Holiday.as_str()),
            Some(DayKind::Holiday)
        );
    }
}
