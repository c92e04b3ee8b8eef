-- Coordinators keep API token rows and what leasing reads of a worker's
-- registration in memory (`coordinator/src/store/cache.rs`): every call
-- authenticates and every LeaseJob call reads its worker, and neither
-- changes often. A 'ptune_cache' notification names the row that changed,
-- whichever coordinator changed it ('t:' and a token id, 'w:' and a worker
-- id), so every coordinator drops its copy. Only the columns those copies
-- hold fire it: a token's last_used_at and a worker's liveness columns
-- change on most calls and are never cached.

CREATE FUNCTION ptune_notify_cache() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed uuid := CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END;
BEGIN
    PERFORM pg_notify('ptune_cache', TG_ARGV[0] || ':' || changed::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_tokens_cache_changed
    AFTER UPDATE OF name, role, salt, hash, expires_at, revoked_at OR DELETE ON api_tokens
    FOR EACH ROW EXECUTE FUNCTION ptune_notify_cache('t');

CREATE TRIGGER workers_cache_changed
    AFTER UPDATE OF models, devices, memory_bytes, token_id, registered_at OR DELETE ON workers
    FOR EACH ROW EXECUTE FUNCTION ptune_notify_cache('w');
