-- Database roles (issue 8), least privilege for each kind of process:
--
-- * the owner: whoever runs the migrations (`cairn migrate`, GCS start-up; on the
--   embedded server its superuser). It owns every table and function and alone changes
--   the schema, builds the history indexes of full partitions and retires partitions
--   (`cairn gc`).
-- * cairn_runtime: node daemons, schedulers and drivers. Appends through
--   cairn_append_v1, reads everything, and writes only the rows that are not events:
--   liveness pings, followers' positions, checkpoints, projections. No DDL, no CREATE on
--   any schema, not a superuser. The embedded server gives it a login with a password of
--   its own at start; elsewhere `ALTER ROLE cairn_runtime LOGIN PASSWORD ...` (or GRANT
--   cairn_runtime TO a login) and hand that URL to the runtime.
-- * cairn_audit (0007): reads only; cairn_runtime is a member, so that `cairn sql` run
--   with the runtime's URL can switch to it.
--
-- Roles are cluster-wide (created once, IF NOT EXISTS), grants are per database. A
-- server where the migrating user may not create roles keeps working without them:
-- everything then runs as that user, as before.

-- Appending may create partitions (DDL), which the runtime may not do itself: the
-- functions that do run as their owner (SECURITY DEFINER), with a search_path fixed to
-- the log's schema, so that nothing a caller creates can stand in for what they name
-- (pg_catalog, not named, is searched first; pg_temp, named last, never shadows the
-- log's tables; new partitions go to the schema named). Only roles granted EXECUTE may
-- call them: not PUBLIC, so not cairn_audit.
DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
    v_function text;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'cairn_create_next_partition_v1()',
        'cairn_ensure_partitions_v1(bigint)',
        'cairn_append_v1(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[], bytea[])'
    ] LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %s',
                       v_function, v_path);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_function);
    END LOOP;
END
$$;

DO $$
DECLARE
    v_schema text := (SELECT n.nspname FROM pg_class c
                        JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE c.oid = 'events'::regclass);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        CREATE ROLE cairn_runtime NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
            NOREPLICATION NOBYPASSRLS;
    END IF;
    -- read everything, now and in later migrations (views, partitions)
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO cairn_runtime', v_schema);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO cairn_runtime', v_schema);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES '
                   'TO cairn_runtime', v_schema);
    -- append (the head row and partitions are written by cairn_append_v1 itself)
    GRANT EXECUTE ON FUNCTION cairn_append_v1(uuid[], text[], entity_kind[], text[], text[],
                                              text[], jsonb[], bytea[]) TO cairn_runtime;
    GRANT EXECUTE ON FUNCTION cairn_ensure_partitions_v1(bigint) TO cairn_runtime;
    -- the rows that are not events: pings, followers' positions, checkpoints
    GRANT INSERT, UPDATE ON node_liveness, subscriptions, checkpoints TO cairn_runtime;
    -- projections (controlplane/projections), in schema projection since 0009
    IF to_regnamespace('projection') IS NOT NULL THEN
        GRANT USAGE ON SCHEMA projection TO cairn_runtime;
        GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA projection TO cairn_runtime;
        ALTER DEFAULT PRIVILEGES IN SCHEMA projection
            GRANT SELECT, INSERT, UPDATE ON TABLES TO cairn_runtime;
    ELSE
        GRANT INSERT, UPDATE ON jobs, tasks, objects, actors, nodes TO cairn_runtime;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_audit') THEN
        GRANT cairn_audit TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'no cairn_runtime role: % (the runtime uses the URL''s own user)', SQLERRM;
END
$$;
