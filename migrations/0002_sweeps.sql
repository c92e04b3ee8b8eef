-- Hyperparameter sweeps: a sweep row per sweep, its trials as jobs linked to
-- it, and every ASHA decision, each taken once.

CREATE TYPE sweep_state AS ENUM ('running', 'completed', 'cancelled', 'failed');

CREATE TABLE sweeps (
    id                    uuid        PRIMARY KEY,
    name                  text        NOT NULL,
    owner                 text        NOT NULL DEFAULT '',
    -- The definition as created: the sweep TOML as JSON, datasets as sha256: references.
    definition            jsonb       NOT NULL,
    algorithm             text        NOT NULL CHECK (algorithm IN ('grid', 'random', 'asha')),
    objective_metric      text        NOT NULL,
    objective_direction   text        NOT NULL CHECK (objective_direction IN ('maximize', 'minimize')),
    state                 sweep_state NOT NULL DEFAULT 'running',
    -- Why the sweep failed.
    error                 text        NOT NULL DEFAULT '',
    -- Trials the sweep creates in all (the definition's, plus extensions).
    trial_budget          integer     NOT NULL CHECK (trial_budget >= 0),
    max_concurrent_trials integer     NOT NULL CHECK (max_concurrent_trials > 0),
    -- NULL: no limit.
    max_failed_trials     integer     CHECK (max_failed_trials >= 0),
    -- ASHA, resolved to steps at creation: the rungs, a full trial's steps, η.
    asha_rungs            bigint[],
    asha_max_steps        bigint,
    asha_reduction_factor integer CHECK (asha_reduction_factor >= 2),
    -- The best trial when the sweep last finished.
    best_trial_index      integer,
    created_at            timestamptz NOT NULL DEFAULT now(),
    finished_at           timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((algorithm = 'asha') = (asha_rungs IS NOT NULL AND asha_max_steps IS NOT NULL
                                   AND asha_reduction_factor IS NOT NULL))
);
-- Listing: newest first with keyset paging on (created_at, id).
CREATE INDEX sweeps_created_idx ON sweeps (created_at DESC, id DESC);
-- The sweep engine's scan.
CREATE INDEX sweeps_running_idx ON sweeps (created_at) WHERE state = 'running';

ALTER TABLE jobs
    ADD COLUMN sweep_id             uuid    REFERENCES sweeps (id),
    ADD COLUMN trial_index          integer CHECK (trial_index >= 0),
    -- {"peft.num_virtual_tokens": 20, "training.learning_rate": 0.003}
    ADD COLUMN trial_params         jsonb,
    -- Set by ASHA on a running trial; the worker stops at its next step.
    ADD COLUMN early_stop_requested boolean NOT NULL DEFAULT false,
    -- The job ended before its last step because its sweep stopped it.
    ADD COLUMN early_stopped        boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT jobs_trial_check
        CHECK ((sweep_id IS NULL) = (trial_index IS NULL) AND (sweep_id IS NULL) = (trial_params IS NULL)),
    -- Trial i of a sweep exists at most once, whatever restarts happen.
    ADD CONSTRAINT jobs_sweep_trial_key UNIQUE (sweep_id, trial_index);

CREATE TABLE asha_decisions (
    sweep_id    uuid             NOT NULL REFERENCES sweeps (id),
    trial_index integer          NOT NULL,
    -- Rung number (0 is the first) and the step it sits at.
    rung        integer          NOT NULL CHECK (rung >= 0),
    rung_step   bigint           NOT NULL CHECK (rung_step > 0),
    decision    text             NOT NULL CHECK (decision IN ('promote', 'stop')),
    -- The trial's objective at the rung, which later arrivals are compared with.
    value       double precision NOT NULL,
    decided_at  timestamptz      NOT NULL DEFAULT now(),
    -- A decision is never taken twice.
    PRIMARY KEY (sweep_id, trial_index, rung),
    FOREIGN KEY (sweep_id, trial_index) REFERENCES jobs (sweep_id, trial_index)
);
