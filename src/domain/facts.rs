//! Account facts, as the account system reports them (`account.upserted`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
