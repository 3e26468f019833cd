-- Grants are per database and are taken back here; the roles themselves and
-- cairn_runtime's membership of cairn_audit are cluster-wide and stay (other databases
-- of the server may use them), as 0007 leaves cairn_audit.
DO $$
DECLARE
    v_schema text := (SELECT n.nspname FROM pg_class c
                        JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE c.oid = 'events'::regclass);
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        IF to_regnamespace('projection') IS NOT NULL THEN
            ALTER DEFAULT PRIVILEGES IN SCHEMA projection
                REVOKE SELECT, INSERT, UPDATE ON TABLES FROM cairn_runtime;
            REVOKE ALL ON ALL TABLES IN SCHEMA projection FROM cairn_runtime;
            REVOKE USAGE ON SCHEMA projection FROM cairn_runtime;
        END IF;
        EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE SELECT ON TABLES '
                       'FROM cairn_runtime', v_schema);
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM cairn_runtime', v_schema);
        EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA %I FROM cairn_runtime', v_schema);
        EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM cairn_runtime', v_schema);
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime keeps its grants: %', SQLERRM;
END
$$;

DO $$
DECLARE
    v_function text;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'cairn_create_next_partition_v1()',
        'cairn_ensure_partitions_v1(bigint)',
        'cairn_append_v1(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[], bytea[])'
    ] LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY INVOKER RESET search_path', v_function);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', v_function);
    END LOOP;
END
$$;
