//! Masking of personal data for lists, exports and logs.

use std::fmt;

/// `Zhang San` → `Z**`: first character, then two stars.
pub fn name(full_name: &str) -> String {
    match full_name.trim().chars().next() {
        Some(c) => format!("{c}**"),
        None => String::new(),
    }
}

/// `zhang@example.com` → `z***@example.com`.
pub fn email(email: &str) -> String {
    let e = email.trim();
    match e.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_string(),
    }
}

/// `+8613800000000` → `+86138****0000`: keep the first six and the last four
/// characters of an E.164 number, star the middle.
pub fn mobile(mobile: &str) -> String {
    let chars: Vec<char> = mobile.trim().chars().collect();
    if chars.len() <= 10 {
        let keep = chars.len().min(3);
        return format!("{}****", chars[..keep].iter().collect::<String>());
    }
    let head: String = chars[..6].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}****{tail}")
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
        assert_eq!(email("zhang@example.com"), "z***@example.com");
        assert_eq!(mobile("+8613800000000"), "+86138****0000");
        assert_eq!(mobile("+1234"), "+12****");
        assert_eq!(email("broken"), "***");
        assert_eq!(
            format!("{}", pii_email("zhang@example.com")),
            "z***@example.com"
        );
        assert_eq!(
            format!("{:?}", pii_mobile("+8613800000000")),
            "+86138****0000"
        );
    }
}
