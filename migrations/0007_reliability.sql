-- Nothing lost: attempts are counted by cause, retries wait with backoff,
-- leases can be handed back, resume checkpoints are stored so that a job
-- resumes on any worker, and workers say when they are unhealthy.

ALTER TABLE jobs
    -- Attempts that ended with an error of the job (it counts against
    -- max_attempts) and attempts lost to the infrastructure (a worker lost,
    -- drained or preempted, a disk or device error: they count against the
    -- coordinator's --max-interruptions instead).
    ADD COLUMN failures      integer     NOT NULL DEFAULT 0 CHECK (failures >= 0),
    ADD COLUMN interruptions integer     NOT NULL DEFAULT 0 CHECK (interruptions >= 0),
    -- A queued job is not leased before this time (backoff after an error);
    -- NULL: at once.
    ADD COLUMN retry_at      timestamptz;

-- How an attempt ended: 'released' is a lease the worker handed back
-- (drained), 'interrupted' one it gave up for an infrastructure error.
ALTER TABLE job_attempts DROP CONSTRAINT job_attempts_outcome_check;
ALTER TABLE job_attempts ADD CONSTRAINT job_attempts_outcome_check
    CHECK (outcome IN ('succeeded', 'failed', 'cancelled', 'lease_expired', 'released', 'interrupted'));

-- Why a worker stopped taking jobs (a full disk, repeated device errors);
-- empty while it is healthy.
ALTER TABLE workers ADD COLUMN unhealthy_reason text NOT NULL DEFAULT '';

-- Resume checkpoints uploaded by workers, stored as chunks so that neither
-- side holds one whole in memory. A checkpoint becomes visible (complete)
-- only once every byte arrived and its sha256 matched; a job keeps only its
-- newest complete one.
CREATE TABLE job_checkpoints (
    id           uuid        PRIMARY KEY,
    job_id       uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- The lease that uploaded it.
    epoch        bigint      NOT NULL,
    -- Optimizer steps the checkpoint holds.
    step         bigint      NOT NULL CHECK (step >= 0),
    sha256       text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size         bigint      NOT NULL CHECK (size > 0),
    complete     boolean     NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_checkpoints_job_idx ON job_checkpoints (job_id, step DESC) WHERE complete;
CREATE INDEX job_checkpoints_incomplete_idx ON job_checkpoints (created_at) WHERE NOT complete;

CREATE TABLE job_checkpoint_chunks (
    checkpoint_id uuid    NOT NULL REFERENCES job_checkpoints (id) ON DELETE CASCADE,
    seq           integer NOT NULL CHECK (seq >= 0),
    data          bytea   NOT NULL,
    PRIMARY KEY (checkpoint_id, seq)
);
ALTER TABLE job_checkpoint_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
