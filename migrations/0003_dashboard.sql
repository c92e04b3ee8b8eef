-- Indexes behind the dashboard: its job table (filtered by one column,
-- sorted by another, newest first within), its queue and wait figures.

-- Sorting and filtering the job table by state, method, base model or name,
-- newest first within each value (owner and created_at have theirs in 0001).
CREATE INDEX jobs_state_created_id_idx ON jobs (state, created_at DESC, id DESC);
CREATE INDEX jobs_method_created_idx ON jobs (method, created_at DESC, id DESC);
CREATE INDEX jobs_base_model_created_idx ON jobs (base_model, created_at DESC, id DESC);
CREATE INDEX jobs_name_created_idx ON jobs (name, created_at DESC, id DESC);
-- The job queued longest: a queued job's updated_at is when it was queued.
CREATE INDEX jobs_queued_since_idx ON jobs (updated_at) WHERE state = 'queued';
-- Waits of the leases taken recently.
CREATE INDEX job_attempts_leased_idx ON job_attempts (leased_at);
