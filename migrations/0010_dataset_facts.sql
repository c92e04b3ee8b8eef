-- What admission needs to know of a dataset (per field: the first line
-- without it, the first line of each distinct value), gathered once while
-- it is uploaded, so that submitting a job does not read the file again.
-- NULL for datasets stored before: those are read as before.
ALTER TABLE datasets ADD COLUMN facts jsonb;
