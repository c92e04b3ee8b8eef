-- Spreading jobs over workers: what each worker said at its last lease
-- request, so that a job can wait a moment for a better placed worker.

ALTER TABLE workers
    -- Base models the worker held in memory at its last lease request.
    ADD COLUMN loaded_models text[]      NOT NULL DEFAULT '{}',
    -- Slots it had free then, less the jobs leased to it since.
    ADD COLUMN free_slots    integer     NOT NULL DEFAULT 0 CHECK (free_slots >= 0),
    -- When it last asked for a job; NULL: never.
    ADD COLUMN polled_at     timestamptz;
