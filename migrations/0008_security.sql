-- Only who you allow: API tokens with roles (stored as salted hashes),
-- dashboard sessions, lease tokens that only the leasing worker knows,
-- which token registered each worker, and an audit trail of mutations.

CREATE TABLE api_tokens (
    id           uuid        PRIMARY KEY,
    -- The identity: a submitter's jobs and sweeps are owned by this name.
    name         text        NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'),
    role         text        NOT NULL CHECK (role IN ('admin', 'submitter', 'viewer', 'worker')),
    -- sha256(salt || secret); the secret itself is never stored.
    salt         bytea       NOT NULL CHECK (length(salt) = 16),
    hash         bytea       NOT NULL CHECK (length(hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text        NOT NULL DEFAULT '',
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked_at   timestamptz
);
-- One live token per name: the name is who the token is.
CREATE UNIQUE INDEX api_tokens_live_name_idx ON api_tokens (name) WHERE revoked_at IS NULL;

CREATE TABLE dashboard_sessions (
    -- sha256 of the session cookie's value.
    id         bytea       PRIMARY KEY CHECK (length(id) = 32),
    token_id   uuid        NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX dashboard_sessions_expiry_idx ON dashboard_sessions (expires_at);

-- sha256 of the lease token handed to the worker with the lease; every
-- report about the lease must carry the token.
ALTER TABLE job_attempts ADD COLUMN lease_token_hash bytea CHECK (length(lease_token_hash) = 32);

-- The token a worker registered with; only that token may speak for it.
ALTER TABLE workers ADD COLUMN token_id uuid REFERENCES api_tokens (id);

CREATE TABLE audit_log (
    id     bigserial   PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    -- The token's name and role.
    actor  text        NOT NULL,
    role   text        NOT NULL,
    -- e.g. job.submit, job.cancel, sweep.create, token.revoke, adapter.download.
    action text        NOT NULL,
    -- What it acted on: a job, sweep or token id, or a name.
    target text        NOT NULL,
    detail jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at_idx ON audit_log (at DESC, id DESC);
