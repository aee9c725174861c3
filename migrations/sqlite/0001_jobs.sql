-- ladle job queue, SQLite backend (QUEUE.md §4.2).
--
-- Times are INTEGER milliseconds since the Unix epoch, always bound by the application (never
-- datetime('now'): its text form would not compare with ours). Ids are hyphenated lowercase
-- UUIDv7 text, so text order is time order. The table is STRICT: a value of the wrong type is
-- an error, not a silent conversion.

CREATE TABLE jobs (
    id                  TEXT    NOT NULL PRIMARY KEY
                                CHECK (length(id) = 36 AND id = lower(id)),
    -- NULLs are distinct in a UNIQUE index: jobs without a key never conflict.
    idempotency_key     TEXT    UNIQUE,
    request_hash        BLOB    NOT NULL,
    output_url          TEXT    NOT NULL,
    recipe              TEXT    NOT NULL CHECK (json_valid(recipe)),
    state               TEXT    NOT NULL DEFAULT 'queued'
                                CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Same range as the Postgres smallint column, so both backends accept the same jobs.
    priority            INTEGER NOT NULL DEFAULT 0 CHECK (priority BETWEEN -32768 AND 32767),
    -- Number of claims so far: the fencing token. It only ever grows.
    attempts            INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts        INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_after           INTEGER NOT NULL,
    lease_owner         TEXT,
    lease_expires_at    INTEGER,
    heartbeat_at        INTEGER,
    cancel_requested_at INTEGER,
    progress            TEXT    CHECK (progress IS NULL OR json_valid(progress)),
    result              TEXT    CHECK (result IS NULL OR json_valid(result)),
    error               TEXT    CHECK (error IS NULL OR json_valid(error)),
    errors              TEXT    NOT NULL DEFAULT '[]'
                                CHECK (json_valid(errors) AND json_type(errors) = 'array'),
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER,
    updated_at          INTEGER NOT NULL,

    -- running ⇒ the lease is set; not running ⇒ no lease is left behind.
    CHECK (state <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK (state = 'running' OR (lease_owner IS NULL AND lease_expires_at IS NULL)),
    -- terminal ⇔ finished_at is set.
    CHECK ((state IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CHECK (attempts <= max_attempts)
) STRICT;

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
