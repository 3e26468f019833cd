-- The log's identity (issue 15, storage faults): a GCS wiped, replaced, or put back from
-- an older copy must be told apart from the log a node was using, so that the node
-- refuses it instead of handing out positions and ids the cluster has already used.
--
-- cluster_id is drawn once, when this migration first runs on a log (a new log: its
-- first migration run; an existing one: its upgrade), and is never written again. A
-- physical copy of the server (a replica, a restored base backup) and a database made
-- from it as a template keep it; a new log (a wiped database migrated again, a fresh
-- server) draws another. Together with the server's system identifier (pg_control, which
-- cairn_epoch_v1() already returns) it names the log.
--
-- cairn_identity_v1() answers, in one round trip, what every connection of the runtime
-- checks first (controlplane/eventlog/fencing.py): the epoch (recording a promotion,
-- as cairn_epoch_v1() does), the identity, the head position (a log put back from an
-- older copy ends below what its nodes have seen) and whether the server is a standby
-- (whose head may lag by design).
CREATE TABLE gcs_identity (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    cluster_id  uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO gcs_identity DEFAULT VALUES;

CREATE FUNCTION cairn_identity_v1(OUT system_id bigint, OUT cluster_id uuid, OUT epoch bigint,
                                  OUT epoch_id uuid, OUT timeline integer,
                                  OUT head_position bigint, OUT standby boolean)
LANGUAGE sql VOLATILE AS $$
    SELECT e.system_id, i.cluster_id, e.epoch, e.epoch_id, e.timeline, h.last_position,
           pg_is_in_recovery()
      FROM cairn_epoch_v1() e, gcs_identity i, event_log_head h
     WHERE h.id = 1
$$;

-- As cairn_epoch_v1 (0011), which it calls: run as the owner with the log's schema
-- first, callable by the runtime, not by PUBLIC (so not by cairn_audit).
DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
BEGIN
    EXECUTE format('ALTER FUNCTION cairn_identity_v1() SECURITY DEFINER SET search_path = %s',
                   v_path);
    REVOKE EXECUTE ON FUNCTION cairn_identity_v1() FROM PUBLIC;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_identity_v1() TO cairn_runtime;
        GRANT SELECT ON gcs_identity TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on gcs_identity: %', SQLERRM;
END
$$;
