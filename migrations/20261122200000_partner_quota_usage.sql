-- Each partner's quota usage (its pre-registrations under review or holding
-- a claim), kept by the database itself instead of counted for every batch
-- of decisions. The worker used to count every active claim of the batch's
-- partners (`count(*) … GROUP BY partner_id`): thousands of rows per batch
-- for busy partners, the largest Postgres cost of a decision under load.
--
-- Statement-level triggers with transition tables adjust the counters once
-- per statement (a sweep expiring 5,000 claims makes one update per
-- partner), whoever changed the rows: decisions, reviews, sweeps, deletes.
-- Counter rows are taken in partner order within a statement; a transaction
-- that changes several partners' rows in several statements locks their
-- counters first, in one sorted statement (`store::decisions::lock_quota`).

CREATE TABLE partner_quota_usage (
    partner_id uuid PRIMARY KEY REFERENCES partners (id) ON DELETE CASCADE,
    active     bigint NOT NULL DEFAULT 0
);

-- The statuses of `Status::counts_toward_quota` (src/domain/status.rs); an
-- integration test checks that the two agree for every status.
CREATE FUNCTION counts_toward_quota(status text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT status IN ('under_review', 'preregistered', 'invited', 'association_failed') $$;

CREATE FUNCTION partner_quota_usage_apply() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO partner_quota_usage AS u (partner_id, active)
        SELECT partner_id, count(*) FROM new_rows WHERE counts_toward_quota(status)
        GROUP BY partner_id ORDER BY partner_id
        ON CONFLICT (partner_id) DO UPDATE SET active = u.active + EXCLUDED.active;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO partner_quota_usage AS u (partner_id, active)
        SELECT partner_id, -count(*) FROM old_rows WHERE counts_toward_quota(status)
        GROUP BY partner_id ORDER BY partner_id
        ON CONFLICT (partner_id) DO UPDATE SET active = u.active + EXCLUDED.active;
    ELSE
        INSERT INTO partner_quota_usage AS u (partner_id, active)
        SELECT partner_id, sum(delta) FROM (
            SELECT partner_id, 1 AS delta FROM new_rows WHERE counts_toward_quota(status)
            UNION ALL
            SELECT partner_id, -1 FROM old_rows WHERE counts_toward_quota(status)
        ) d
        GROUP BY partner_id HAVING sum(delta) <> 0 ORDER BY partner_id
        ON CONFLICT (partner_id) DO UPDATE SET active = u.active + EXCLUDED.active;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER partner_quota_usage_insert AFTER INSERT ON preregistrations
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION partner_quota_usage_apply();
CREATE TRIGGER partner_quota_usage_update AFTER UPDATE ON preregistrations
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION partner_quota_usage_apply();
CREATE TRIGGER partner_quota_usage_delete AFTER DELETE ON preregistrations
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION partner_quota_usage_apply();

-- Every partner has its counter from the start, so locking counters before
-- writing never misses one.
CREATE FUNCTION partner_quota_usage_open() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO partner_quota_usage (partner_id)
    SELECT id FROM new_partners ORDER BY id
    ON CONFLICT (partner_id) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER partner_quota_usage_open AFTER INSERT ON partners
    REFERENCING NEW TABLE AS new_partners
    FOR EACH STATEMENT EXECUTE FUNCTION partner_quota_usage_open();

-- Existing rows (CREATE TRIGGER holds writers off until this commits).
INSERT INTO partner_quota_usage (partner_id, active)
SELECT p.id, (SELECT count(*) FROM preregistrations r
               WHERE r.partner_id = p.id AND counts_toward_quota(r.status))
  FROM partners p;
