-- Shards on several PostgreSQL servers (issue 20; controlplane/README.md, "A log on
-- several servers"). Shard s of a log of S shards on N servers lies on server s % N:
-- that server's event_log_shards holds the heads of its shards only, and its `events`
-- their events. Each server is a GCS database of its own, migrated as any other; the
-- placement is set when the log is made (cairn_set_log_server_v1), as the shard count is.
--
-- Within a server, positions are what 0019 made them (unique, commit-ordered per shard,
-- a cause before its effect across its shards). Across servers no snapshot sees every
-- head, so an append there cannot read them: the writer passes its clock instead, the
-- highest position it has seen on any server (read or appended), and the append takes
-- positions past it (cairn_append_after_v1). An effect is appended by a writer that saw
-- its cause (read it, or appended it), so its position is higher: position order stays
-- a causal order of the whole log, a Lamport clock over the servers.

ALTER TABLE event_log_head
    ADD COLUMN server_index smallint NOT NULL DEFAULT 0,
    ADD COLUMN server_count smallint NOT NULL DEFAULT 1,
    ADD CONSTRAINT event_log_head_server CHECK (server_index >= 0
                                                AND server_index < server_count);

-- Makes this server server p_index of p_count: it keeps the heads of the shards s with
-- s % p_count = p_index and drops the others' (a shard that holds an event here may not
-- move: the placement is set on a new log, after cairn_set_log_shards_v1).
CREATE FUNCTION cairn_set_log_server_v1(p_index integer, p_count integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_shards integer;
    v_moved  integer;
BEGIN
    PERFORM 1 FROM event_log_head WHERE id = 1 FOR UPDATE;
    SELECT shard_count INTO v_shards FROM event_log_head WHERE id = 1;
    IF p_count < 1 OR p_index < 0 OR p_index >= p_count OR p_count > v_shards THEN
        RAISE EXCEPTION 'server % of % cannot hold shards of a log of % shard(s): each of '
                        'the servers holds at least one', p_index, p_count, v_shards
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT min(shard) INTO v_moved FROM events
     WHERE shard % p_count <> p_index LIMIT 1;
    IF v_moved IS NOT NULL THEN
        RAISE EXCEPTION 'shard % holds events on this server: shards are placed on '
                        'servers when the log is made, not moved', v_moved
              USING ERRCODE = 'object_in_use';
    END IF;
    PERFORM 1 FROM event_log_shards ORDER BY shard FOR UPDATE;
    DELETE FROM event_log_shards WHERE shard % p_count <> p_index;
    INSERT INTO event_log_shards (shard, last_position)
    SELECT s, coalesce((SELECT max(last_position) FROM event_log_shards), 0)
      FROM generate_series(0, v_shards - 1) s
     WHERE s % p_count = p_index
    ON CONFLICT (shard) DO NOTHING;
    UPDATE event_log_head SET server_index = p_index, server_count = p_count WHERE id = 1;
    RETURN p_index;
END;
$$;

-- cairn_append_v2, with positions past p_floor (the writer's clock): the heads of the
-- batch's shards are raised to it first, under their locks (taken in shard order, as the
-- append takes them again). A batch with an event of a shard this server does not hold
-- is refused, with nothing stored.
CREATE FUNCTION cairn_append_after_v1(
    p_floor       bigint,
    p_event_ids   uuid[],
    p_job_ids     text[],
    p_kinds       entity_kind[],
    p_entity_ids  text[],
    p_types       text[],
    p_node_ids    text[],
    p_payloads    jsonb[],
    p_data        bytea[],
    OUT positions bigint[]
) LANGUAGE plpgsql
AS $$
DECLARE
    v_count  integer;
    v_used   smallint[];
    v_held   smallint[];
BEGIN
    SELECT shard_count INTO v_count FROM event_log_head WHERE id = 1;
    SELECT array_agg(DISTINCT cairn_shard_of_v1(j, v_count)) INTO v_used
      FROM unnest(p_job_ids) j;
    SELECT coalesce(array_agg(shard), '{}') INTO v_held
      FROM (SELECT shard FROM event_log_shards WHERE shard = ANY (v_used)
             ORDER BY shard FOR UPDATE) s;
    IF cardinality(v_held) <> coalesce(cardinality(v_used), 0) THEN
        RAISE EXCEPTION 'shard(s) % of this batch are not on this server (it holds %)',
              (SELECT array_agg(s) FROM unnest(v_used) s WHERE s <> ALL (v_held)),
              (SELECT array_agg(shard ORDER BY shard) FROM event_log_shards)
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_floor IS NOT NULL THEN
        UPDATE event_log_shards SET last_position = p_floor
         WHERE shard = ANY (v_used) AND last_position < p_floor;
    END IF;
    positions := cairn_append_v2(p_event_ids, p_job_ids, p_kinds, p_entity_ids, p_types,
                                 p_node_ids, p_payloads, p_data);
END;
$$;

DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
    v_function text;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'cairn_append_after_v1(bigint, uuid[], text[], entity_kind[], text[], text[], '
            'text[], jsonb[], bytea[])',
        'cairn_set_log_server_v1(integer, integer)'
    ] LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %s',
                       v_function, v_path);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_function);
    END LOOP;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_append_after_v1(bigint, uuid[], text[], entity_kind[],
            text[], text[], text[], jsonb[], bytea[]) TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on the servers'' appends: %', SQLERRM;
END
$$;
