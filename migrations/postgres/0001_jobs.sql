-- ladle job queue, Postgres backend (QUEUE.md §4.2).
--
-- Lease and schedule times come from the database clock (now()) in every statement, never from
-- a worker: workers on many machines have skewed clocks. State is text with a CHECK rather
-- than an enum, which eases migrations and keeps both backends identical.

CREATE TABLE jobs (
    id                  uuid        NOT NULL PRIMARY KEY,
    -- NULLs are distinct in a UNIQUE constraint: jobs without a key never conflict.
    idempotency_key     text        UNIQUE,
    request_hash        bytea       NOT NULL,
    output_url          text        NOT NULL,
    recipe              jsonb       NOT NULL,
    state               text        NOT NULL DEFAULT 'queued'
                                    CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority            smallint    NOT NULL DEFAULT 0,
    -- Number of claims so far: the fencing token. It only ever grows.
    attempts            integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts        integer     NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_after           timestamptz NOT NULL DEFAULT now(),
    lease_owner         text,
    lease_expires_at    timestamptz,
    heartbeat_at        timestamptz,
    cancel_requested_at timestamptz,
    progress            jsonb,
    result              jsonb,
    error               jsonb,
    errors              jsonb       NOT NULL DEFAULT '[]'::jsonb
                                    CHECK (jsonb_typeof(errors) = 'array'),
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),

    -- running ⇒ the lease is set; not running ⇒ no lease is left behind.
    CONSTRAINT jobs_running_has_lease
        CHECK (state <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT jobs_idle_has_no_lease
        CHECK (state = 'running' OR (lease_owner IS NULL AND lease_expires_at IS NULL)),
    -- terminal ⇔ finished_at is set.
    CONSTRAINT jobs_terminal_iff_finished
        CHECK ((state IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CONSTRAINT jobs_attempts_within_max
        CHECK (attempts <= max_attempts)
);

-- Claim: the next runnable job, highest priority first, then oldest run_after, then id.
CREATE INDEX jobs_claim_idx ON jobs (priority DESC, run_after, id) WHERE state = 'queued';

-- Reaper: running jobs by lease expiry.
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at) WHERE state = 'running';

-- At most one live (queued or running) job per output URL: two jobs never write one folder.
CREATE UNIQUE INDEX jobs_active_output_url ON jobs (output_url)
    WHERE state IN ('queued', 'running');

-- Prune: terminal jobs by finish time.
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- Listing with a state filter, newest (largest UUIDv7) first; the unfiltered listing uses the
-- primary key.
CREATE INDEX jobs_state_id_idx ON jobs (state, id);
