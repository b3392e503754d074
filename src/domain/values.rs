//! Values checked once at the edge and carried typed from there on: an
//! email address, an E.164 mobile number, an association type, a locale.
//!
//! On the wire each is the plain string it always was (`serde(transparent)`),
//! so message and API shapes are unchanged. Reading a message does not
//! re-check the value: an upstream command is checked by `src/admission.rs`
//! exactly as an HTTP request is, with every bad field named, rather than
//! failing to parse. [`Email`] and [`Mobile`] print masked in `Debug`, so a
//! job logged with `{:?}` does not leak personal data.

use std::{fmt, ops::Deref};

use serde::{Deserialize, Serialize};

use super::{mask, validate};

macro_rules! text_value {
    ($(#[$doc:meta])* $name:ident, $check:expr, debug: $debug:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The value if `s` is valid (the one check, at the edge).
            pub fn parse(s: &str) -> Option<$name> {
                let check: fn(&str) -> bool = $check;
                check(s).then(|| $name(s.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        /// A value read back from our own storage or messages (checked when
        /// it entered).
        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }

        /// A plain string in the published schemas (AsyncAPI).
        impl schemars::JsonSchema for $name {
            fn schema_name() -> String {
                String::schema_name()
            }
            fn json_schema(g: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
                String::json_schema(g)
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let show: fn(&str) -> String = $debug;
                write!(f, "{}({})", stringify!($name), show(&self.0))
            }
        }
    };
}

text_value!(
    /// An email address: one `@`, a non-empty local part, a dotted domain.
    Email,
    validate::is_email,
    debug: mask::email
);

text_value!(
    /// A mobile number in E.164 format.
    Mobile,
    validate::is_e164,
    debug: mask::mobile
);

text_value!(
    /// `reseller` or `referral` ([`super::association::AssociationType`]).
    AssociationTypeName,
    |s| validate::ASSOCIATION_TYPES.contains(&s),
    debug: str::to_string
);

text_value!(
    /// A locale the templates are written in: `en` or `zh-CN`.
    Locale,
    |s| validate::LOCALES.contains(&s),
    debug: str::to_string
);

impl Email {
    /// Trimmed and lower-cased: the form claims are matched on.
    pub fn normalized(&self) -> String {
        super::normalize_email(&self.0)
    }
}

impl Mobile {
    /// Without spaces, dashes, dots and brackets: the form claims are matched on.
    pub fn normalized(&self) -> String {
        super::normalize_mobile(&self.0)
    }
}

impl AssociationTypeName {
    pub fn kind(&self) -> Option<super::association::AssociationType> {
        super::association::AssociationType::parse(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_accepts_what_validation_accepts() {
        assert!(Email::parse("a@b.co").is_some());
        assert!(Email::parse("a@b").is_none());
        assert!(Mobile::parse("+8613800000000").is_some());
        assert!(Mobile::parse("13800000000").is_none());
        assert!(AssociationTypeName::parse("referral").is_some());
        assert!(AssociationTypeName::parse("partner").is_none());
        assert!(Locale::parse("zh-CN").is_some());
        assert!(Locale::parse("fr").is_none());
    }

    #[test]
    fn the_wire_format_is_the_plain_string() {
        let e = Email::parse("Zhang.San@Example.com").unwrap();
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            "\"Zhang.San@Example.com\""
        );
        let back: Email = serde_json::from_str("\"Zhang.San@Example.com\"").unwrap();
        assert_eq!(back, e);
        assert_eq!(e.normalized(), "zhang.san@example.com");
        let l: Option<Locale> = serde_json::from_str("\"zh-CN\"").unwrap();
        assert_eq!(l.as_deref(), Some("zh-CN"));
    }

    #[test]
    fn debug_masks_personal_data() {
        let e = Email::parse("zhang.san@example.com").unwrap();
        let m = Mobile::parse("+8613812345678").unwrap();
        let shown = format!("{e:?} {m:?}");
        assert!(!shown.contains("zhang.san"), "{shown}");
        assert!(!shown.contains("12345678"), "{shown}");
    }

    proptest! {
        #[test]
        fn parse_is_the_validator(s in "\\PC{0,40}") {
            prop_assert_eq!(Email::parse(&s).is_some(), validate::is_email(&s));
            prop_assert_eq!(Mobile::parse(&s).is_some(), validate::is_e164(&s));
        }

        #[test]
        fn a_parsed_value_round_trips(local in "[a-z0-9.]{1,20}", domain in "[a-z]{1,10}\\.[a-z]{2,5}") {
            let s = format!("{local}@{domain}");
            let e = Email::parse(&s).unwrap();
            let json = serde_json::to_string(&e).unwrap();
            let back: Email = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back.as_str(), s.as_str());
        }
    }
}
