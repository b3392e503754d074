-- The index served only the per-batch count(*) of a partner's quota usage,
-- which `partner_quota_usage` replaced. Every decision that grants a claim
-- updated it (a non-HOT update writes every index whose predicate the new
-- row matches): one index write per decision fewer.
DROP INDEX IF EXISTS preregistrations_partner_quota;
