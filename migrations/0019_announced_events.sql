-- Job events sent after commit. A notifying transaction holds PostgreSQL's
-- notification-queue lock from its commit until the commit is flushed to
-- disk, so every transaction that calls pg_notify commits one after the
-- other, each waiting out its own flush. With leases, progress and
-- completions all notifying from the triggers of migration 0011, that lock
-- capped the whole fleet at one job cycle per three flushes.
--
-- A coordinator now announces its own job events itself, after the writing
-- transaction commits, many in one notifying statement that does not wait
-- for a flush (coordinator/src/announce.rs). Its connections say so with
-- the setting ptune.announces = 'on', and these triggers then send
-- nothing. Any other writer (a coordinator of an earlier version, psql)
-- still notifies from the triggers as before. The work channel (0013) and
-- the cache channel (0017) are unchanged: a job becoming leasable and a
-- cached row changing are still announced in the writing transaction.

CREATE OR REPLACE FUNCTION ptune_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    origin text := current_setting('application_name', true);
BEGIN
    IF current_setting('ptune.announces', true) = 'on' THEN
        RETURN NULL;
    END IF;
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

CREATE OR REPLACE FUNCTION ptune_notify_metrics() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    origin text := current_setting('application_name', true);
    batch record;
    payload text;
BEGIN
    IF current_setting('ptune.announces', true) = 'on' THEN
        RETURN NULL;
    END IF;
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
