//! Account facts, as the account system reports them (`account.upserted`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct AccountFacts {
    pub account_id: String,
    pub email: Option<String>,
    pub mobile: Option<String>,
    pub display_name: Option<String>,
    pub registered_at: Option<DateTime<Utc>>,
    /// `cn` or `intl`.
    pub site: Option<String>,
    /// ISO 3166-1 alpha-2.
    pub country: Option<String>,
    pub associated_with_partner: bool,
    pub is_partner_or_applying: bool,
    pub has_contract: bool,
    pub has_special_contract: bool,
    pub has_cash_expenditure: bool,
    pub followed_by_direct_sales: bool,
    pub enterprise_master_unified_accounting: bool,
    pub enterprise_master_independent_accounting: bool,
    pub enterprise_member_account: bool,
    pub internal_account: bool,
    pub online_sales_team: bool,
    pub has_consumption_record: bool,
    pub topup_balance_over_invoice_limit: bool,
    pub overdue_payment: bool,
    pub credit_bill_run_overdue: bool,
    pub has_support_plan: bool,
    pub member_has_support_plan: bool,
    pub referral_blocked_by_relationship: bool,
    pub referral_blocked_by_country: bool,
    pub registered_by_other_partner: bool,
    /// When the account system observed these facts; newer replaces older.
    pub updated_at: Option<DateTime<Utc>>,
}

/// The rules facts must meet, whoever sends them (the HTTP upstream API or an
/// `account.upserted` command); the error lists every problem.
pub fn check(f: &AccountFacts) -> Result<(), String> {
    let mut problems = Vec::new();
    if f.account_id.trim().is_empty() || f.account_id.len() > 128 {
        problems.push("account_id must be 1 to 128 characters");
    }
    if f.updated_at.is_none() {
        problems.push("updated_at is required (newer facts replace older ones)");
    }
    if f.site.as_deref().is_some_and(|s| s != "cn" && s != "intl") {
        problems.push("site must be cn or intl");
    }
    if f.country
        .as_deref()
        .is_some_and(|c| !crate::domain::validate::is_country(c))
    {
        problems.push("country must be ISO 3166-1 alpha-2");
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
