-- Long-poll leasing: a 'ptune_work' notification, whose payload is the base
-- model, goes out in the transaction that makes a job leasable (inserted
-- queued, or queued again after an attempt ended), whichever coordinator
-- made it. Coordinators wake the LeaseJob calls waiting for work, so idle
-- workers wait on their coordinator instead of polling the database.
-- Notifications with the same payload in one transaction are sent once.

CREATE FUNCTION ptune_notify_work() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ptune_work', NEW.base_model);
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_work_inserted AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.state = 'queued')
    EXECUTE FUNCTION ptune_notify_work();

CREATE TRIGGER jobs_work_requeued AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (NEW.state = 'queued' AND OLD.state IS DISTINCT FROM 'queued')
    EXECUTE FUNCTION ptune_notify_work();
