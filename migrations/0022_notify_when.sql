-- The job events trigger of migration 0011 checks in its WHEN clause, not
-- in its body, whether the writer announces its own events (migration
-- 0019). Every update of a job row (a lease, each progress report, a
-- completion) fired it, and a coordinator's writes, which announce their
-- own events, ran a PL/pgSQL call per row only to return at once; now they
-- run none. Other writers still notify from the function as before.

DROP TRIGGER jobs_notify ON jobs;
CREATE TRIGGER jobs_notify AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (current_setting('ptune.announces', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION ptune_notify_job();
