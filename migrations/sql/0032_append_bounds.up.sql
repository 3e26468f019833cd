-- A node's death while a server of the log is away (issue 20). Its `dead` event must be
-- past every event the node got in, on every server: so far the monitor fenced it on
-- each server first (0022), and waited while one did not answer; the node's death, and
-- with it the work of every job it ran, waited for that server.
--
-- Now a node's appends to the servers other than server 0 carry a bound: a position
-- they must stay below (refused past it, nothing stored). The node's pings to server 0
-- renew it, each to past the node's clock and server 0's heads by a margin the log does
-- not cross between two pings (node_liveness.appends_below; membership.py). The bound
-- stops growing once the monitor declares the node dead (its pings are refused from
-- then on), so the `dead` event appended past the last bound is past anything the node
-- got into a server the monitor could not fence: the fence there is owed
-- (node_fences_owed) and placed once the server answers, and until then the node's
-- appends to it are refused past the bound. (controlplane/README.md, "A node's death
-- while a server is away".)

ALTER TABLE node_liveness ADD COLUMN appends_below bigint;

CREATE TABLE node_fences_owed (
    node_id       text NOT NULL,
    server_index  smallint NOT NULL CHECK (server_index > 0),
    owed_since    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (node_id, server_index)
);

-- cairn_append_fenced_after_v1 (0022) with the node's bound: an append that would take a
-- position at or past p_below (NULL: none) fails, nothing stored, with SQLSTATE CN001
-- and the highest position it reached as its detail (the node's clock moves past it,
-- its next ping renews the bound past that, and the append is tried again).
CREATE FUNCTION cairn_append_fenced_after_v2(
    p_writer      text,
    p_floor       bigint,
    p_below       bigint,
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
DECLARE
    v_last bigint;
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
    IF p_below IS NOT NULL AND cardinality(positions) > 0 THEN
        SELECT max(p) INTO v_last FROM unnest(positions) p;
        IF v_last >= p_below THEN
            RAISE EXCEPTION 'node %''s appends to this server must stay below position % '
                            '(its bound, renewed by its pings to server 0); this one reached %',
                            p_writer, p_below, v_last
                  USING ERRCODE = 'CN001', DETAIL = v_last::text;
        END IF;
    END IF;
END;
$$;

-- cairn_append_commit_v1 (0029) with the writer's bound (p_below: see above).
CREATE PROCEDURE cairn_append_commit_v2(
    p_writer      text,
    p_floor       bigint,
    p_below       bigint,
    p_event_ids   uuid[],
    p_job_ids     text[],
    p_kinds       entity_kind[],
    p_entity_ids  text[],
    p_types       text[],
    p_node_ids    text[],
    p_payloads    jsonb[],
    p_data        bytea[],
    p_readers     text,
    INOUT positions bigint[] DEFAULT NULL,
    INOUT refused boolean DEFAULT NULL
) LANGUAGE plpgsql
AS $$
DECLARE
    v_last bigint;
BEGIN
    refused := false;
    IF p_floor IS NOT NULL AND p_writer IS NOT NULL THEN
        SELECT a.positions, a.refused INTO positions, refused
          FROM cairn_append_fenced_after_v2(p_writer, p_floor, p_below, p_event_ids,
                                            p_job_ids, p_kinds, p_entity_ids, p_types,
                                            p_node_ids, p_payloads, p_data) a;
    ELSIF p_floor IS NOT NULL THEN
        positions := cairn_append_after_v1(p_floor, p_event_ids, p_job_ids, p_kinds,
                                           p_entity_ids, p_types, p_node_ids, p_payloads,
                                           p_data);
    ELSIF p_writer IS NOT NULL THEN
        SELECT a.positions, a.refused INTO positions, refused
          FROM cairn_append_fenced_v2(p_writer, p_event_ids, p_job_ids, p_kinds, p_entity_ids,
                                      p_types, p_node_ids, p_payloads, p_data) a;
    ELSE
        positions := cairn_append_v2(p_event_ids, p_job_ids, p_kinds, p_entity_ids, p_types,
                                     p_node_ids, p_payloads, p_data);
    END IF;
    IF cardinality(positions) = 0 THEN
        RETURN;
    END IF;
    v_last := positions[1];
    IF cardinality(positions) > 1 THEN
        SELECT max(p) INTO v_last FROM unnest(positions) p;
    END IF;
    COMMIT;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_notify('cairn_events_v1', v_last::text);
    PERFORM pg_notify('cairn_events_for_v1', p_readers);
END;
$$;

DROP PROCEDURE cairn_append_commit_v1(text, bigint, uuid[], text[], entity_kind[], text[],
                                      text[], text[], jsonb[], bytea[], text, bigint[], boolean);
DROP FUNCTION cairn_append_fenced_after_v1(text, bigint, uuid[], text[], entity_kind[], text[],
                                           text[], text[], jsonb[], bytea[]);

DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
BEGIN
    EXECUTE format('ALTER FUNCTION cairn_append_fenced_after_v2(text, bigint, bigint, uuid[], '
                   'text[], entity_kind[], text[], text[], text[], jsonb[], bytea[]) '
                   'SECURITY DEFINER SET search_path = %s', v_path);
    ALTER FUNCTION cairn_append_fenced_after_v2(text, bigint, bigint, uuid[], text[],
        entity_kind[], text[], text[], text[], jsonb[], bytea[])
        SET plan_cache_mode = force_generic_plan;
    REVOKE EXECUTE ON FUNCTION cairn_append_fenced_after_v2(text, bigint, bigint, uuid[],
        text[], entity_kind[], text[], text[], text[], jsonb[], bytea[]) FROM PUBLIC;
    REVOKE EXECUTE ON PROCEDURE cairn_append_commit_v2(text, bigint, bigint, uuid[], text[],
        entity_kind[], text[], text[], text[], jsonb[], bytea[], text, bigint[], boolean)
        FROM PUBLIC;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_append_fenced_after_v2(text, bigint, bigint, uuid[],
            text[], entity_kind[], text[], text[], text[], jsonb[], bytea[]) TO cairn_runtime;
        GRANT EXECUTE ON PROCEDURE cairn_append_commit_v2(text, bigint, bigint, uuid[],
            text[], entity_kind[], text[], text[], text[], jsonb[], bytea[], text, bigint[],
            boolean) TO cairn_runtime;
        GRANT SELECT, INSERT, DELETE ON node_fences_owed TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on the append bounds: %', SQLERRM;
END
$$;
