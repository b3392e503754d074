-- Operator dashboard sessions (SPEC §8): random ids kept server-side; only
-- their SHA-256 is stored, so a copy of this table opens no session.
CREATE TABLE dashboard_sessions (
    id_hash      bytea PRIMARY KEY,
    key_id       uuid,              -- the stored operator key that signed in (NULL: bootstrap token)
    csrf         text NOT NULL,     -- per-session token for state-changing forms
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL, -- absolute expiry
    tz           text               -- the operator's time zone (from the browser at sign-in)
);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);
