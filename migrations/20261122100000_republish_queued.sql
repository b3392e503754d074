-- The intake no longer writes an outbox row for every accepted
-- pre-registration (and deletes it again once the broker confirms the job).
-- Instead the `queued` row itself says when its job should be published again
-- if it is still `queued` by then (SPEC §8: "a republisher of stale `queued`
-- work"): the intake sets `republish_at` a grace period ahead; the relay
-- republishes rows still `queued` past it, and moves it further ahead each
-- time (`republishes` counts how often), so a row whose job waits in a long
-- backlog is republished a few times at most, never in a loop. A job copy is
-- harmless: its id is the pre-registration's, and a decided row is skipped.
-- Rows written by other paths (a worker recreating a row from its job) leave
-- it NULL: their job is already in the broker.
ALTER TABLE preregistrations
    ADD COLUMN republish_at timestamptz,
    ADD COLUMN republishes  integer NOT NULL DEFAULT 0;
CREATE INDEX preregistrations_republish ON preregistrations (republish_at)
    WHERE status = 'queued' AND republish_at IS NOT NULL;
