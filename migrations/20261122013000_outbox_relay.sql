-- Outbox rows carry when they may be published and how often the relay tried.
-- The intake writes each accepted command's job here in the same transaction
-- as its row, with `publish_after` a grace period ahead: it publishes the job
-- itself and deletes the row once confirmed, and only if it crashed (or the
-- confirm never came) does the relay publish it after the grace period.
-- The relay leases rows by moving `publish_after` ahead, so it never holds a
-- transaction across network publishes.
ALTER TABLE outbox
    ADD COLUMN publish_after timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN attempts      integer NOT NULL DEFAULT 0;
CREATE INDEX outbox_due ON outbox (publish_after, id);

-- LISTEN/NOTIFY wake-up of an idle relay. A NOTIFY serialises the commits of
-- notifying transactions, so it is sent only while a relay sleeps (`idle`),
-- and only for rows that are due now.
CREATE TABLE outbox_relay_state (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    idle       boolean NOT NULL DEFAULT false
);
INSERT INTO outbox_relay_state DEFAULT VALUES;

CREATE FUNCTION outbox_wake_relay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_relay_state WHERE idle)
       AND EXISTS (SELECT 1 FROM outbox_new WHERE publish_after <= now()) THEN
        PERFORM pg_notify('prereg_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_wake_relay AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS outbox_new
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_wake_relay();
