-- Back to 0031: the appends without a bound (0022's fenced append, 0029's procedure).
DROP PROCEDURE cairn_append_commit_v2(text, bigint, bigint, uuid[], text[], entity_kind[],
                                      text[], text[], text[], jsonb[], bytea[], text, bigint[],
                                      boolean);
DROP FUNCTION cairn_append_fenced_after_v2(text, bigint, bigint, uuid[], text[], entity_kind[],
                                           text[], text[], text[], jsonb[], bytea[]);
DROP TABLE node_fences_owed;
ALTER TABLE node_liveness DROP COLUMN appends_below;

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

CREATE PROCEDURE cairn_append_commit_v1(
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
          FROM cairn_append_fenced_after_v1(p_writer, p_floor, p_event_ids, p_job_ids, p_kinds,
                                            p_entity_ids, p_types, p_node_ids, p_payloads,
                                            p_data) a;
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

DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
BEGIN
    EXECUTE format('ALTER FUNCTION cairn_append_fenced_after_v1(text, bigint, uuid[], text[], '
                   'entity_kind[], text[], text[], text[], jsonb[], bytea[]) '
                   'SECURITY DEFINER SET search_path = %s', v_path);
    ALTER FUNCTION cairn_append_fenced_after_v1(text, bigint, uuid[], text[], entity_kind[],
        text[], text[], text[], jsonb[], bytea[])
        SET plan_cache_mode = force_generic_plan;
    REVOKE EXECUTE ON FUNCTION cairn_append_fenced_after_v1(text, bigint, uuid[], text[],
        entity_kind[], text[], text[], text[], jsonb[], bytea[]) FROM PUBLIC;
    REVOKE EXECUTE ON PROCEDURE cairn_append_commit_v1(text, bigint, uuid[], text[],
        entity_kind[], text[], text[], text[], jsonb[], bytea[], text, bigint[], boolean)
        FROM PUBLIC;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_append_fenced_after_v1(text, bigint, uuid[], text[],
            entity_kind[], text[], text[], text[], jsonb[], bytea[]) TO cairn_runtime;
        GRANT EXECUTE ON PROCEDURE cairn_append_commit_v1(text, bigint, uuid[], text[],
            entity_kind[], text[], text[], text[], jsonb[], bytea[], text, bigint[], boolean)
            TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on the appends: %', SQLERRM;
END
$$;
