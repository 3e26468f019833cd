-- The fence (0012, 0019) on a log on several servers (0021). A node's liveness row, which
-- the monitor sets `fenced_at` on when it declares the node dead, lives on one server;
-- the node appends to all of them. So the fence is put on each server too
-- (cairn_fence_node_v1, before the `dead` event is appended: eventlog/servers.py,
-- fence_node), under the fence's lock held exclusive: it waits for the node's appends in
-- flight there, and every later one, holding the lock shared, sees the fence and is
-- refused. Every event the node got into the log is therefore committed before its `dead`
-- event, and has a lower position (the fence returns the server's highest head, which
-- goes into the clock of whoever appends `dead`).
CREATE TABLE node_fences (
    node_id    text PRIMARY KEY,
    fenced_at  timestamptz NOT NULL
);

CREATE FUNCTION cairn_fence_node_v1(p_node text, OUT head bigint) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cairn_fence_lock_v1(p_node, false);
    INSERT INTO node_fences (node_id, fenced_at) VALUES (p_node, clock_timestamp())
    ON CONFLICT (node_id) DO NOTHING;
    head := (SELECT max(last_position) FROM event_log_shards);
END;
$$;

-- cairn_append_after_v1 on behalf of node p_writer, refused (nothing stored) once it is
-- fenced on this server, by its liveness row or by cairn_fence_node_v1. (A refusal is not
-- recorded here: the `stale_refused` event of a single server is a node event, in shard
-- 0, which may lie on another server.)
CREATE FUNCTION cairn_append_fenced_after_v1(
    p_writer      text,
    p_floor       bigint,
    p_event_ids   uuid[],
    p_job_ids     text[],
    p_kinds       entity_kind[],
    p_entity_ids  text[],
    p_types       text[],
    p_node_ids    text[],
    p_payloads    jsonb[],
    p_data        bytea[],
    OUT positions bigint[],
    OUT refused boolean
) LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM cairn_fence_lock_v1(p_writer, true);
    refused := EXISTS (SELECT 1 FROM node_liveness l
                        WHERE l.node_id = p_writer AND l.fenced_at IS NOT NULL)
            OR EXISTS (SELECT 1 FROM node_fences f WHERE f.node_id = p_writer);
    IF refused THEN
        positions := '{}';
        RETURN;
    END IF;
    positions := cairn_append_after_v1(p_floor, p_event_ids, p_job_ids, p_kinds,
                                       p_entity_ids, p_types, p_node_ids, p_payloads, p_data);
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
        'cairn_append_fenced_after_v1(text, bigint, uuid[], text[], entity_kind[], text[], '
            'text[], text[], jsonb[], bytea[])',
        'cairn_fence_node_v1(text)'
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
        GRANT EXECUTE ON FUNCTION cairn_append_fenced_after_v1(text, bigint, uuid[], text[],
            entity_kind[], text[], text[], text[], jsonb[], bytea[]) TO cairn_runtime;
        GRANT EXECUTE ON FUNCTION cairn_fence_node_v1(text) TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on the servers'' fences: %', SQLERRM;
END
$$;
