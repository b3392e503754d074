//! Masking of personal data for answers, exports, logs and headers (SPEC §8):
//! a mobile number keeps at most its country code and last 4 digits and hides
//! at least 4 digits; a name or an email's local part is at least half hidden.

use std::fmt;

/// `Zhang San` → `Z**`: the first character, then two stars, so that the
/// length is not shown; a one-character name is all stars.
pub fn name(full_name: &str) -> String {
    let t = full_name.trim();
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        (None, _) => String::new(),
        (Some(_), None) => "**".to_string(),
        (Some(c), Some(_)) => format!("{c}**"),
    }
}

/// `zhang@example.com` → `z***@example.com` (a one-character local part is
/// all stars; something without `@` is all stars).
pub fn email(email: &str) -> String {
    let e = email.trim();
    match e.rsplit_once('@') {
        Some((local, domain)) => {
            let mut chars = local.chars();
            match (chars.next(), chars.next()) {
                (Some(c), Some(_)) => format!("{c}***@{domain}"),
                _ => format!("***@{domain}"),
            }
        }
        None => "***".to_string(),
    }
}

/// Two-digit E.164 country codes; codes starting with 1 or 7 have one digit,
/// every other code three.
const TWO_DIGIT_CODES: &[&str] = &[
    "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45", "46", "47",
    "48", "49", "51", "52", "53", "54", "55", "56", "57", "58", "60", "61", "62", "63", "64", "65",
    "66", "81", "82", "84", "86", "90", "91", "92", "93", "94", "95", "98",
];

/// Length of the country code at the start of `digits` (E.164 without `+`).
fn country_code_len(digits: &str) -> usize {
    match digits.as_bytes().first() {
        None => 0,
        Some(b'1' | b'7') => 1,
        Some(_) if digits.len() >= 2 && TWO_DIGIT_CODES.contains(&&digits[..2]) => 2,
        Some(_) => 3,
    }
    .min(digits.len())
}

/// `+8613800000000` → `+86*******0000`: the country code, one star per hidden
/// digit, and the last 4 digits when at least 4 others stay hidden (fewer
/// otherwise). Anything that is not `+digits` is all stars.
pub fn mobile(mobile: &str) -> String {
    let t = mobile.trim();
    let digits = t.strip_prefix('+').unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return "****".to_string();
    }
    let plus = if t.starts_with('+') { "+" } else { "" };
    let cc = if plus.is_empty() {
        0
    } else {
        country_code_len(digits)
    };
    let national = digits.len() - cc;
    if national < 4 {
        // Too short to show anything and still hide 4 digits.
        return format!("{plus}{}", "*".repeat(digits.len().max(4)));
    }
    let tail = 4.min(national - 4);
    let hidden = national - tail;
    format!(
        "{plus}{}{}{}",
        &digits[..cc],
        "*".repeat(hidden),
        &digits[digits.len() - tail..]
    )
}

fn is_local_char(c: char) -> bool {
    c.is_alphanumeric() || "._%+-'!#$&*/=?^`{|}~".contains(c)
}

fn is_domain_char(c: char) -> bool {
    c.is_alphanumeric() || c == '.' || c == '-'
}

/// Masks every email address and phone number inside free text (an SMTP
/// reply, a parser error) before it is logged, stored or put in a header:
/// `550 <zhang@example.com> unknown` → `550 <z***@example.com> unknown`.
/// Phone numbers are `+` and 7 to 15 digits (spaces or hyphens between them
/// allowed), or a bare run of 8 to 15 digits.
pub fn text(input: &str) -> String {
    mask_phones(&mask_emails(input))
}

fn mask_emails(input: &str) -> String {
    let chars: Vec<char> = input.chars().collect();
    let mut out = String::with_capacity(input.len());
    // `copied`: characters before it are in `out` already.
    let mut copied = 0;
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '@' {
            i += 1;
            continue;
        }
        let mut start = i;
        while start > copied && is_local_char(chars[start - 1]) {
            start -= 1;
        }
        let mut end = i + 1;
        while end < chars.len() && is_domain_char(chars[end]) {
            end += 1;
        }
        while end > i + 1 && matches!(chars[end - 1], '.' | '-') {
            end -= 1;
        }
        let domain: String = chars[i + 1..end].iter().collect();
        if start < i && domain.contains('.') && !domain.starts_with('.') {
            out.extend(&chars[copied..start]);
            let local: String = chars[start..i].iter().collect();
            out.push_str(&email(&format!("{local}@{domain}")));
            copied = end;
            i = end;
        } else {
            i += 1;
        }
    }
    out.extend(&chars[copied..]);
    out
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn mask_phones(input: &str) -> String {
    let chars: Vec<char> = input.chars().collect();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let starts = (c == '+' || c.is_ascii_digit()) && !(i > 0 && is_word(chars[i - 1]));
        if !starts {
            out.push(c);
            i += 1;
            continue;
        }
        let plus = c == '+';
        let mut j = if plus { i + 1 } else { i };
        let mut digits = String::new();
        let mut digits_end = j;
        while j < chars.len() {
            let d = chars[j];
            if d.is_ascii_digit() {
                digits.push(d);
                j += 1;
                digits_end = j;
            } else if plus
                && (d == ' ' || d == '-')
                && !digits.is_empty()
                && chars.get(j + 1).is_some_and(|n| n.is_ascii_digit())
            {
                j += 1;
            } else {
                break;
            }
        }
        let next_word = chars.get(digits_end).is_some_and(|n| is_word(*n));
        let min = if plus { 7 } else { 8 };
        if !next_word && (min..=15).contains(&digits.len()) {
            out.push_str(&mobile(&format!("{}{digits}", if plus { "+" } else { "" })));
            i = digits_end;
        } else {
            // Not a phone number: copy the run unchanged.
            let end = if plus { i + 1 } else { digits_end };
            out.extend(&chars[i..end]);
            i = end;
        }
    }
    out
}

/// Wraps a piece of personal data so that `Display`/`Debug` (and so every log
/// line) only ever shows the masked form.
pub struct Pii<'a> {
    kind: PiiKind,
    value: &'a str,
}

#[derive(Clone, Copy)]
enum PiiKind {
    Name,
    Email,
    Mobile,
}

pub fn pii_email(value: &str) -> Pii<'_> {
    Pii {
        kind: PiiKind::Email,
        value,
    }
}
pub fn pii_mobile(value: &str) -> Pii<'_> {
    Pii {
        kind: PiiKind::Mobile,
        value,
    }
}
pub fn pii_name(value: &str) -> Pii<'_> {
    Pii {
        kind: PiiKind::Name,
        value,
    }
}

impl fmt::Display for Pii<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let masked = match self.kind {
            PiiKind::Name => name(self.value),
            PiiKind::Email => email(self.value),
            PiiKind::Mobile => mobile(self.value),
        };
        f.write_str(&masked)
    }
}

impl fmt::Debug for Pii<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_like_the_spec() {
        assert_eq!(name("Zhang San"), "Z**");
        assert_eq!(name("张三"), "张**");
        assert_eq!(name("Z"), "**");
        assert_eq!(email("zhang@example.com"), "z***@example.com");
        assert_eq!(email("z@example.com"), "***@example.com");
        // The second: the case of issue 10 item 9 (all but one digit were shown).
        for (given, masked) in [
            ("+8613800000000", "+86*******0000"),
            ("+6591234567", "+65****4567"),
            ("+14155550123", "+1******0123"),
            ("+35312345678", "+353****5678"),
            ("+8612345", "+86****5"),
            ("+1234", "+****"),
            ("garbage", "****"),
        ] {
            assert_eq!(mobile(given), masked, "{given}");
        }
        assert_eq!(email("broken"), "***");
        assert_eq!(
            format!("{}", pii_email("zhang@example.com")),
            "z***@example.com"
        );
        assert_eq!(
            format!("{:?}", pii_mobile("+8613800000000")),
            "+86*******0000"
        );
    }

    #[test]
    fn masks_inside_free_text() {
        assert_eq!(
            text("550 5.1.1 <zhang.san@example.com>: Recipient address rejected"),
            "550 5.1.1 <z***@example.com>: Recipient address rejected"
        );
        assert_eq!(
            text("invalid type: string \"bob@corp.example.org\", expected u32"),
            "invalid type: string \"b***@corp.example.org\", expected u32"
        );
        assert_eq!(
            text("mobile +86 138 0000 1234 and 8613800001234."),
            "mobile +86*******1234 and *********1234."
        );
        assert_eq!(text("user 12345678901@x.example"), "user 1***@x.example");
        // Ids, codes and dates stay readable.
        let plain = "job 0195a3c4-1b2c-7d3e-8f40-123456789abc at 2026-11-22T01:00:00Z, code 250";
        assert_eq!(text(plain), plain);
        assert_eq!(text("a@b"), "a@b");
        assert_eq!(text("@@ x@ @y.z"), "@@ x@ @y.z");
    }
}
