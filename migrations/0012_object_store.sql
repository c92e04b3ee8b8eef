-- Files in an object store (`--blob-store`): PostgreSQL keeps the metadata
-- and the bytes go to the store.
--
-- `location` names the store that holds a blob's or a checkpoint's bytes
-- (for example `s3://bucket/prefix`); NULL means the chunk tables here. A
-- row's object is `<location>/blobs/<id>` or `<location>/checkpoints/<id>`.
-- A blob records its size and sha256 once linked, so a move between stores
-- can verify every byte.

ALTER TABLE blobs
    ADD COLUMN location text CHECK (location <> ''),
    ADD COLUMN size     bigint CHECK (size >= 0),
    ADD COLUMN sha256   text CHECK (sha256 ~ '^[0-9a-f]{64}$');
ALTER TABLE job_checkpoints ADD COLUMN location text CHECK (location <> '');

UPDATE blobs b SET size = d.size, sha256 = d.sha256 FROM datasets d WHERE d.blob_id = b.id;
UPDATE blobs b SET size = a.size, sha256 = a.sha256 FROM adapters a WHERE a.blob_id = b.id;

-- Objects whose row went, or whose row moved to another store. The leader
-- deletes each from its store and then its entry here, so an object no row
-- references is collected whichever statement dropped the row (a reaped
-- upload, a cascade from a deleted job, a replaced checkpoint, a move).
CREATE TABLE dropped_objects (
    id         bigserial   PRIMARY KEY,
    location   text        NOT NULL,
    key        text        NOT NULL,
    dropped_at timestamptz NOT NULL DEFAULT now()
);

-- TG_ARGV[0] is the key's folder: 'blobs' or 'checkpoints'.
CREATE FUNCTION ptune_drop_object() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.location IS NOT NULL
       AND (TG_OP = 'DELETE' OR OLD.location IS DISTINCT FROM NEW.location) THEN
        INSERT INTO dropped_objects (location, key) VALUES (OLD.location, TG_ARGV[0] || '/' || OLD.id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER blobs_drop_object
    AFTER DELETE OR UPDATE OF location ON blobs
    FOR EACH ROW EXECUTE FUNCTION ptune_drop_object('blobs');
CREATE TRIGGER job_checkpoints_drop_object
    AFTER DELETE OR UPDATE OF location ON job_checkpoints
    FOR EACH ROW EXECUTE FUNCTION ptune_drop_object('checkpoints');
