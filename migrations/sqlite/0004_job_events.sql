-- Live events: GET /v1/events follows jobs by their last change (SQLite has no NOTIFY; the
-- streams poll).
CREATE INDEX jobs_updated_idx ON jobs (updated_at);
