-- Job kinds: 'merge' writes a soup to output_url; 'analysis' (diagnostics, POST /v1/analyses)
-- writes nothing and stores its numbers in `result`. An analysis job's output_url is the
-- synthetic, per-job 'analysis:<id>', so the live-output unique index never involves it.
ALTER TABLE jobs ADD COLUMN kind text NOT NULL DEFAULT 'merge'
    CHECK (kind IN ('merge', 'analysis'));

-- Listing one kind, newest first.
CREATE INDEX jobs_kind_idx ON jobs (kind, id DESC);
