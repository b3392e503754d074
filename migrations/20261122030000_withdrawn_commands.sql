-- Commands the intake answered 503 for after a publish that may still reach
-- the broker (a confirm that timed out, e.g. during a memory alarm). The row
-- it had stored is removed; a job that arrives later for such an id is
-- skipped instead of recreating it, so a refused request is never half-done.
CREATE TABLE withdrawn_commands (
    id uuid PRIMARY KEY,
    withdrawn_at timestamptz NOT NULL DEFAULT now()
);
