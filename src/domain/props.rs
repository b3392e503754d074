//! Property tests (proptest) of the parsers and masks: validation never
//! panics and never accepts a character SPEC §8 forbids; masking always hides
//! what §8 requires; the duration and calendar parsers round-trip.

use std::time::Duration;

use chrono::NaiveDate;
use proptest::prelude::*;
use serde_json::json;

use super::{
    mask,
    validate::{self, allowed_char},
    workdays::{parse_tsv, CalendarEntry, DayKind},
};
use crate::config::{parse_duration, parse_review_sla, ReviewSla};

/// Characters that exercise the validators: controls, bidi controls, line
/// breaks, letters of several scripts, digits and punctuation.
fn nasty_char() -> impl Strategy<Value = char> {
    prop_oneof![
        (0u32..0x20).prop_map(|c| char::from_u32(c).unwrap()),
        Just('\u{7f}'),
        (0x80u32..0xa0).prop_map(|c| char::from_u32(c).unwrap()),
        prop::sample::select(vec![
            '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}', '\u{2066}', '\u{2067}',
            '\u{2068}', '\u{2069}'
        ]),
        any::<char>(),
        prop::char::range('a', 'z'),
        Just('张'),
        Just(' '),
    ]
}

fn nasty_string(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(nasty_char(), 0..max).prop_map(|v| v.into_iter().collect())
}

fn forbidden(c: char, multiline: bool) -> bool {
    let line_break_ok = multiline && matches!(c, '\n' | '\r' | '\t');
    !line_break_ok
        && ((c as u32) < 0x20
            || c == '\u{7f}'
            || ('\u{80}'..='\u{9f}').contains(&c)
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn validation_never_panics_nor_accepts_a_forbidden_character(
        name in nasty_string(40),
        remarks in nasty_string(60),
        tag in nasty_string(10),
    ) {
        let body = json!({
            "full_name": name, "email": "a@customer.example", "mobile": "+8613800000000",
            "remarks": remarks, "tags": [tag],
        });
        if let Ok(req) = validate::prereg_http_request(&body) {
            prop_assert!(!req.full_name.chars().any(|c| forbidden(c, false)), "{:?}", req.full_name);
            let r = req.remarks.unwrap_or_default();
            prop_assert!(!r.chars().any(|c| forbidden(c, true)), "{:?}", r);
            for t in &req.tags {
                prop_assert!(!t.chars().any(|c| forbidden(c, false)), "{:?}", t);
            }
        }
        for c in name.chars() {
            if forbidden(c, false) {
                prop_assert!(!allowed_char(c, false));
            }
        }
    }

    #[test]
    fn any_json_object_is_validated_without_panicking(
        keys in prop::collection::vec(nasty_string(8), 0..6),
        values in prop::collection::vec(nasty_string(12), 0..6),
    ) {
        let mut obj = serde_json::Map::new();
        for (k, v) in keys.into_iter().zip(values) {
            obj.insert(k, json!(v));
        }
        let _ = validate::prereg_http_request(&serde_json::Value::Object(obj));
    }

    #[test]
    fn a_masked_mobile_shows_at_most_the_country_code_and_4_digits(
        digits in "[1-9][0-9]{0,14}",
    ) {
        let number = format!("+{digits}");
        let m = mask::mobile(&number);
        let shown: String = m.chars().filter(char::is_ascii_digit).collect();
        let hidden = m.chars().filter(|c| *c == '*').count();
        prop_assert!(hidden >= 4, "{number} -> {m}");
        // Shown digits: a prefix of at most 3 (the country code) and a
        // suffix of at most 4 of the original.
        let lead: String = m.trim_start_matches('+').chars().take_while(char::is_ascii_digit).collect();
        let tail: String = m.chars().rev().take_while(char::is_ascii_digit).collect::<Vec<_>>().into_iter().rev().collect();
        prop_assert!(lead.len() <= 3 && digits.starts_with(&lead), "{number} -> {m}");
        prop_assert!(tail.len() <= 4 && digits.ends_with(&tail), "{number} -> {m}");
        prop_assert!(shown.len() <= lead.len() + tail.len());
        prop_assert!(shown.len() + 4 <= digits.len() || shown.is_empty(), "{number} -> {m}");
    }

    #[test]
    fn any_mobile_text_is_masked_without_panicking(s in nasty_string(24)) {
        let m = mask::mobile(&s);
        let digits = s.chars().filter(char::is_ascii_digit).count();
        let shown = m.chars().filter(char::is_ascii_digit).count();
        prop_assert!(shown <= 7 && (shown == 0 || shown + 4 <= digits));
    }

    #[test]
    fn names_and_email_local_parts_are_at_least_half_hidden(
        name in nasty_string(30),
        local in "[A-Za-z0-9._+-]{1,30}",
        domain in "[a-z]{1,10}\\.[a-z]{2,6}",
    ) {
        let n = name.trim().chars().count();
        let shown = mask::name(&name).chars().count().saturating_sub(2);
        prop_assert!(shown * 2 <= n, "{name:?} -> {}", mask::name(&name));
        let e = mask::email(&format!("{local}@{domain}"));
        let (masked_local, masked_domain) = e.rsplit_once('@').unwrap();
        let shown_local = masked_local.trim_end_matches('*').chars().count();
        prop_assert!(shown_local * 2 <= local.chars().count(), "{local} -> {e}");
        prop_assert_eq!(masked_domain, domain.as_str());
    }

    #[test]
    fn free_text_never_keeps_an_address_or_a_number(
        before in "[A-Za-z ,;:<(\\[\"]{0,20}",
        local in "[a-z0-9][a-z0-9._]{1,15}",
        domain in "[a-z]{1,10}\\.[a-z]{2,6}",
        number in "[1-9][0-9]{7,13}",
        middle in "[A-Za-z ,;:>)\\]\"]{1,20}",
        after in "[ ,;:>)\\]\"][A-Za-z ]{0,20}",
    ) {
        let text = format!("{before} {local}@{domain}{middle} +{number}{after}");
        let out = mask::text(&text);
        prop_assert!(!out.contains(&format!("{local}@")), "{text} -> {out}");
        prop_assert!(!out.contains(&number), "{text} -> {out}");
    }

    #[test]
    fn free_text_masking_never_panics(s in nasty_string(80)) {
        let _ = mask::text(&s);
    }

    #[test]
    fn durations_round_trip(d in 0u64..400, h in 0u64..48, m in 0u64..120, s in 0u64..120, ms in 0u64..5000) {
        let mut text = String::new();
        for (v, unit) in [(d, "d"), (h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if v > 0 {
                text.push_str(&format!("{v}{unit}"));
            }
        }
        if text.is_empty() {
            text.push_str("0s");
        }
        let want = Duration::from_secs(d * 86_400 + h * 3600 + m * 60 + s) + Duration::from_millis(ms);
        prop_assert_eq!(parse_duration(&text), Ok(want));
        prop_assert_eq!(parse_review_sla(&text), Ok(ReviewSla::Plain(want)));
        let wd = format!("{d} working days");
        prop_assert_eq!(parse_review_sla(&wd), Ok(ReviewSla::WorkingDays(d as u32)));
    }

    #[test]
    fn duration_parsing_never_panics(s in "[0-9a-z ]{0,30}", big in any::<u64>()) {
        let _ = parse_duration(&s);
        let _ = parse_review_sla(&s);
        let _ = parse_duration(&format!("{big}d{big}h"));
    }

    #[test]
    fn calendar_files_round_trip(
        days in prop::collection::btree_map(0u32..365, (any::<bool>(), "[A-Za-z][A-Za-z0-9 ]{0,20}[A-Za-z0-9]"), 0..30),
    ) {
        let start = NaiveDate::from_ymd_opt(2027, 1, 1).unwrap();
        let entries: Vec<CalendarEntry> = days
            .into_iter()
            .map(|(offset, (holiday, name))| CalendarEntry {
                date: start + chrono::Duration::days(offset.into()),
                kind: if holiday { DayKind::Holiday } else { DayKind::Workday },
                name,
            })
            .collect();
        let mut text = String::from("# a comment\r\ndate\tkind\tname\r\n");
        for e in &entries {
            text.push_str(&format!("{}\t{}\t{}\r\n", e.date, e.kind, e.name));
        }
        prop_assert_eq!(parse_tsv(&text).unwrap(), entries);
    }

    #[test]
    fn calendar_parsing_never_panics(s in nasty_string(200)) {
        let _ = parse_tsv(&s);
        let _ = parse_tsv(&format!("date\tkind\tname\n{s}"));
    }
}
