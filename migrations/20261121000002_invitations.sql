-- Invitations (email and offline), association attempts, generic email deliveries.

CREATE TABLE invitations (
    id                  uuid PRIMARY KEY,
    preregistration_id  uuid NOT NULL REFERENCES preregistrations (id) ON DELETE CASCADE,
    partner_id          uuid NOT NULL REFERENCES partners (id),
    association_type    text NOT NULL CHECK (association_type IN ('reseller', 'referral')),
    method              text NOT NULL CHECK (method IN ('email', 'offline')),
    locale              text NOT NULL CHECK (locale IN ('en', 'zh-CN')),
    status              text NOT NULL CHECK (status IN ('queued', 'sent', 'failed', 'superseded', 'expired', 'accepted')),
    -- The link token is HMAC(link secret, id || nonce): neither the token nor
    -- the secret is stored, only its SHA-256 (to find the invitation).
    nonce               bytea NOT NULL,
    token_hash          bytea NOT NULL UNIQUE,
    -- Offline invitations: a one-time code, stored hashed.
    code_hash           bytea UNIQUE,
    -- NULL for offline links: valid while the claim is active.
    link_expires_at     timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    activated_at        timestamptz,
    sending_since       timestamptz,
    sent_at             timestamptz,
    attempts            integer NOT NULL DEFAULT 0,
    failure             text,
    used_at             timestamptz,
    request_id          text
);
CREATE INDEX invitations_by_prereg ON invitations (preregistration_id, created_at DESC);
CREATE INDEX invitations_link_expiry ON invitations (link_expires_at) WHERE status IN ('queued', 'sent');

CREATE TABLE association_attempts (
    id              uuid PRIMARY KEY,
    account_id      text NOT NULL,
    token_hash      bytea,
    code_hash       bytea,
    invitation_id   uuid REFERENCES invitations (id) ON DELETE SET NULL,
    status          text NOT NULL CHECK (status IN ('queued', 'succeeded', 'failed')),
    cause_code      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    decided_at      timestamptz,
    CHECK ((token_hash IS NULL) <> (code_hash IS NULL))
);

-- Emails other than invitations (partner notifications, reminders,
-- escalations): one row per job id, so a redelivered job never sends twice.
CREATE TABLE email_deliveries (
    job_id         text PRIMARY KEY,
    kind           text NOT NULL,
    state          text NOT NULL CHECK (state IN ('sending', 'sent', 'failed')),
    sending_since  timestamptz,
    sent_at        timestamptz,
    failure        text
);
