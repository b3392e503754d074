-- Time: expiry sweeps, claim-expiry reminders and review deadlines (SPEC §5).
-- Every query of the sweeps reads a partial index that holds only rows that
-- can still become due, so a sweep costs what is due, not the table size.

-- Claim-expiry reminder to the partner, sent once per claim.
ALTER TABLE preregistrations ADD COLUMN expiry_reminder_sent_at timestamptz;
CREATE INDEX preregistrations_expiry_reminder ON preregistrations (expires_at)
    WHERE status IN ('preregistered', 'invited', 'association_failed')
      AND expiry_reminder_sent_at IS NULL;

-- Review deadlines: reminders not yet sent, and open reviews (not yet overdue).
CREATE INDEX reviews_reminder_due ON reviews (due_at)
    WHERE state = 'open' AND reminder_sent_at IS NULL;
CREATE INDEX reviews_open_only_due ON reviews (due_at) WHERE state = 'open';

-- Outstanding links of a claim (ended with the claim). Links past their own
-- expiry use invitations_link_expiry (migration 0002).
CREATE INDEX invitations_open_by_prereg ON invitations (preregistration_id)
    WHERE status IN ('queued', 'sent');
