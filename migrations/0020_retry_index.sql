-- Queued jobs waiting out a retry delay, by when they may run again. A
-- lease call that found nothing to take asks when the queue next changes
-- by time alone (a retry delay or a spread window ending); it read every
-- queued job of the worker's models for that, and the queue's index still
-- lists each job leased since the last vacuum, so after a burst of leases
-- each such call cost tens of milliseconds. The question is now answered
-- from three short index reads (coordinator/src/store/leasing.rs).
CREATE INDEX jobs_retry_idx ON jobs (retry_at) WHERE state = 'queued' AND retry_at IS NOT NULL;
