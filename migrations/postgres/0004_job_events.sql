-- Live events (GET /v1/merges/{id}/events, /v1/events). Every insert or update of a job row,
-- from whichever process or machine wrote it, notifies channel `ladle_job_changed` with the
-- job id (delivered when the write commits), so an API instance streams a worker's state
-- changes and progress within milliseconds. Notifications sent while a listener is
-- disconnected are lost: the streams also poll.
CREATE FUNCTION ladle_notify_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ladle_job_changed', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_changed AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION ladle_notify_job_changed();

-- GET /v1/events follows jobs by their last change.
CREATE INDEX jobs_updated_idx ON jobs (updated_at);
