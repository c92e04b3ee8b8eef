-- Datasets and adapters stored as chunks of 1 MiB (the last one shorter),
-- written as they arrive and read a chunk at a time, so the coordinator
-- never holds a whole file in memory.
--
-- An upload inserts an incomplete blob, then its chunks, each in its own
-- statement. The statement that links the blob to a dataset or an adapter
-- also marks it complete, in one transaction; blobs left incomplete (an
-- upload cut off) are removed once untouched for an hour.

CREATE TABLE blobs (
    id         uuid        PRIMARY KEY,
    complete   boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    touched_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blobs_incomplete_idx ON blobs (touched_at) WHERE NOT complete;

CREATE TABLE blob_chunks (
    blob_id uuid    NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    seq     integer NOT NULL CHECK (seq >= 0),
    data    bytea   NOT NULL CHECK (length(data) BETWEEN 1 AND 1048576),
    PRIMARY KEY (blob_id, seq)
);
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

-- Existing files move into blobs.
ALTER TABLE datasets ADD COLUMN blob_id uuid;
ALTER TABLE adapters ADD COLUMN blob_id uuid;
UPDATE datasets SET blob_id = gen_random_uuid();
UPDATE adapters SET blob_id = gen_random_uuid();
INSERT INTO blobs (id, complete) SELECT blob_id, true FROM datasets;
INSERT INTO blobs (id, complete) SELECT blob_id, true FROM adapters;
INSERT INTO blob_chunks (blob_id, seq, data)
    SELECT d.blob_id, s.seq, substring(d.content FROM s.seq * 1048576 + 1 FOR 1048576)
    FROM datasets d, generate_series(0, ((d.size - 1) / 1048576)::int) AS s (seq);
INSERT INTO blob_chunks (blob_id, seq, data)
    SELECT a.blob_id, s.seq, substring(a.content FROM s.seq * 1048576 + 1 FOR 1048576)
    FROM adapters a, generate_series(0, ((a.size - 1) / 1048576)::int) AS s (seq);

ALTER TABLE datasets
    ALTER COLUMN blob_id SET NOT NULL,
    ADD CONSTRAINT datasets_blob_fk FOREIGN KEY (blob_id) REFERENCES blobs (id),
    ADD CONSTRAINT datasets_blob_unique UNIQUE (blob_id),
    DROP COLUMN content;
ALTER TABLE adapters
    ALTER COLUMN blob_id SET NOT NULL,
    ADD CONSTRAINT adapters_blob_fk FOREIGN KEY (blob_id) REFERENCES blobs (id),
    ADD CONSTRAINT adapters_blob_unique UNIQUE (blob_id),
    DROP COLUMN content;
