//! Eligibility of a pre-registration (SPEC §1), evaluated in order: the first
//! rule that applies decides.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{facts::AccountFacts, status::Status};

/// How long after its registration an account can still be developed by a
/// partner (SPEC §1 "registered over 7 days"); the association check applies
/// the same limit.
pub fn registration_limit() -> Duration {
    Duration::days(7)
}

/// The partner's quota is used up: `active` claims and reviews count toward it.
pub fn quota_reached(active: i64, quota: i64) -> bool {
    active >= quota
}

/// Why a pre-registration was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    AlreadyPreregistered,
    PreregisteredByOtherPartner,
    AssociatedWithPartner,
    RegisteredCnSite,
    HasContract,
    CashExpenditureNotFollowed,
    EnterpriseMasterUnifiedAccounting,
    QuotaExceeded,
    RegisteredOver7Days,
    CountryMismatch,
    OnlineSalesTeam,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::AlreadyPreregistered,
        Reason::PreregisteredByOtherPartner,
        Reason::AssociatedWithPartner,
        Reason::RegisteredCnSite,
        Reason::HasContract,
        Reason::CashExpenditureNotFollowed,
        Reason::EnterpriseMasterUnifiedAccounting,
        Reason::QuotaExceeded,
        Reason::RegisteredOver7Days,
        Reason::CountryMismatch,
        Reason::OnlineSalesTeam,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::AlreadyPreregistered => "already_preregistered",
            Reason::PreregisteredByOtherPartner => "preregistered_by_other_partner",
            Reason::AssociatedWithPartner => "associated_with_partner",
            Reason::RegisteredCnSite => "registered_cn_site",
            Reason::HasContract => "has_contract",
            Reason::CashExpenditureNotFollowed => "cash_expenditure_not_followed",
            Reason::EnterpriseMasterUnifiedAccounting => "enterprise_master_unified_accounting",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::RegisteredOver7Days => "registered_over_7_days",
            Reason::CountryMismatch => "country_mismatch",
            Reason::OnlineSalesTeam => "online_sales_team",
        }
    }

    pub fn parse(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == code)
    }

    pub fn message(self) -> &'static str {
        match self {
            Reason::AlreadyPreregistered => "You have already pre-registered this customer; the existing pre-registration stays in force.",
            Reason::PreregisteredByOtherPartner => "The customer has been pre-registered by another partner.",
            Reason::AssociatedWithPartner => "The customer's account is already associated with a partner.",
            Reason::RegisteredCnSite => "The customer's account is registered on the Chinese mainland site.",
            Reason::HasContract => "The customer has signed contracts with the provider.",
            Reason::CashExpenditureNotFollowed => "The customer's account has cash expenditure and is not followed up by the direct sales team.",
            Reason::EnterpriseMasterUnifiedAccounting => "The customer's account is associated with an enterprise master account under unified accounting.",
            Reason::QuotaExceeded => "You have reached the maximum number of customers pending review or pre-registered.",
            Reason::RegisteredOver7Days => "The customer's account was registered more than 7 days ago or has cash expenditure followed up by direct sales. You may request a manual review.",
            Reason::CountryMismatch => "The customer's registration country differs from the country where you do business. You may request a manual review.",
            Reason::OnlineSalesTeam => "The customer's account belongs to the online sales team. You may request a manual review.",
        }
    }

    /// Whether the partner may ask for a manual review of this rejection.
    pub fn manual_review_eligible(self) -> bool {
        matches!(
            self,
            Reason::RegisteredOver7Days | Reason::CountryMismatch | Reason::OnlineSalesTeam
        )
    }
}

/// A claim some partner holds on the same customer (same email or mobile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingClaim {
    pub id: Uuid,
    pub partner_id: Uuid,
    pub status: Status,
    pub expires_at: Option<DateTime<Utc>>,
}

impl ExistingClaim {
    /// A claim whose validity has passed but which the sweep has not reached
    /// yet no longer protects the customer.
    pub fn lapsed(&self, now: DateTime<Utc>) -> bool {
        self.status != Status::Associated && self.expires_at.is_some_and(|e| e <= now)
    }

    fn active(&self, now: DateTime<Utc>) -> bool {
        self.status.holds_claim() && !self.lapsed(now)
    }
}

pub struct EligibilityInput<'a> {
    pub partner_id: Uuid,
    /// Where the partner does business (ISO 3166-1 alpha-2).
    pub partner_country: &'a str,
    pub now: DateTime<Utc>,
    /// Claims on the same customer (any partner).
    pub claims: &'a [ExistingClaim],
    /// Accounts known for the customer's email or mobile.
    pub accounts: &'a [AccountFacts],
    /// The partner's customers pending review or pre-registered.
    pub partner_active: i64,
    pub quota: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Preregistered,
    AlreadyPreregistered { existing_id: Uuid },
    Rejected { reason: Reason },
}

/// The registration decision (SPEC §1, rules 1 to 5 in order).
pub fn decide(input: &EligibilityInput<'_>) -> Decision {
    let active = || input.claims.iter().filter(|c| c.active(input.now));
    // 1. Same partner, active claim.
    if let Some(own) = active().find(|c| c.partner_id == input.partner_id) {
        return Decision::AlreadyPreregistered {
            existing_id: own.id,
        };
    }
    let reject = |reason| Decision::Rejected { reason };
    // 2. Blocked, no review possible.
    if active().any(|c| c.partner_id != input.partner_id) {
        return reject(Reason::PreregisteredByOtherPartner);
    }
    let any = |f: fn(&AccountFacts) -> bool| input.accounts.iter().any(f);
    if any(|a| a.associated_with_partner) {
        return reject(Reason::AssociatedWithPartner);
    }
    if any(|a| {
        a.site
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("cn"))
    }) {
        return reject(Reason::RegisteredCnSite);
    }
    if any(|a| a.has_contract) {
        return reject(Reason::HasContract);
    }
    if any(|a| a.has_cash_expenditure && !a.followed_by_direct_sales) {
        return reject(Reason::CashExpenditureNotFollowed);
    }
    if any(|a| a.enterprise_master_unified_accounting) {
        return reject(Reason::EnterpriseMasterUnifiedAccounting);
    }
    // 3. Quota.
    if quota_reached(input.partner_active, input.quota) {
        return reject(Reason::QuotaExceeded);
    }
    // 4. Manual review possible.
    let week_ago = input.now - registration_limit();
    if input.accounts.iter().any(|a| {
        a.registered_at.is_some_and(|r| r < week_ago)
            || (a.has_cash_expenditure && a.followed_by_direct_sales)
    }) {
        return reject(Reason::RegisteredOver7Days);
    }
    if input.accounts.iter().any(|a| {
        a.country
            .as_deref()
            .is_some_and(|c| !c.trim().eq_ignore_ascii_case(input.partner_country.trim()))
    }) {
        return reject(Reason::CountryMismatch);
    }
    if any(|a| a.online_sales_team) {
        return reject(Reason::OnlineSalesTeam);
    }
    // 5.
    Decision::Preregistered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-20T08:00:00Z".parse().unwrap()
    }

    fn fresh_account() -> AccountFacts {
        AccountFacts {
            account_id: "a1".into(),
            registered_at: Some(now() - Duration::days(1)),
            site: Some("intl".into()),
            country: Some("SG".into()),
            ..Default::default()
        }
    }

    fn run(claims: &[ExistingClaim], accounts: &[AccountFacts], active: i64) -> Decision {
        decide(&EligibilityInput {
            partner_id: me(),
            partner_country: "SG",
            now: now(),
            claims,
            accounts,
            partner_active: active,
            quota: 100,
        })
    }

    fn me() -> Uuid {
        Uuid::from_u128(1)
    }

    fn claim(partner: u128, status: Status, expires_in_h: i64) -> ExistingClaim {
        ExistingClaim {
            id: Uuid::from_u128(1000 + partner),
            partner_id: Uuid::from_u128(partner),
            status,
            expires_at: Some(now() + Duration::hours(expires_in_h)),
        }
    }

    fn rejected(d: Decision) -> Reason {
        match d {
            Decision::Rejected { reason } => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn new_customer_is_preregistered() {
        assert_eq!(run(&[], &[], 0), Decision::Preregistered);
        assert_eq!(run(&[], &[fresh_account()], 99), Decision::Preregistered);
    }

    #[test]
    fn own_claim_comes_first() {
        let mut a = fresh_account();
        a.has_contract = true;
        let claims = [
            claim(2, Status::Invited, 5),
            claim(1, Status::Preregistered, 5),
        ];
        assert_eq!(
            run(&claims, &[a], 100),
            Decision::AlreadyPreregistered {
                existing_id: Uuid::from_u128(1001)
            }
        );
    }

    #[test]
    fn other_partner_blocks_before_account_facts() {
        let mut a = fresh_account();
        a.associated_with_partner = true;
        assert_eq!(
            rejected(run(&[claim(2, Status::Associated, -5)], &[a], 0)),
            Reason::PreregisteredByOtherPartner
        );
    }

    #[test]
    fn lapsed_and_inactive_claims_do_not_block() {
        let claims = [
            claim(2, Status::Preregistered, -1),
            claim(3, Status::Expired, 5),
            claim(4, Status::Rejected, 5),
            claim(5, Status::UnderReview, 5),
            claim(1, Status::Deleted, 5),
        ];
        assert_eq!(run(&claims, &[], 0), Decision::Preregistered);
    }

    #[test]
    fn blocking_facts_in_order() {
        type Setter = fn(&mut AccountFacts);
        let cases: [(Setter, Reason); 5] = [
            (
                |a| a.associated_with_partner = true,
                Reason::AssociatedWithPartner,
            ),
            (|a| a.site = Some("cn".into()), Reason::RegisteredCnSite),
            (|a| a.has_contract = true, Reason::HasContract),
            (
                |a| a.has_cash_expenditure = true,
                Reason::CashExpenditureNotFollowed,
            ),
            (
                |a| a.enterprise_master_unified_accounting = true,
                Reason::EnterpriseMasterUnifiedAccounting,
            ),
        ];
        for (i, (set, expected)) in cases.iter().enumerate() {
            // This fact alone decides, even with every later rule also true.
            let mut a = fresh_account();
            set(&mut a);
            for (later, _) in &cases[i + 1..] {
                later(&mut a);
            }
            a.online_sales_team = true;
            a.country = Some("US".into());
            a.registered_at = Some(now() - Duration::days(30));
            assert_eq!(rejected(run(&[], &[a], 100)), *expected, "case {i}");
            assert!(!expected.manual_review_eligible());
        }
    }

    #[test]
    fn quota_before_reviewable_rules() {
        let mut a = fresh_account();
        a.online_sales_team = true;
        assert_eq!(rejected(run(&[], &[a.clone()], 100)), Reason::QuotaExceeded);
        assert_eq!(rejected(run(&[], &[], 100)), Reason::QuotaExceeded);
        assert_eq!(rejected(run(&[], &[a], 99)), Reason::OnlineSalesTeam);
        assert!(!Reason::QuotaExceeded.manual_review_eligible());
    }

    #[test]
    fn reviewable_rules_in_order() {
        let mut a = fresh_account();
        a.registered_at = Some(now() - Duration::days(8));
        a.country = Some("US".into());
        a.online_sales_team = true;
        assert_eq!(
            rejected(run(&[], &[a.clone()], 0)),
            Reason::RegisteredOver7Days
        );
        a.registered_at = Some(now() - Duration::days(6));
        assert_eq!(rejected(run(&[], &[a.clone()], 0)), Reason::CountryMismatch);
        a.country = Some("sg".into());
        assert_eq!(rejected(run(&[], &[a.clone()], 0)), Reason::OnlineSalesTeam);
        a.online_sales_team = false;
        assert_eq!(run(&[], &[a.clone()], 0), Decision::Preregistered);
        // Cash expenditure followed by direct sales counts as "over 7 days".
        a.has_cash_expenditure = true;
        a.followed_by_direct_sales = true;
        assert_eq!(rejected(run(&[], &[a], 0)), Reason::RegisteredOver7Days);
        for r in [
            Reason::RegisteredOver7Days,
            Reason::CountryMismatch,
            Reason::OnlineSalesTeam,
        ] {
            assert!(r.manual_review_eligible());
        }
    }

    #[test]
    fn codes_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.code()), Some(r));
            assert!(!r.message().is_empty());
        }
    }
}
