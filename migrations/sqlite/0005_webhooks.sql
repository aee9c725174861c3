-- Webhooks (a job's `notify`, see src/webhooks/). `jobs.notify` holds the validated
-- `{"url": …, "events": […]}`; every change of a job's state to one of its events writes one
-- row of `webhook_deliveries`, in the same statement (so the same transaction) as the change,
-- by the trigger below: no code path that changes a state (claim, complete, fail, cancel, the
-- reaper) can forget it, and a crash between the change and the POST loses nothing. The
-- delivery loop (`webhooks::deliver`) claims due rows with a lease, like jobs, and records each
-- attempt. Times are integer Unix milliseconds, as in `jobs` (the trigger copies the change's
-- `updated_at`, which the application bound).
ALTER TABLE jobs ADD COLUMN notify TEXT
    CHECK (notify IS NULL OR (json_valid(notify) AND json_type(notify, '$.events') = 'array'));

CREATE TABLE webhook_deliveries (
    -- The Standard Webhooks message id (`webhook-id`): one per event, the same on every retry,
    -- so receivers can de-duplicate.
    id               TEXT    NOT NULL PRIMARY KEY,
    job_id           TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event            TEXT    NOT NULL
                             CHECK (event IN ('running', 'succeeded', 'failed', 'cancelled')),
    url              TEXT    NOT NULL,
    created_at       INTEGER NOT NULL,
    -- Due from then (the next retry's time after a failed attempt).
    next_attempt_at  INTEGER NOT NULL,
    -- Attempts so far, counted at claim: the fencing token of a claimed row.
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    -- The body as first sent (every retry sends the same bytes).
    payload          TEXT,
    last_status      INTEGER,
    last_error       TEXT,
    last_attempt_at  INTEGER,
    delivered_at     INTEGER,
    -- Given up (retries exhausted, or the host is no longer allowed).
    failed_at        INTEGER,
    CHECK (delivered_at IS NULL OR failed_at IS NULL)
) STRICT;

-- The delivery loop: pending rows by due time.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;

-- A job's deliveries (its view's `notify.deliveries`; the cascade on prune).
CREATE INDEX webhook_deliveries_job_idx ON webhook_deliveries (job_id, created_at);

CREATE TRIGGER jobs_webhook_event AFTER UPDATE OF state ON jobs
    WHEN NEW.state <> OLD.state AND NEW.notify IS NOT NULL
         AND EXISTS (SELECT 1 FROM json_each(NEW.notify, '$.events') WHERE value = NEW.state)
BEGIN
    INSERT INTO webhook_deliveries (id, job_id, event, url, created_at, next_attempt_at)
    VALUES ('msg_' || lower(hex(randomblob(16))), NEW.id, NEW.state,
            json_extract(NEW.notify, '$.url'), NEW.updated_at, NEW.updated_at);
END;
