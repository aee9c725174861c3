-- Webhooks (a job's `notify`, see src/webhooks/). `jobs.notify` holds the validated
-- `{"url": …, "events": […]}`; every change of a job's state to one of its events writes one
-- row of `webhook_deliveries`, in the same statement (so the same transaction) as the change,
-- by the trigger below: no code path that changes a state (claim, complete, fail, cancel, the
-- reaper) can forget it, and a crash between the change and the POST loses nothing. The
-- delivery loop (`webhooks::deliver`) claims due rows with a lease (FOR UPDATE SKIP LOCKED),
-- like jobs, and records each attempt. Times come from the database clock.
ALTER TABLE jobs ADD COLUMN notify jsonb
    CHECK (notify IS NULL OR jsonb_typeof(notify -> 'events') = 'array');

CREATE TABLE webhook_deliveries (
    -- The Standard Webhooks message id (`webhook-id`): one per event, the same on every retry,
    -- so receivers can de-duplicate.
    id               text        NOT NULL PRIMARY KEY,
    job_id           uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event            text        NOT NULL
                                 CHECK (event IN ('running', 'succeeded', 'failed', 'cancelled')),
    url              text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Due from then (the next retry's time after a failed attempt).
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- Attempts so far, counted at claim: the fencing token of a claimed row.
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    lease_owner      text,
    lease_expires_at timestamptz,
    -- The body as first sent, as text (every retry sends the same bytes).
    payload          text,
    last_status      integer,
    last_error       text,
    last_attempt_at  timestamptz,
    delivered_at     timestamptz,
    -- Given up (retries exhausted, or the host is no longer allowed).
    failed_at        timestamptz,
    CONSTRAINT webhook_deliveries_one_end CHECK (delivered_at IS NULL OR failed_at IS NULL)
);

-- The delivery loop: pending rows by due time.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;

-- A job's deliveries (its view's `notify.deliveries`; the cascade on prune).
CREATE INDEX webhook_deliveries_job_idx ON webhook_deliveries (job_id, created_at);

CREATE FUNCTION ladle_webhook_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_exists(NEW.notify -> 'events', NEW.state) THEN
        INSERT INTO webhook_deliveries (id, job_id, event, url)
        VALUES ('msg_' || replace(gen_random_uuid()::text, '-', ''), NEW.id, NEW.state,
                NEW.notify ->> 'url');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_webhook_event AFTER UPDATE OF state ON jobs
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state AND NEW.notify IS NOT NULL)
    EXECUTE FUNCTION ladle_webhook_event();
