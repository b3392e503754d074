-- Who submitted each association attempt (the upstream key's label), so that
-- failed attempts can be limited per key and per invitation (SPEC 8).
ALTER TABLE association_attempts ADD COLUMN submitted_by text;
CREATE INDEX association_attempts_submitter
    ON association_attempts (submitted_by, created_at);
CREATE INDEX association_attempts_invitation_failed
    ON association_attempts (invitation_id, decided_at) WHERE status = 'failed';

-- Offline codes are now stored as an HMAC keyed with the link secret; hashes
-- stored before cannot be converted (the codes are not kept), so live offline
-- links issued before this migration must be issued again.
