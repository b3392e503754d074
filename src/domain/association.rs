//! Association attempts (SPEC §3): which failure cause, if any, decides an
//! attempt to associate a customer account with a partner.
//!
//! The causes, their order, the association model they apply to and their
//! customer-facing texts live in `data/association_failures.tsv` (columns
//! `code`, `model`, `message`, `suggestion`), embedded with `include_str!`
//! ([`ASSOCIATION_FAILURES_TSV`], parsed once by [`Causes::shipped`]).
//! [`decide`] walks that table in file order and returns the first cause whose
//! model matches the association type and whose condition holds. Conditions
//! are bound to codes in `condition`; a unit test checks that every shipped
//! code except `system_busy` has one, so table and code cannot drift apart.

use std::sync::OnceLock;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::facts::AccountFacts;

/// The shipped failure-cause table.
pub const ASSOCIATION_FAILURES_TSV: &str = include_str!("data/association_failures.tsv");

/// The header line every failure-cause table must start with.
pub const HEADER: &str = "code\tmodel\tmessage\tsuggestion";

/// The placeholder in messages and suggestions filled from configuration.
pub const PROVIDER_PLACEHOLDER: &str = "{provider}";

/// The cause reserved for attempts that could not be decided after retries;
/// [`decide`] never returns it.
pub const SYSTEM_BUSY: &str = "system_busy";

/// How the invitation associates the customer with the partner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AssociationType {
    Reseller,
    Referral,
}

impl AssociationType {
    pub const ALL: [AssociationType; 2] = [AssociationType::Reseller, AssociationType::Referral];

    pub fn as_str(self) -> &'static str {
        match self {
            AssociationType::Reseller => "reseller",
            AssociationType::Referral => "referral",
        }
    }

    pub fn parse(s: &str) -> Option<AssociationType> {
        AssociationType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Which association types a cause applies to (column `model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    Any,
    Reseller,
    Referral,
}

impl Model {
    pub fn as_str(self) -> &'static str {
        match self {
            Model::Any => "any",
            Model::Reseller => "reseller",
            Model::Referral => "referral",
        }
    }

    pub fn parse(s: &str) -> Option<Model> {
        [Model::Any, Model::Reseller, Model::Referral]
            .into_iter()
            .find(|m| m.as_str() == s)
    }

    /// Whether a cause of this model applies to an attempt of type `t`.
    pub fn applies_to(self, t: AssociationType) -> bool {
        match self {
            Model::Any => true,
            Model::Reseller => t == AssociationType::Reseller,
            Model::Referral => t == AssociationType::Referral,
        }
    }
}

/// One row of the failure-cause table, texts exactly as in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub code: String,
    pub model: Model,
    pub message: String,
    pub suggestion: String,
}

impl Cause {
    /// The cause's texts with every `{provider}` replaced by `provider`.
    pub fn view(&self, provider: &str) -> CauseView {
        CauseView {
            code: self.code.clone(),
            message: self.message.replace(PROVIDER_PLACEHOLDER, provider),
            suggestion: self.suggestion.replace(PROVIDER_PLACEHOLDER, provider),
        }
    }
}

/// A cause as shown to partners: `{provider}` filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CauseView {
    pub code: String,
    pub message: String,
    pub suggestion: String,
}

/// The parsed failure-cause table, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Causes {
    causes: Vec<Cause>,
}

impl Causes {
    /// The shipped table, parsed once.
    pub fn shipped() -> &'static Causes {
        static SHIPPED: OnceLock<Causes> = OnceLock::new();
        SHIPPED.get_or_init(|| {
            Causes::parse(ASSOCIATION_FAILURES_TSV)
                .expect("embedded data/association_failures.tsv is valid")
        })
    }

    /// Parses a table: the first line must be exactly [`HEADER`]; every
    /// other non-blank line has four tab-separated fields, a non-empty code
    /// that is not repeated, a model of `any`, `reseller` or `referral`, and
    /// non-empty message and suggestion. A trailing `\r` is ignored. Errors
    /// name the 1-based line number.
    pub fn parse(tsv: &str) -> Result<Causes, String> {
        let mut lines = tsv.split('\n').enumerate().map(|(i, l)| {
            let l = l.strip_suffix('\r').unwrap_or(l);
            (i + 1, l)
        });
        match lines.next() {
            Some((_, h)) if h == HEADER => {}
            Some((n, h)) if !h.is_empty() => {
                return Err(format!(
                    "line {n}: expected header {:?}, found {h:?}",
                    HEADER
                ))
            }
            _ => return Err(format!("line 1: missing header {:?}", HEADER)),
        }
        let mut causes: Vec<Cause> = Vec::new();
        for (n, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split('\t').collect();
            let [code, model, message, suggestion] = fields[..] else {
                return Err(format!(
                    "line {n}: expected 4 tab-separated fields, found {}",
                    fields.len()
                ));
            };
            if code.is_empty() {
                return Err(format!("line {n}: empty code"));
            }
            if code.trim() != code {
                return Err(format!("line {n}: code {code:?} has surrounding spaces"));
            }
            if causes.iter().any(|c| c.code == code) {
                return Err(format!("line {n}: duplicate code {code:?}"));
            }
            let model = Model::parse(model).ok_or_else(|| {
                format!("line {n}: unknown model {model:?} (expected any, reseller or referral)")
            })?;
            if message.trim().is_empty() {
                return Err(format!("line {n}: empty message for {code:?}"));
            }
            if suggestion.trim().is_empty() {
                return Err(format!("line {n}: empty suggestion for {code:?}"));
            }
            causes.push(Cause {
                code: code.to_string(),
                model,
                message: message.to_string(),
                suggestion: suggestion.to_string(),
            });
        }
        Ok(Causes { causes })
    }

    /// All causes, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Cause> {
        self.causes.iter()
    }

    /// All codes, in file order.
    pub fn codes(&self) -> Vec<&str> {
        self.causes.iter().map(|c| c.code.as_str()).collect()
    }

    pub fn get(&self, code: &str) -> Option<&Cause> {
        self.causes.iter().find(|c| c.code == code)
    }

    /// The cause's texts with every `{provider}` replaced by `provider`.
    pub fn view(&self, code: &str, provider: &str) -> Option<CauseView> {
        self.get(code).map(|c| c.view(provider))
    }
}

/// What the association worker knows about the invitation link or code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No invitation with this token.
    NotFound,
    /// Superseded, past expiry, or the claim is no longer active.
    Expired,
    /// The email link was already accepted.
    Used,
    /// The offline code was already used.
    CodeUsed,
    Valid,
}

impl LinkState {
    /// The state of an existing invitation's link: `status` and the link's
    /// own expiry and activation, whether its claim is still live, and
    /// whether the attempt came with the offline code rather than the link.
    pub fn of(
        status: &str,
        link_expires_at: Option<DateTime<Utc>>,
        activated: bool,
        claim_live: bool,
        by_code: bool,
        now: DateTime<Utc>,
    ) -> LinkState {
        match status {
            "accepted" if by_code => LinkState::CodeUsed,
            "accepted" => LinkState::Used,
            "queued" | "sent" if link_expires_at.is_some_and(|e| e <= now) || !claim_live => {
                LinkState::Expired
            }
            "queued" | "sent" if activated => LinkState::Valid,
            _ => LinkState::Expired,
        }
    }

    /// The failure cause this state decides by itself (the first rows of the
    /// failure-cause table), whatever the account's facts.
    pub fn cause(self) -> Option<&'static str> {
        match self {
            LinkState::Valid => None,
            LinkState::NotFound => Some("link_not_found"),
            LinkState::Expired => Some("link_expired"),
            LinkState::Used => Some("link_used"),
            LinkState::CodeUsed => Some("code_used"),
        }
    }
}

/// What the association worker knows when deciding one attempt.
#[derive(Debug, Clone)]
pub struct AttemptInput<'a> {
    pub link: LinkState,
    pub association_type: AssociationType,
    /// The partner's billing mode is `prepaid`.
    pub partner_prepaid: bool,
    /// Trimmed, lower-cased pre-registered email.
    pub preregistered_email_norm: &'a str,
    pub account: &'a AccountFacts,
    pub now: DateTime<Utc>,
    /// How long after registration an account may still be associated (7 days).
    pub registration_limit: Duration,
    /// The claim was granted by an approved manual review.
    pub registration_time_waived: bool,
}

/// A cause's condition: whether it holds for an attempt.
type Condition = fn(&AttemptInput<'_>) -> bool;

/// The condition bound to `code`; `None` for `system_busy` (never decided
/// here) and for codes this module does not know, which [`decide`] ignores.
fn condition(code: &str) -> Option<Condition> {
    let f: Condition = match code {
        "link_not_found" => |i| i.link == LinkState::NotFound,
        "link_expired" => |i| i.link == LinkState::Expired,
        "code_used" => |i| i.link == LinkState::CodeUsed,
        "link_used" => |i| i.link == LinkState::Used,
        "prepaid_partner_reseller" => |i| i.partner_prepaid,
        "registered_by_other_partner" => |i| i.account.registered_by_other_partner,
        "customer_is_partner" => |i| i.account.is_partner_or_applying,
        "associated_with_other_partner" => |i| i.account.associated_with_partner,
        "special_contract" => |i| i.account.has_special_contract,
        "internal_account" => |i| i.account.internal_account,
        "enterprise_master_independent_accounting" => {
            |i| i.account.enterprise_master_independent_accounting
        }
        "enterprise_member_account" => |i| i.account.enterprise_member_account,
        "referral_not_allowed_relationship" => |i| i.account.referral_blocked_by_relationship,
        "referral_not_allowed_country" => |i| i.account.referral_blocked_by_country,
        "consumption_record" => |i| i.account.has_consumption_record,
        "topup_balance_invoice_limit" => |i| i.account.topup_balance_over_invoice_limit,
        "registration_time_exceeded" => registration_time_exceeded,
        "overdue_payment" => |i| i.account.overdue_payment,
        "credit_bill_run_overdue" => |i| i.account.credit_bill_run_overdue,
        "support_plan" => |i| i.account.has_support_plan,
        "member_support_plan" => |i| i.account.member_has_support_plan,
        "email_mismatch" => email_mismatch,
        _ => return None,
    };
    Some(f)
}

/// Registered strictly before `now - registration_limit`, unless waived by an
/// approved manual review. An unknown registration time does not exceed.
fn registration_time_exceeded(i: &AttemptInput<'_>) -> bool {
    !i.registration_time_waived
        && i.account
            .registered_at
            .is_some_and(|r| r < i.now - i.registration_limit)
}

/// The account's email, trimmed and lower-cased, differs from the
/// pre-registered one; an account without email always mismatches.
fn email_mismatch(i: &AttemptInput<'_>) -> bool {
    match i.account.email.as_deref() {
        Some(e) => e.trim().to_lowercase() != i.preregistered_email_norm,
        None => true,
    }
}

/// The code of the first cause that applies, walking the table in file order
/// and considering each cause only for the model it names (`any`, or equal to
/// the association type); `None` means the association succeeds. Codes
/// without a condition (`system_busy`, unknown codes) are skipped.
pub fn decide(causes: &Causes, input: &AttemptInput<'_>) -> Option<String> {
    causes
        .iter()
        .filter(|c| c.model.applies_to(input.association_type))
        .find(|c| condition(&c.code).is_some_and(|holds| holds(input)))
        .map(|c| c.code.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const PREREG_EMAIL: &str = "zhang.san@example.com";

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 10, 9, 30, 0).unwrap()
    }

    fn clean_account() -> AccountFacts {
        AccountFacts {
            account_id: "acc-1".into(),
            email: Some(PREREG_EMAIL.into()),
            registered_at: Some(now() - Duration::days(1)),
            ..AccountFacts::default()
        }
    }

    /// A knob that makes the condition of one code hold.
    #[derive(Clone)]
    struct Setup {
        link: LinkState,
        partner_prepaid: bool,
        waived: bool,
        account: AccountFacts,
    }

    impl Setup {
        fn clean() -> Setup {
            Setup {
                link: LinkState::Valid,
                partner_prepaid: false,
                waived: false,
                account: clean_account(),
            }
        }

        fn input(&self, t: AssociationType) -> AttemptInput<'_> {
            AttemptInput {
                link: self.link,
                association_type: t,
                partner_prepaid: self.partner_prepaid,
                preregistered_email_norm: PREREG_EMAIL,
                account: &self.account,
                now: now(),
                registration_limit: Duration::days(7),
                registration_time_waived: self.waived,
            }
        }

        /// Makes the condition of `code` hold (in addition to whatever holds).
        fn trigger(&mut self, code: &str) {
            let a = &mut self.account;
            match code {
                "link_not_found" => self.link = LinkState::NotFound,
                "link_expired" => self.link = LinkState::Expired,
                "code_used" => self.link = LinkState::CodeUsed,
                "link_used" => self.link = LinkState::Used,
                "prepaid_partner_reseller" => self.partner_prepaid = true,
                "registered_by_other_partner" => a.registered_by_other_partner = true,
                "customer_is_partner" => a.is_partner_or_applying = true,
                "associated_with_other_partner" => a.associated_with_partner = true,
                "special_contract" => a.has_special_contract = true,
                "internal_account" => a.internal_account = true,
                "enterprise_master_independent_accounting" => {
                    a.enterprise_master_independent_accounting = true
                }
                "enterprise_member_account" => a.enterprise_member_account = true,
                "referral_not_allowed_relationship" => a.referral_blocked_by_relationship = true,
                "referral_not_allowed_country" => a.referral_blocked_by_country = true,
                "consumption_record" => a.has_consumption_record = true,
                "topup_balance_invoice_limit" => a.topup_balance_over_invoice_limit = true,
                "registration_time_exceeded" => a.registered_at = Some(now() - Duration::days(8)),
                "overdue_payment" => a.overdue_payment = true,
                "credit_bill_run_overdue" => a.credit_bill_run_overdue = true,
                "support_plan" => a.has_support_plan = true,
                "member_support_plan" => a.member_has_support_plan = true,
                "email_mismatch" => a.email = Some("li.si@example.com".into()),
                other => panic!("test has no trigger for {other:?}"),
            }
        }
    }

    /// An association type the cause's model applies to.
    fn type_for(model: Model) -> AssociationType {
        match model {
            Model::Referral => AssociationType::Referral,
            Model::Any | Model::Reseller => AssociationType::Reseller,
        }
    }

    fn decidable_causes() -> Vec<&'static Cause> {
        Causes::shipped()
            .iter()
            .filter(|c| c.code != SYSTEM_BUSY)
            .collect()
    }

    fn shipped_rows() -> Vec<Vec<&'static str>> {
        ASSOCIATION_FAILURES_TSV
            .lines()
            .skip(1)
            .map(|l| l.split('\t').collect())
            .collect()
    }

    #[test]
    fn shipped_table_parses_in_file_order() {
        let causes = Causes::shipped();
        let raw: Vec<&str> = shipped_rows().iter().map(|r| r[0]).collect();
        assert_eq!(causes.codes(), raw);
        assert_eq!(causes.codes().len(), 23);
        assert_eq!(causes.codes().first(), Some(&SYSTEM_BUSY));
        assert_eq!(causes.codes().last(), Some(&"email_mismatch"));
        assert!(std::ptr::eq(causes, Causes::shipped()), "parsed once");
        let c = causes.get("credit_bill_run_overdue").unwrap();
        assert_eq!(c.model, Model::Reseller);
        assert_eq!(
            causes.get("referral_not_allowed_country").unwrap().model,
            Model::Referral
        );
        assert_eq!(causes.get("overdue_payment").unwrap().model, Model::Any);
        assert!(causes.get("nope").is_none());
        assert!(causes.view("nope", "X").is_none());
    }

    #[test]
    fn every_shipped_code_except_system_busy_has_a_condition() {
        for code in Causes::shipped().codes() {
            if code == SYSTEM_BUSY {
                assert!(condition(code).is_none(), "system_busy is never decided");
            } else {
                assert!(
                    condition(code).is_some(),
                    "no condition for shipped code {code:?}"
                );
            }
        }
        assert!(condition("no_such_code").is_none());
    }

    #[test]
    fn the_shipped_models_are_as_specified() {
        let causes = Causes::shipped();
        let reseller: Vec<&str> = causes
            .iter()
            .filter(|c| c.model == Model::Reseller)
            .map(|c| c.code.as_str())
            .collect();
        let referral: Vec<&str> = causes
            .iter()
            .filter(|c| c.model == Model::Referral)
            .map(|c| c.code.as_str())
            .collect();
        assert_eq!(
            reseller,
            [
                "prepaid_partner_reseller",
                "enterprise_master_independent_accounting",
                "enterprise_member_account",
                "credit_bill_run_overdue"
            ]
        );
        assert_eq!(
            referral,
            [
                "referral_not_allowed_relationship",
                "referral_not_allowed_country"
            ]
        );
    }

    #[test]
    fn every_cause_is_reachable_alone() {
        for cause in decidable_causes() {
            let t = type_for(cause.model);
            let mut s = Setup::clean();
            s.trigger(&cause.code);
            let input = s.input(t);
            // Exactly this cause holds among the causes for this type.
            let holding: Vec<&str> = Causes::shipped()
                .iter()
                .filter(|c| c.model.applies_to(t))
                .filter(|c| condition(&c.code).is_some_and(|f| f(&input)))
                .map(|c| c.code.as_str())
                .collect();
            assert_eq!(holding, [cause.code.as_str()]);
            assert_eq!(
                decide(Causes::shipped(), &input).as_deref(),
                Some(cause.code.as_str())
            );
            if cause.model == Model::Any {
                let other = s.input(AssociationType::Referral);
                assert_eq!(
                    decide(Causes::shipped(), &other).as_deref(),
                    Some(cause.code.as_str()),
                    "an `any` cause applies to referral too"
                );
            }
        }
    }

    #[test]
    fn success_when_nothing_applies() {
        let s = Setup::clean();
        for t in AssociationType::ALL {
            assert_eq!(decide(Causes::shipped(), &s.input(t)), None);
        }
    }

    #[test]
    fn facts_without_a_cause_do_not_fail() {
        // Facts that matter for eligibility but not for association.
        let mut s = Setup::clean();
        s.account.has_contract = true;
        s.account.has_cash_expenditure = true;
        s.account.followed_by_direct_sales = true;
        s.account.enterprise_master_unified_accounting = true;
        s.account.online_sales_team = true;
        s.account.site = Some("cn".into());
        for t in AssociationType::ALL {
            assert_eq!(decide(Causes::shipped(), &s.input(t)), None);
        }
    }

    #[test]
    fn reseller_only_causes_do_not_apply_to_referral_and_vice_versa() {
        for cause in decidable_causes() {
            let mut s = Setup::clean();
            s.trigger(&cause.code);
            for t in AssociationType::ALL {
                let expected = cause.model.applies_to(t).then(|| cause.code.clone());
                assert_eq!(
                    decide(Causes::shipped(), &s.input(t)),
                    expected,
                    "{} for {}",
                    cause.code,
                    t.as_str()
                );
            }
        }
        // Spot checks by name.
        let mut s = Setup::clean();
        s.partner_prepaid = true;
        assert_eq!(
            decide(Causes::shipped(), &s.input(AssociationType::Referral)),
            None
        );
        let mut s = Setup::clean();
        s.account.referral_blocked_by_country = true;
        assert_eq!(
            decide(Causes::shipped(), &s.input(AssociationType::Reseller)),
            None
        );
    }

    #[test]
    fn model_filtering_falls_through_to_a_later_cause() {
        // Referral: the reseller-only prepaid cause is skipped, a later `any`
        // cause decides.
        let cause = |s: &Setup, t| decide(Causes::shipped(), &s.input(t));
        let mut s = Setup::clean();
        s.partner_prepaid = true;
        s.account.enterprise_member_account = true;
        s.account.overdue_payment = true;
        let referral = cause(&s, AssociationType::Referral);
        assert_eq!(referral.as_deref(), Some("overdue_payment"));
        let reseller = cause(&s, AssociationType::Reseller);
        assert_eq!(reseller.as_deref(), Some("prepaid_partner_reseller"));
        // Reseller: the referral-only causes are skipped.
        let mut s = Setup::clean();
        s.account.referral_blocked_by_relationship = true;
        s.account.has_support_plan = true;
        let reseller = cause(&s, AssociationType::Reseller);
        assert_eq!(reseller.as_deref(), Some("support_plan"));
        let referral = cause(&s, AssociationType::Referral);
        assert_eq!(
            referral.as_deref(),
            Some("referral_not_allowed_relationship")
        );
    }

    fn decide_with(codes: &[&str], t: AssociationType) -> Option<String> {
        let mut s = Setup::clean();
        for c in codes {
            s.trigger(c);
        }
        decide(Causes::shipped(), &s.input(t))
    }

    #[test]
    fn earlier_row_wins_named_pairs() {
        use AssociationType::{Referral, Reseller};
        let cases: &[(&str, &str, AssociationType)] = &[
            ("link_not_found", "email_mismatch", Reseller),
            ("link_expired", "prepaid_partner_reseller", Reseller),
            ("code_used", "registered_by_other_partner", Reseller),
            ("link_used", "referral_not_allowed_country", Referral),
            (
                "prepaid_partner_reseller",
                "registered_by_other_partner",
                Reseller,
            ),
            (
                "registered_by_other_partner",
                "customer_is_partner",
                Referral,
            ),
            ("internal_account", "consumption_record", Reseller),
            (
                "enterprise_master_independent_accounting",
                "enterprise_member_account",
                Reseller,
            ),
            (
                "referral_not_allowed_relationship",
                "referral_not_allowed_country",
                Referral,
            ),
            ("registration_time_exceeded", "overdue_payment", Referral),
            ("overdue_payment", "credit_bill_run_overdue", Reseller),
            ("support_plan", "member_support_plan", Referral),
            ("member_support_plan", "email_mismatch", Reseller),
        ];
        for &(first, second, t) in cases {
            assert_eq!(decide_with(&[first, second], t).as_deref(), Some(first));
            assert_eq!(decide_with(&[second, first], t).as_deref(), Some(first));
        }
    }

    #[test]
    fn earlier_row_wins_every_pair() {
        let all = decidable_causes();
        let is_link = |c: &str| {
            matches!(
                c,
                "link_not_found" | "link_expired" | "code_used" | "link_used"
            )
        };
        let mut checked = 0;
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                // Link states exclude each other.
                if is_link(&a.code) && is_link(&b.code) {
                    continue;
                }
                for t in AssociationType::ALL {
                    if !(a.model.applies_to(t) && b.model.applies_to(t)) {
                        continue;
                    }
                    assert_eq!(
                        decide_with(&[&a.code, &b.code], t).as_deref(),
                        Some(a.code.as_str()),
                        "{} before {} ({})",
                        a.code,
                        b.code,
                        t.as_str()
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 200, "checked {checked} pairs");
    }

    #[test]
    fn link_state_beats_everything_and_email_mismatch_comes_last() {
        let everything_but_link: Vec<&str> = decidable_causes()
            .iter()
            .map(|c| c.code.as_str())
            .filter(|c| !c.starts_with("link_") && *c != "code_used")
            .collect();
        for t in AssociationType::ALL {
            for (link, code) in [
                (LinkState::NotFound, "link_not_found"),
                (LinkState::Expired, "link_expired"),
                (LinkState::Used, "link_used"),
                (LinkState::CodeUsed, "code_used"),
            ] {
                let mut s = Setup::clean();
                for c in &everything_but_link {
                    s.trigger(c);
                }
                s.link = link;
                assert_eq!(
                    decide(Causes::shipped(), &s.input(t)).as_deref(),
                    Some(code)
                );
            }
            // email_mismatch only when nothing else applies.
            for other in &everything_but_link {
                if *other == "email_mismatch" {
                    continue;
                }
                let cause = Causes::shipped().get(other).unwrap();
                if !cause.model.applies_to(t) {
                    continue;
                }
                assert_eq!(
                    decide_with(&["email_mismatch", other], t).as_deref(),
                    Some(*other)
                );
            }
            assert_eq!(
                decide_with(&["email_mismatch"], t).as_deref(),
                Some("email_mismatch")
            );
        }
    }

    #[test]
    fn email_comparison_is_normalised_and_missing_email_mismatches() {
        let mut s = Setup::clean();
        s.account.email = Some("  Zhang.San@Example.COM \n".into());
        assert_eq!(
            decide(Causes::shipped(), &s.input(AssociationType::Reseller)),
            None
        );
        s.account.email = None;
        assert_eq!(
            decide(Causes::shipped(), &s.input(AssociationType::Reseller)).as_deref(),
            Some("email_mismatch")
        );
        s.account.email = Some(String::new());
        assert_eq!(
            decide(Causes::shipped(), &s.input(AssociationType::Reseller)).as_deref(),
            Some("email_mismatch")
        );
        // Missing email mismatches even an empty pre-registered email.
        let account = AccountFacts {
            email: None,
            ..clean_account()
        };
        let input = AttemptInput {
            preregistered_email_norm: "",
            account: &account,
            ..Setup::clean().input(AssociationType::Referral)
        };
        assert_eq!(
            decide(Causes::shipped(), &input).as_deref(),
            Some("email_mismatch")
        );
    }

    #[test]
    fn registration_time_limit_boundaries_and_waiver() {
        let decide_at = |registered_at: Option<DateTime<Utc>>, waived: bool| {
            let mut s = Setup::clean();
            s.account.registered_at = registered_at;
            s.waived = waived;
            decide(Causes::shipped(), &s.input(AssociationType::Reseller))
        };
        let limit = now() - Duration::days(7);
        assert_eq!(
            decide_at(Some(limit), false),
            None,
            "exactly at the limit is fine"
        );
        assert_eq!(
            decide_at(Some(limit - Duration::seconds(1)), false).as_deref(),
            Some("registration_time_exceeded")
        );
        assert_eq!(
            decide_at(Some(limit - Duration::days(30)), true),
            None,
            "waived by review"
        );
        assert_eq!(decide_at(None, false), None, "unknown registration time");
        // The limit comes from the input.
        let mut s = Setup::clean();
        s.account.registered_at = Some(now() - Duration::days(2));
        let input = AttemptInput {
            registration_limit: Duration::days(1),
            ..s.input(AssociationType::Referral)
        };
        assert_eq!(
            decide(Causes::shipped(), &input).as_deref(),
            Some("registration_time_exceeded")
        );
        // A waiver does not hide later causes.
        let mut s = Setup::clean();
        s.trigger("registration_time_exceeded");
        s.trigger("overdue_payment");
        s.waived = true;
        assert_eq!(
            decide(Causes::shipped(), &s.input(AssociationType::Reseller)).as_deref(),
            Some("overdue_payment")
        );
    }

    #[test]
    fn unknown_codes_are_ignored_and_system_busy_is_never_decided() {
        let tsv = "code\tmodel\tmessage\tsuggestion\n\
                   system_busy\tany\tBusy.\tLater.\n\
                   brand_new_rule\tany\tNew.\tNew.\n\
                   overdue_payment\tany\tOverdue.\tPay.\n";
        let causes = Causes::parse(tsv).unwrap();
        assert_eq!(
            causes.codes(),
            ["system_busy", "brand_new_rule", "overdue_payment"]
        );
        let mut s = Setup::clean();
        for t in AssociationType::ALL {
            assert_eq!(decide(&causes, &s.input(t)), None);
        }
        s.trigger("overdue_payment");
        s.trigger("email_mismatch"); // not in this table
        assert_eq!(
            decide(&causes, &s.input(AssociationType::Referral)).as_deref(),
            Some("overdue_payment")
        );
        // Even with everything failing, the shipped table never yields system_busy.
        let mut s = Setup::clean();
        for c in decidable_causes() {
            if !c.code.starts_with("link_") && c.code != "code_used" {
                s.trigger(&c.code);
            }
        }
        for link in [LinkState::Valid, LinkState::NotFound, LinkState::Expired] {
            s.link = link;
            for t in AssociationType::ALL {
                assert_ne!(
                    decide(Causes::shipped(), &s.input(t)).as_deref(),
                    Some(SYSTEM_BUSY)
                );
            }
        }
    }

    #[test]
    fn provider_is_filled_in() {
        let causes = Causes::shipped();
        let v = causes.view("internal_account", "Acme Cloud").unwrap();
        assert_eq!(v.code, "internal_account");
        assert_eq!(
            v.message,
            "Failed to associate with the partner because the customer uses a Acme Cloud internal account."
        );
        let v = causes
            .view("referral_not_allowed_relationship", "Acme Cloud")
            .unwrap();
        assert!(v
            .message
            .starts_with("According to your signed relationship with Acme Cloud, "));
        for code in ["internal_account", "referral_not_allowed_relationship"] {
            assert!(causes
                .get(code)
                .unwrap()
                .message
                .contains(PROVIDER_PLACEHOLDER));
        }
        for code in causes.codes() {
            let v = causes.view(code, "Acme Cloud").unwrap();
            assert!(!v.message.contains(PROVIDER_PLACEHOLDER), "{code}");
            assert!(!v.suggestion.contains(PROVIDER_PLACEHOLDER), "{code}");
        }
        // Every occurrence, in both columns.
        let c = Causes::parse(
            "code\tmodel\tmessage\tsuggestion\nx\tany\t{provider} and {provider}\tAsk {provider}.\n",
        )
        .unwrap();
        let v = c.view("x", "P").unwrap();
        assert_eq!(v.message, "P and P");
        assert_eq!(v.suggestion, "Ask P.");
    }

    #[test]
    fn views_equal_the_tsv_text_byte_for_byte() {
        let causes = Causes::shipped();
        let rows = shipped_rows();
        assert_eq!(rows.len(), causes.codes().len());
        for row in rows {
            let [code, model, message, suggestion] = row[..] else {
                panic!("bad shipped row {row:?}")
            };
            let cause = causes.get(code).unwrap();
            assert_eq!(cause.model.as_str(), model);
            assert_eq!(cause.message, message);
            assert_eq!(cause.suggestion, suggestion);
            let v = causes.view(code, "Acme").unwrap();
            assert_eq!(v.message, message.replace("{provider}", "Acme"));
            assert_eq!(v.suggestion, suggestion.replace("{provider}", "Acme"));
            // With the placeholder itself as provider, the text is unchanged.
            let same = causes.view(code, PROVIDER_PLACEHOLDER).unwrap();
            assert_eq!(same.message.as_bytes(), message.as_bytes());
            assert_eq!(same.suggestion.as_bytes(), suggestion.as_bytes());
            if !message.contains("{provider}") {
                assert_eq!(v.message, message);
            }
        }
    }

    #[test]
    fn parse_errors_name_the_line() {
        let err = |tsv: &str| Causes::parse(tsv).unwrap_err();
        assert!(err("").starts_with("line 1:"));
        assert!(err("code\tmodel\tmessage\n").starts_with("line 1:"));
        assert!(err("Code\tmodel\tmessage\tsuggestion\n").starts_with("line 1:"));
        assert!(err("code model message suggestion\n").starts_with("line 1:"));
        assert!(err("code\tmodel\tmessage\tsuggestion\textra\n").starts_with("line 1:"));
        let h = "code\tmodel\tmessage\tsuggestion\n";
        let ok = "a\tany\tM.\tS.\n";
        let e = err(&format!("{h}{ok}b\tany\tM.\n"));
        assert!(
            e.starts_with("line 3:") && e.contains("4 tab-separated fields"),
            "{e}"
        );
        let e = err(&format!("{h}{ok}b\tany\tM.\tS.\tX\n"));
        assert!(e.starts_with("line 3:"), "{e}");
        let e = err(&format!("{h}b\twholesale\tM.\tS.\n"));
        assert!(e.starts_with("line 2:") && e.contains("wholesale"), "{e}");
        let e = err(&format!("{h}{ok}\n{ok}"));
        assert!(e.starts_with("line 4:") && e.contains("duplicate"), "{e}");
        let e = err(&format!("{h}{ok}\tany\tM.\tS.\n"));
        assert!(e.starts_with("line 3:") && e.contains("empty code"), "{e}");
        let e = err(&format!("{h}{ok}b\tany\t\tS.\n"));
        assert!(
            e.starts_with("line 3:") && e.contains("empty message"),
            "{e}"
        );
        let e = err(&format!("{h}b\tany\tM.\t \n"));
        assert!(
            e.starts_with("line 2:") && e.contains("empty suggestion"),
            "{e}"
        );
        let e = err(&format!("{h}b \tany\tM.\tS.\n"));
        assert!(e.starts_with("line 2:"), "{e}");
    }

    #[test]
    fn parse_accepts_blank_lines_crlf_and_a_header_only_table() {
        let c = Causes::parse("code\tmodel\tmessage\tsuggestion").unwrap();
        assert!(c.codes().is_empty());
        let c = Causes::parse(
            "code\tmodel\tmessage\tsuggestion\r\na\treseller\tM a.\tS a.\r\n\r\nb\treferral\tM b.\tS b.",
        )
        .unwrap();
        assert_eq!(c.codes(), ["a", "b"]);
        assert_eq!(
            c.get("a"),
            Some(&Cause {
                code: "a".into(),
                model: Model::Reseller,
                message: "M a.".into(),
                suggestion: "S a.".into(),
            })
        );
        assert_eq!(c.get("b").unwrap().suggestion, "S b.");
    }

    #[test]
    fn association_type_and_model_round_trip() {
        for t in AssociationType::ALL {
            assert_eq!(AssociationType::parse(t.as_str()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        assert_eq!(AssociationType::parse("Reseller"), None);
        assert_eq!(AssociationType::parse("any"), None);
        for m in [Model::Any, Model::Reseller, Model::Referral] {
            assert_eq!(Model::parse(m.as_str()), Some(m));
        }
        assert_eq!(Model::parse(""), None);
        assert!(Model::Any.applies_to(AssociationType::Referral));
        assert!(!Model::Reseller.applies_to(AssociationType::Referral));
        assert!(!Model::Referral.applies_to(AssociationType::Reseller));
        let v = Causes::shipped().view("link_expired", "X").unwrap();
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            serde_json::json!({
                "code": "link_expired",
                "message": "The invitation link has expired.",
                "suggestion": "Send the invitation email again."
            })
        );
    }
}
