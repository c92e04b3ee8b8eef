-- Large tables: counts per job state without counting, the indexes the
-- keyset listings need, and the bookkeeping of metrics retention.

-- Jobs per state, as rows of changes that add up to the counts: a new job
-- adds +1 to its state, a state change -1 and +1, a deleted job -1. Writers
-- only append rows, so concurrent submissions never wait on one hot counter
-- row; the leader folds the rows into one per state every few seconds
-- (store/counts.rs), so a read sums a handful of rows. The sum read in a
-- snapshot is the exact count in that snapshot.
CREATE TABLE job_state_counts (
    state job_state NOT NULL,
    n     bigint    NOT NULL
);
INSERT INTO job_state_counts (state, n) SELECT state, count(*) FROM jobs GROUP BY state;

CREATE FUNCTION job_state_counts_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_state_counts (state, n) SELECT state, count(*) FROM inserted_jobs GROUP BY state;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_count_inserted AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS inserted_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION job_state_counts_inserted();

CREATE FUNCTION job_state_counts_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_state_counts (state, n) SELECT state, -count(*) FROM deleted_jobs GROUP BY state;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_count_deleted AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS deleted_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION job_state_counts_deleted();

-- Per row, and only when the state changes: progress updates never fire it.
CREATE FUNCTION job_state_counts_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_state_counts (state, n) VALUES (OLD.state, -1), (NEW.state, 1);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_count_changed AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION job_state_counts_changed();

CREATE FUNCTION job_state_counts_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_state_counts;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_count_truncated AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION job_state_counts_truncated();

-- The trials of one sweep, newest first (`ListJobs` and the job table
-- filtered by sweep); the unique (sweep_id, trial_index) serves the sweep sort.
CREATE INDEX jobs_sweep_created_idx ON jobs (sweep_id, created_at DESC, id DESC) WHERE sweep_id IS NOT NULL;

-- Metrics retention: what has been done to a finished job's metrics
-- ('full', then 'downsampled', then 'pruned'), and the leader's scan for
-- finished jobs with work left, oldest first.
ALTER TABLE jobs ADD COLUMN metrics_retention text NOT NULL DEFAULT 'full'
    CHECK (metrics_retention IN ('full', 'downsampled', 'pruned'));
CREATE INDEX jobs_metrics_retention_idx ON jobs (finished_at, id)
    WHERE metrics_retention <> 'pruned' AND state IN ('succeeded', 'failed', 'cancelled');
