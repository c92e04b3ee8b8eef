-- Job events for every coordinator on the database: a change to a job's
-- progress or lifecycle, and the metrics a report records, are sent with
-- pg_notify on channel 'ptune_events' from triggers, so they go out in the
-- transaction that makes the change, whichever replica (or anything else)
-- made it, and only when it commits. Each payload names its origin (the
-- writing connection's application_name), so a coordinator skips what it
-- published itself. Notifications are not replayed: a coordinator whose
-- listening connection drops re-reads what its watchers follow.

CREATE FUNCTION ptune_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    origin text := current_setting('application_name', true);
BEGIN
    IF (NEW.state, NEW.cancel_requested, NEW.attempts, NEW.error, NEW.lease_epoch, NEW.early_stop_requested)
       IS DISTINCT FROM
       (OLD.state, OLD.cancel_requested, OLD.attempts, OLD.error, OLD.lease_epoch, OLD.early_stop_requested) THEN
        PERFORM pg_notify('ptune_events', json_build_object('o', origin, 'j', NEW.id, 'k', 'changed')::text);
    END IF;
    IF (NEW.step, NEW.total_steps) IS DISTINCT FROM (OLD.step, OLD.total_steps) THEN
        PERFORM pg_notify('ptune_events',
            json_build_object('o', origin, 'j', NEW.id, 'k', 'progress', 's', NEW.step, 't', NEW.total_steps)::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify AFTER UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION ptune_notify_job();

-- One notification per job and statement with its new metrics; a payload
-- too large for a notification (8000 bytes) names the steps instead, and
-- the listener reads them.
CREATE FUNCTION ptune_notify_metrics() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    origin text := current_setting('application_name', true);
    batch record;
    payload text;
BEGIN
    FOR batch IN
        SELECT job_id,
               min(step) AS first_step,
               max(step) AS last_step,
               json_agg(json_build_array(step, kind, name, value) ORDER BY step, kind, name) AS rows
        FROM new_metrics GROUP BY job_id
    LOOP
        payload := json_build_object('o', origin, 'j', batch.job_id, 'k', 'metrics', 'm', batch.rows)::text;
        IF octet_length(payload) > 7000 THEN
            payload := json_build_object('o', origin, 'j', batch.job_id, 'k', 'metrics',
                                         'from', batch.first_step, 'to', batch.last_step)::text;
        END IF;
        PERFORM pg_notify('ptune_events', payload);
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE TRIGGER metrics_notify AFTER INSERT ON metrics
    REFERENCING NEW TABLE AS new_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION ptune_notify_metrics();

-- A metric recorded again at the same step (a resumed attempt) is an update.
CREATE TRIGGER metrics_notify_update AFTER UPDATE ON metrics
    REFERENCING NEW TABLE AS new_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION ptune_notify_metrics();
