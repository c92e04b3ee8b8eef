-- Leasing reads each model's queued jobs in the queue's order (submission,
-- then id) from this index, a page at a time after a cursor on both
-- (`coordinator/src/store/leasing.rs`), so a lease reads a page of jobs
-- whatever the queue's length. The index it replaces lacked the id, so
-- jobs submitted in one statement (which share created_at) were sorted on
-- every read.
DROP INDEX jobs_queue_idx;
CREATE INDEX jobs_queue_idx ON jobs (base_model, created_at, id) WHERE state = 'queued';

-- (state, created_at DESC, id DESC) serves every read this one did: every
-- such read names the state, and a B-tree is read in either direction.
-- Each index is one more entry written by every update that moves a job.
DROP INDEX jobs_state_created_idx;

-- A progress report changes no indexed column of its job (jobs.updated_at
-- is when the job's state or requests last changed, not its step), so
-- PostgreSQL can update the row in place on its page (a HOT update, no
-- index entries) when the page has room; leave some on new pages.
ALTER TABLE jobs SET (fillfactor = 85);
