//! Field validation that names every bad field at once.

use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub code: &'static str,
    pub message: String,
}

/// Collects field errors while reading a JSON object.
#[derive(Debug, Default)]
pub struct Fields<'a> {
    obj: Option<&'a Map<String, Value>>,
    pub errors: Vec<FieldError>,
    /// Field names read so far (the others are unknown at `finish`).
    seen: Vec<String>,
}

/// Bidirectional embeddings, overrides and isolates (U+202A–U+202E,
/// U+2066–U+2069): they can make a name read differently from what it is.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether `c` may appear in a text field (line breaks and tabs only where
/// `multiline`). C0 and C1 controls, DEL and bidi controls never may.
pub fn allowed_char(c: char, multiline: bool) -> bool {
    if multiline && matches!(c, '\n' | '\r' | '\t') {
        return true;
    }
    !(c.is_control() || is_bidi_control(c))
}

/// `Some(error)` when `s` holds a character a text field must not hold.
pub fn text_error(field: &str, s: &str, multiline: bool) -> Option<FieldError> {
    let bad = s.chars().find(|c| !allowed_char(*c, multiline))?;
    let message = if bad == '\n' || bad == '\r' {
        format!("{field} must be a single line")
    } else {
        format!(
            "{field} must not contain control characters, bidirectional overrides or lone surrogates (found U+{:04X})",
            bad as u32
        )
    };
    Some(FieldError {
        field: field.to_string(),
        code: "invalid_character",
        message,
    })
}

impl<'a> Fields<'a> {
    pub fn new(body: &'a Value) -> Self {
        let mut f = Fields {
            obj: body.as_object(),
            errors: Vec::new(),
            seen: Vec::new(),
        };
        if f.obj.is_none() {
            f.error("body", "invalid_type", "the body must be a JSON object");
        }
        f
    }

    pub fn error(&mut self, field: &str, code: &'static str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_string(),
            code,
            message: message.into(),
        });
    }

    fn get(&mut self, field: &str) -> Option<&'a Value> {
        self.known(&[field]);
        self.obj.and_then(|o| o.get(field)).filter(|v| !v.is_null())
    }

    /// Marks fields read by other means as known.
    pub fn known(&mut self, fields: &[&str]) {
        for f in fields {
            if !self.seen.iter().any(|s| s == f) {
                self.seen.push(f.to_string());
            }
        }
    }

    /// Adds an `unknown_field` error for every key of the object that no
    /// reader asked for (a misspelt `send_invitaton` is not ignored).
    pub fn check_unknown(&mut self) {
        let Some(obj) = self.obj else { return };
        let mut unknown: Vec<String> = obj
            .keys()
            .filter(|k| !self.seen.iter().any(|s| s == *k))
            .cloned()
            .collect();
        unknown.sort();
        for k in unknown {
            let shown: String = k.chars().filter(|c| !c.is_control()).take(64).collect();
            self.error(&shown, "unknown_field", format!("unknown field `{shown}`"));
        }
    }

    /// A string that must be present and non-blank, at most `max` characters.
    pub fn required_str(&mut self, field: &str, max: usize) -> Option<String> {
        match self.get(field) {
            None => {
                self.error(field, "required", format!("{field} is required"));
                None
            }
            Some(_) => self.optional_str(field, max).and_then(|s| {
                if s.trim().is_empty() {
                    self.error(field, "required", format!("{field} must not be blank"));
                    None
                } else {
                    Some(s)
                }
            }),
        }
    }

    /// A single-line string of at most `max` characters.
    pub fn optional_str(&mut self, field: &str, max: usize) -> Option<String> {
        self.text(field, max, false)
    }

    /// Text that may hold line breaks and tabs (remarks, notes).
    pub fn optional_multiline(&mut self, field: &str, max: usize) -> Option<String> {
        self.text(field, max, true)
    }

    /// Like `required_str`, for text that may hold line breaks.
    pub fn required_multiline(&mut self, field: &str, max: usize) -> Option<String> {
        if self.get(field).is_none() {
            self.error(field, "required", format!("{field} is required"));
            return None;
        }
        let s = self.text(field, max, true)?;
        if s.trim().is_empty() {
            self.error(field, "required", format!("{field} must not be blank"));
            return None;
        }
        Some(s)
    }

    fn text(&mut self, field: &str, max: usize, multiline: bool) -> Option<String> {
        match self.get(field) {
            None => None,
            Some(Value::String(s)) if s.chars().count() > max => {
                self.error(
                    field,
                    "too_long",
                    format!("{field} must be at most {max} characters"),
                );
                None
            }
            Some(Value::String(s)) => {
                if let Some(e) = text_error(field, s.trim(), multiline) {
                    self.errors.push(e);
                    return None;
                }
                Some(s.trim().to_string())
            }
            Some(_) => {
                self.error(field, "invalid_type", format!("{field} must be a string"));
                None
            }
        }
    }

    pub fn optional_bool(&mut self, field: &str) -> Option<bool> {
        match self.get(field) {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                self.error(
                    field,
                    "invalid_type",
                    format!("{field} must be true or false"),
                );
                None
            }
        }
    }

    pub fn optional_f64(&mut self, field: &str) -> Option<f64> {
        match self.get(field) {
            None => None,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if v.is_finite() && v >= 0.0 => Some(v),
                _ => {
                    self.error(field, "invalid", format!("{field} must be a number >= 0"));
                    None
                }
            },
            Some(_) => {
                self.error(field, "invalid_type", format!("{field} must be a number"));
                None
            }
        }
    }

    pub fn optional_uuid(&mut self, field: &str) -> Option<uuid::Uuid> {
        let s = self.optional_str(field, 64)?;
        match uuid::Uuid::parse_str(&s) {
            Ok(u) => Some(u),
            Err(_) => {
                self.error(field, "invalid", format!("{field} must be a UUID"));
                None
            }
        }
    }

    /// An optional array of short strings.
    pub fn optional_str_list(
        &mut self,
        field: &str,
        max_items: usize,
        max_len: usize,
    ) -> Vec<String> {
        match self.get(field) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                if items.len() > max_items {
                    self.error(
                        field,
                        "too_many",
                        format!("{field} may hold at most {max_items} items"),
                    );
                    return Vec::new();
                }
                let mut out = Vec::new();
                for item in items {
                    match item.as_str().map(str::trim) {
                        Some(s) if !s.is_empty() && s.chars().count() <= max_len => {
                            if let Some(e) = text_error(field, s, false) {
                                self.errors.push(e);
                                return Vec::new();
                            }
                            out.push(s.to_string())
                        }
                        _ => {
                            self.error(
                                field,
                                "invalid",
                                format!("each of {field} must be a non-blank string of at most {max_len} characters"),
                            );
                            return Vec::new();
                        }
                    }
                }
                out
            }
            Some(_) => {
                self.error(
                    field,
                    "invalid_type",
                    format!("{field} must be an array of strings"),
                );
                Vec::new()
            }
        }
    }

    /// One of a fixed set of words.
    pub fn optional_enum(&mut self, field: &str, allowed: &[&'static str]) -> Option<&'static str> {
        let s = self.optional_str(field, 64)?;
        match allowed.iter().find(|a| **a == s) {
            Some(a) => Some(*a),
            None => {
                self.error(
                    field,
                    "invalid",
                    format!("{field} must be one of: {}", allowed.join(", ")),
                );
                None
            }
        }
    }

    /// The errors found, including unknown fields.
    pub fn finish(mut self) -> Result<(), Vec<FieldError>> {
        self.check_unknown();
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

/// A plausible email address: one `@`, a non-empty local part, a dotted domain,
/// no white space.
pub fn is_email(s: &str) -> bool {
    let s = s.trim();
    if s.len() > 254 || s.chars().any(char::is_whitespace) {
        return false;
    }
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains("..")
        }
        None => false,
    }
}

/// A name that carries a link (it would show up in a provider-branded email).
pub fn looks_like_link(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    l.contains("://") || l.contains("www.")
}

/// `Ok` when `v` is an object holding only `allowed` keys (or not an object,
/// which the caller reports), else the unknown fields.
pub fn only_fields(v: &Value, allowed: &[&str]) -> Result<(), Vec<FieldError>> {
    let mut f = Fields::new(v);
    f.errors.clear();
    f.known(allowed);
    f.finish()
}

/// E.164: `+`, a non-zero digit, then 6 to 14 more digits.
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// ISO 3166-1 alpha-2 shape: two ASCII letters.
pub fn is_country(s: &str) -> bool {
    s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats() {
        assert!(is_email("a@b.co"));
        assert!(!is_email("a@b"));
        assert!(!is_email("ab.co"));
        assert!(!is_email("a b@c.de"));
        assert!(is_e164("+8613800000000"));
        assert!(!is_e164("8613800000000"));
        assert!(!is_e164("+0613800000000"));
        assert!(!is_e164("+86-138"));
        assert!(is_country("CN"));
        assert!(!is_country("CHN"));
    }

    #[test]
    fn names_every_bad_field() {
        let body =
            json!({"full_name": "", "email": 5, "tags": ["ok", ""], "send_invitation": "yes"});
        let mut f = Fields::new(&body);
        f.required_str("full_name", 10);
        f.required_str("email", 10);
        f.required_str("mobile", 10);
        f.optional_str_list("tags", 5, 10);
        f.optional_bool("send_invitation");
        let errs = f.finish().unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["full_name", "email", "mobile", "tags", "send_invitation"]
        );
    }
}

use super::values::{AssociationTypeName, Email, Locale, Mobile};

/// A pre-registration request, as partners send it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreregRequest {
    pub full_name: String,
    pub email: Email,
    pub mobile: Mobile,
    pub send_invitation: bool,
    pub association_type: Option<AssociationTypeName>,
    pub locale: Option<Locale>,
    pub tags: Vec<String>,
    pub remarks: Option<String>,
    pub account_manager_id: Option<uuid::Uuid>,
}

pub const ASSOCIATION_TYPES: &[&str] = &["reseller", "referral"];
pub const LOCALES: &[&str] = &["en", "zh-CN"];

/// Checks a pre-registration command (a job's payload, which also carries
/// its `id` and `partner_id`), naming every bad field.
pub fn prereg_request(body: &Value) -> Result<PreregRequest, Vec<FieldError>> {
    prereg_fields(body, &["id", "partner_id"])
}

/// Checks a pre-registration request as a partner sends it over HTTP: any
/// field not in the request's shape is named as unknown.
pub fn prereg_http_request(body: &Value) -> Result<PreregRequest, Vec<FieldError>> {
    prereg_fields(body, &[])
}

fn prereg_fields(body: &Value, also_known: &[&str]) -> Result<PreregRequest, Vec<FieldError>> {
    let mut f = Fields::new(body);
    f.known(also_known);
    let full_name = f.required_str("full_name", 200);
    if full_name.as_deref().is_some_and(looks_like_link) {
        f.error(
            "full_name",
            "invalid",
            "full_name must be a person's or company's name, not a link",
        );
    }
    let raw_email = f.required_str("email", 254);
    let email = raw_email.as_deref().and_then(Email::parse);
    if raw_email.is_some() && email.is_none() {
        f.error("email", "invalid", "email must be a valid email address");
    }
    let raw_mobile = f.required_str("mobile", 32);
    let mobile = raw_mobile.as_deref().and_then(Mobile::parse);
    if raw_mobile.is_some() && mobile.is_none() {
        f.error(
            "mobile",
            "invalid",
            "mobile must be in E.164 format, e.g. +8613800000000",
        );
    }
    let send_invitation = f.optional_bool("send_invitation").unwrap_or(false);
    let association_type = f.optional_enum("association_type", ASSOCIATION_TYPES);
    let locale = f.optional_enum("locale", LOCALES);
    let tags = f.optional_str_list("tags", 20, 50);
    let remarks = f.optional_multiline("remarks", 2000);
    let account_manager_id = f.optional_uuid("account_manager_id");
    f.finish()?;
    let (Some(email), Some(mobile)) = (email, mobile) else {
        // Unreachable: a missing or invalid email or mobile is a field error.
        return Err(vec![]);
    };
    Ok(PreregRequest {
        full_name: full_name.unwrap_or_default(),
        email,
        mobile,
        send_invitation,
        association_type: association_type.and_then(AssociationTypeName::parse),
        locale: locale.and_then(Locale::parse),
        tags,
        remarks,
        account_manager_id,
    })
}
