-- Memory-aware scheduling: what each worker may use, what each job needs
-- (estimated from its spec and its base model's shape), and what the worker
-- that completed it measured.

-- Bytes the worker may use for training; 0: unknown (no job is held back).
ALTER TABLE workers ADD COLUMN memory_bytes bigint NOT NULL DEFAULT 0 CHECK (memory_bytes >= 0);

ALTER TABLE jobs
    -- The estimate's parts; NULL until a worker has reported the model's shape.
    ADD COLUMN memory_weights_bytes    bigint CHECK (memory_weights_bytes >= 0),
    ADD COLUMN memory_job_bytes        bigint CHECK (memory_job_bytes >= 0),
    ADD COLUMN memory_activation_bytes bigint CHECK (memory_activation_bytes >= 0),
    ADD COLUMN memory_estimate_bytes   bigint
        GENERATED ALWAYS AS (memory_weights_bytes + memory_job_bytes + memory_activation_bytes) STORED,
    -- Peak resident memory (VmHWM) of the worker process that completed the job.
    ADD COLUMN worker_peak_rss_bytes   bigint CHECK (worker_peak_rss_bytes >= 0),
    ADD CONSTRAINT jobs_memory_estimate_check
        CHECK ((memory_weights_bytes IS NULL) = (memory_job_bytes IS NULL)
               AND (memory_job_bytes IS NULL) = (memory_activation_bytes IS NULL));
