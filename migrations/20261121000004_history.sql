-- History records (every invited customer with its current state) and exports.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

ALTER TABLE preregistrations
    ADD COLUMN invited_at      timestamptz,
    ADD COLUMN last_method     text CHECK (last_method IN ('email', 'offline')),
    -- Expiry of the live link (NULL for offline links: the claim's).
    ADD COLUMN link_expires_at timestamptz,
    -- The account that tried to associate (customer information).
    ADD COLUMN account_id      text,
    -- Lower-cased name, email, remarks, tags, account manager, account id and
    -- name: one trigram-indexed column serves every substring search.
    ADD COLUMN search_text     text NOT NULL DEFAULT '';

UPDATE preregistrations p SET search_text = lower(concat_ws(' ', full_name, email, remarks, array_to_string(tags, ' '),
    (SELECT name FROM account_managers am WHERE am.id = p.account_manager_id)));

-- Newest first within a partner, keyset-paginated.
CREATE INDEX preregistrations_history ON preregistrations (partner_id, invited_at DESC, id DESC)
    WHERE invited_at IS NOT NULL;
-- Substring search (ILIKE '%q%') without scanning the partner's rows.
CREATE INDEX preregistrations_history_search ON preregistrations USING gin (search_text gin_trgm_ops)
    WHERE invited_at IS NOT NULL;
CREATE INDEX preregistrations_history_tags ON preregistrations USING gin (tags)
    WHERE invited_at IS NOT NULL;

CREATE TABLE exports (
    id            uuid PRIMARY KEY,
    partner_id    uuid NOT NULL REFERENCES partners (id),
    status        text NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed', 'expired')),
    rows          bigint,
    bytes         bigint,
    failure       text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    completed_at  timestamptz,
    expires_at    timestamptz
);
CREATE INDEX exports_partner ON exports (partner_id, created_at DESC);
CREATE INDEX exports_expiry ON exports (expires_at) WHERE status = 'completed';

-- The CSV, in chunks of about 1 MiB, so that writing and downloading stream.
CREATE TABLE export_chunks (
    export_id  uuid NOT NULL REFERENCES exports (id) ON DELETE CASCADE,
    seq        integer NOT NULL,
    data       bytea NOT NULL,
    PRIMARY KEY (export_id, seq)
);
