DROP FUNCTION IF EXISTS cairn_append_v1(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[], bytea[]);
DROP FUNCTION IF EXISTS cairn_ensure_partitions_v1(bigint);
DROP FUNCTION IF EXISTS cairn_create_next_partition_v1();
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT table_name FROM event_partitions WHERE state IN ('detached', 'archived') LOOP
        EXECUTE format('DROP TABLE IF EXISTS %I', r.table_name);
    END LOOP;
END $$;
DROP TABLE IF EXISTS subscriptions;
DROP TABLE IF EXISTS event_partitions;
DROP TABLE IF EXISTS event_log_head;
DROP TABLE IF EXISTS events;
DROP TYPE IF EXISTS entity_kind;
