-- ptune coordinator schema: jobs and their leases, workers, metrics, datasets
-- and adapters. Append-only: change the schema in a new numbered file.

CREATE TYPE job_state AS ENUM ('queued', 'running', 'succeeded', 'failed', 'cancelled');

CREATE TABLE workers (
    id             uuid PRIMARY KEY,
    hostname       text        NOT NULL,
    -- [{"name": "cuda:0", "memory_bytes": 0}]
    devices        jsonb       NOT NULL DEFAULT '[]',
    slots          integer     NOT NULL CHECK (slots >= 0),
    -- [{"name", "sha256", "model_type", "max_positions", "hidden_size", ...}]
    models         jsonb       NOT NULL DEFAULT '[]',
    registered_at  timestamptz NOT NULL DEFAULT now(),
    last_heartbeat timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE datasets (
    sha256      text        PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    file_name   text        NOT NULL,
    size        bigint      NOT NULL CHECK (size > 0),
    lines       bigint      NOT NULL CHECK (lines >= 0),
    content     bytea       NOT NULL,
    uploaded_at timestamptz NOT NULL DEFAULT now()
);
-- Uncompressed out-of-line storage, so reading a window with substring() does
-- not decompress the whole file.
ALTER TABLE datasets ALTER COLUMN content SET STORAGE EXTERNAL;

CREATE TABLE jobs (
    id               uuid        PRIMARY KEY,
    name             text        NOT NULL,
    owner            text        NOT NULL DEFAULT '',
    base_model       text        NOT NULL,
    method           text        NOT NULL,
    spec             jsonb       NOT NULL,
    state            job_state   NOT NULL DEFAULT 'queued',
    -- Why the job failed, or why its last attempt ended.
    error            text        NOT NULL DEFAULT '',
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL CHECK (max_attempts > 0),
    -- Fencing token: incremented by every lease; reports must carry the current one.
    lease_epoch      bigint      NOT NULL DEFAULT 0,
    cancel_requested boolean     NOT NULL DEFAULT false,
    step             bigint      NOT NULL DEFAULT 0,
    total_steps      bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- The queue: oldest queued job per base model first.
CREATE INDEX jobs_queue_idx ON jobs (base_model, created_at) WHERE state = 'queued';
CREATE INDEX jobs_state_created_idx ON jobs (state, created_at);
-- Listing: newest first with keyset paging on (created_at, id).
CREATE INDEX jobs_created_idx ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_owner_created_idx ON jobs (owner, created_at DESC, id DESC);

CREATE TABLE job_attempts (
    job_id           uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt          integer     NOT NULL CHECK (attempt > 0),
    worker_id        uuid        NOT NULL REFERENCES workers (id),
    epoch            bigint      NOT NULL,
    leased_at        timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL,
    ended_at         timestamptz,
    -- How the attempt ended, and why (shown on the dashboard).
    outcome          text        CHECK (outcome IN ('succeeded', 'failed', 'cancelled', 'lease_expired')),
    reason           text        NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, attempt),
    UNIQUE (job_id, epoch),
    CHECK ((ended_at IS NULL) = (outcome IS NULL))
);
-- At most one open lease per job.
CREATE UNIQUE INDEX job_attempts_open_idx ON job_attempts (job_id) WHERE ended_at IS NULL;
-- The reaper's scan for expired leases.
CREATE INDEX job_attempts_expiry_idx ON job_attempts (lease_expires_at) WHERE ended_at IS NULL;
CREATE INDEX job_attempts_worker_idx ON job_attempts (worker_id) WHERE ended_at IS NULL;

CREATE TABLE metrics (
    job_id      uuid             NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step        bigint           NOT NULL CHECK (step >= 0),
    kind        text             NOT NULL CHECK (kind IN ('train', 'eval')),
    name        text             NOT NULL,
    value       double precision NOT NULL,
    recorded_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, kind, name, step)
);

CREATE TABLE adapters (
    job_id     uuid        PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    sha256     text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size       bigint      NOT NULL CHECK (size > 0),
    content    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE adapters ALTER COLUMN content SET STORAGE EXTERNAL;
