-- The shape of each base model that its queued jobs' memory estimates were
-- last made with. A worker registering a model re-estimates the model's
-- queued jobs only when the shape known now differs from this one, and
-- holds this row's lock while it does, so that when a fleet starts at once
-- the first registration estimates the queue and the others find it done
-- (before, every registration that began before the first one's committed
-- saw a new shape and estimated every queued job again).
CREATE TABLE model_estimates (
    model text PRIMARY KEY,
    -- NULL until the queued jobs of the model were estimated with a shape.
    shape jsonb
);

-- Queued jobs without a memory estimate, in queue order: what a worker
-- registering a model whose shape is unchanged still has to estimate
-- (usually none), found without reading the whole queue.
CREATE INDEX jobs_unestimated_idx ON jobs (base_model, created_at, id)
    WHERE state = 'queued' AND memory_weights_bytes IS NULL;
