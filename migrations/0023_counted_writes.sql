-- The hot path counts its own state changes. A lease and a completion each
-- fired the per-row trigger of migration 0014, which ran a PL/pgSQL call
-- and appended two rows to job_state_counts for every job: four rows per
-- job cycle, which the leader's fold then deleted again, more rows than
-- any other table took from a cycle. The coordinator's statements that
-- lease and complete jobs (coordinator/src/store/leasing.rs and leases.rs)
-- now append the change of all the jobs they move, two rows per statement,
-- in transactions that say so with SET LOCAL ptune.counts = 'own' (sent
-- with their BEGIN); the trigger skips their rows in its WHEN clause,
-- without calling a function. Every other writer (the coordinator's other
-- transactions, an earlier version, psql) is counted by the trigger as
-- before.

DROP TRIGGER jobs_count_changed ON jobs;
CREATE TRIGGER jobs_count_changed AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state
                       AND current_setting('ptune.counts', true) IS DISTINCT FROM 'own')
    EXECUTE FUNCTION job_state_counts_changed();
