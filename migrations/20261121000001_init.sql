-- prereg schema. All times are timestamptz (stored in UTC).

CREATE TABLE partners (
    id                    uuid PRIMARY KEY,
    name                  text NOT NULL,
    country               text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    contact_email         text,
    contact_mobile        text,
    billing_mode          text NOT NULL DEFAULT 'postpaid' CHECK (billing_mode IN ('postpaid', 'prepaid')),
    customer_development  boolean NOT NULL DEFAULT true,
    referral              boolean NOT NULL DEFAULT false,
    locale                text NOT NULL DEFAULT 'en' CHECK (locale IN ('en', 'zh-CN')),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE account_managers (
    id          uuid PRIMARY KEY,
    partner_id  uuid NOT NULL REFERENCES partners (id) ON DELETE CASCADE,
    name        text NOT NULL,
    email       text NOT NULL,
    UNIQUE (partner_id, email)
);

-- API keys: only a SHA-256 of the key is kept.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    key_hash    bytea NOT NULL UNIQUE,
    role        text NOT NULL CHECK (role IN ('partner', 'upstream', 'operator')),
    partner_id  uuid REFERENCES partners (id) ON DELETE CASCADE,
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((role = 'partner') = (partner_id IS NOT NULL))
);

-- Account facts from the account system; newer `updated_at` wins.
CREATE TABLE accounts (
    account_id   text PRIMARY KEY,
    email_norm   text,
    mobile_norm  text,
    facts        jsonb NOT NULL,
    updated_at   timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_email ON accounts (email_norm) WHERE email_norm IS NOT NULL;
CREATE INDEX accounts_mobile ON accounts (mobile_norm) WHERE mobile_norm IS NOT NULL;

CREATE TABLE preregistrations (
    id                      uuid PRIMARY KEY,
    partner_id              uuid NOT NULL REFERENCES partners (id),
    full_name               text NOT NULL,
    email                   text NOT NULL,
    mobile                  text NOT NULL,
    email_norm              text NOT NULL,
    mobile_norm             text NOT NULL,
    status                  text NOT NULL CHECK (status IN ('queued', 'preregistered', 'invited', 'associated',
                              'association_failed', 'rejected', 'under_review', 'review_rejected', 'expired', 'deleted')),
    reason_code             text,
    reason_message          text,
    manual_review_eligible  boolean NOT NULL DEFAULT false,
    existing_id             uuid,
    send_invitation         boolean NOT NULL DEFAULT false,
    association_type        text CHECK (association_type IN ('reseller', 'referral')),
    locale                  text,
    tags                    text[] NOT NULL DEFAULT '{}',
    remarks                 text,
    account_manager_id      uuid REFERENCES account_managers (id),
    request_id              text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    decided_at              timestamptz,
    preregistered_at        timestamptz,
    expires_at              timestamptz,
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- The final guarantee of "one active claim per customer": whatever Redis says,
-- two rows holding a claim cannot share a normalised email or mobile.
CREATE UNIQUE INDEX preregistrations_claim_email ON preregistrations (email_norm)
    WHERE status IN ('preregistered', 'invited', 'association_failed', 'associated');
CREATE UNIQUE INDEX preregistrations_claim_mobile ON preregistrations (mobile_norm)
    WHERE status IN ('preregistered', 'invited', 'association_failed', 'associated');
-- Own list, newest first, keyset pagination.
CREATE INDEX preregistrations_partner_list ON preregistrations (partner_id, created_at DESC, id DESC);
-- Quota count.
CREATE INDEX preregistrations_partner_quota ON preregistrations (partner_id)
    WHERE status IN ('under_review', 'preregistered', 'invited', 'association_failed');
-- Expiry sweep: only what can expire is indexed, so cost follows what is due.
CREATE INDEX preregistrations_expiry ON preregistrations (expires_at)
    WHERE status IN ('preregistered', 'invited', 'association_failed');

-- Timeline: every change with time, actor and reason.
CREATE TABLE preregistration_events (
    id                  bigserial PRIMARY KEY,
    preregistration_id  uuid NOT NULL REFERENCES preregistrations (id) ON DELETE CASCADE,
    at                  timestamptz NOT NULL DEFAULT now(),
    actor               text NOT NULL,
    change              text NOT NULL,
    from_status         text,
    to_status           text,
    reason              text,
    details             jsonb
);
CREATE INDEX preregistration_events_by_prereg ON preregistration_events (preregistration_id, id);

CREATE TABLE reviews (
    id                  uuid PRIMARY KEY,
    preregistration_id  uuid NOT NULL REFERENCES preregistrations (id) ON DELETE CASCADE,
    partner_id          uuid NOT NULL REFERENCES partners (id),
    state               text NOT NULL CHECK (state IN ('queued', 'open', 'overdue', 'approved', 'rejected', 'refused')),
    justification       text NOT NULL,
    expected_new_spend  double precision,
    contact_record      text,
    requested_at        timestamptz NOT NULL DEFAULT now(),
    opened_at           timestamptz,
    due_at              timestamptz,
    calendar_missing    boolean NOT NULL DEFAULT false,
    reminder_sent_at    timestamptz,
    overdue_at          timestamptz,
    escalated_at        timestamptz,
    decided_at          timestamptz,
    decided_by          text,
    note                text,
    refusal_code        text
);
CREATE UNIQUE INDEX reviews_one_pending ON reviews (preregistration_id) WHERE state IN ('queued', 'open', 'overdue');
CREATE INDEX reviews_open_due ON reviews (due_at) WHERE state IN ('open', 'overdue');
CREATE INDEX reviews_state ON reviews (state, requested_at DESC);

-- A retried command with the same Idempotency-Key returns the first answer.
CREATE TABLE idempotency_keys (
    principal     text NOT NULL,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    status        smallint NOT NULL,
    body          jsonb NOT NULL,
    location      text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);

-- Transactional outbox: events written with the state change, published after.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    exchange     text NOT NULL CHECK (exchange IN ('events', 'commands')),
    routing_key  text NOT NULL,
    message      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_log (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    target  text,
    details jsonb
);

-- Working-day calendar uploaded by operators; the 2026 data ships as default.
CREATE TABLE calendar_years (
    year       integer PRIMARY KEY,
    loaded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE calendar_days (
    date  date PRIMARY KEY,
    year  integer NOT NULL REFERENCES calendar_years (year) ON DELETE CASCADE,
    kind  text NOT NULL CHECK (kind IN ('holiday', 'workday')),
    name  text NOT NULL DEFAULT ''
);

CREATE TABLE sweep_runs (
    name             text PRIMARY KEY,
    last_success_at  timestamptz NOT NULL,
    last_stats       jsonb
);
