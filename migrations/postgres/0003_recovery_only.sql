-- Recovery-only runs. A worker can die after publishing the manifest but before `complete`;
-- on the job's last attempt the reaper used to fail it although its soup was whole. Now an
-- expired merge job with attempts exhausted gets one recovery-only run instead: back to
-- 'queued' with max_attempts + 1 and recovery_only = true. A worker claiming such a job merges
-- nothing: it completes the job if this recipe's manifest is published, else fails it with
-- the lease_expired error. The flag stays set, so a job gets one recovery at most.
ALTER TABLE jobs ADD COLUMN recovery_only boolean NOT NULL DEFAULT false;
