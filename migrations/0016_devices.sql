-- Devices: a worker runs one engine per device (the CPU, or each GPU) and
-- the scheduler places each attempt on devices of its worker whose memory
-- fits it. An attempt records the devices it got; a job keeps those of its
-- latest attempt, for `ptune jobs get` and the dashboard. Empty: leased
-- before devices were recorded, or to a worker that registered none.

ALTER TABLE job_attempts ADD COLUMN devices text[] NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN devices text[] NOT NULL DEFAULT '{}';
