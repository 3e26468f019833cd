-- Back to one head row (0001): only a log of one shard goes back.
DO $$
BEGIN
    IF (SELECT shard_count FROM event_log_head WHERE id = 1) > 1 THEN
        RAISE EXCEPTION 'this log has % shards: only a single-shard log can go back to '
                        'revision 0018', (SELECT shard_count FROM event_log_head WHERE id = 1);
    END IF;
END
$$;

ALTER TABLE subscriptions DROP COLUMN positions;
ALTER TABLE checkpoints DROP COLUMN positions;
DROP FUNCTION cairn_append_fenced_v2(text, uuid[], text[], entity_kind[], text[], text[],
                                     text[], jsonb[], bytea[]);
DROP FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[],
                              bytea[]);
DROP FUNCTION cairn_settled_position_v1();
DROP FUNCTION cairn_fence_lock_v1(text, boolean);
DROP FUNCTION cairn_set_log_shards_v1(integer);
DROP FUNCTION cairn_next_in_shard_v1(bigint, integer, integer);
DROP FUNCTION cairn_shard_of_v1(text, integer);
DROP INDEX IF EXISTS events_shard_position_idx;

ALTER TABLE event_log_head ADD COLUMN last_position bigint NOT NULL DEFAULT 0;
UPDATE event_log_head SET last_position = (SELECT max(last_position) FROM event_log_shards);
ALTER TABLE event_log_head DROP COLUMN shard_count;
DROP TABLE event_log_shards;
ALTER TABLE events DROP COLUMN shard;

-- 0001's append function and 0012's fenced one, as they were
CREATE FUNCTION cairn_append_v1(
    p_event_ids   uuid[],
    p_job_ids     text[],
    p_kinds       entity_kind[],
    p_entity_ids  text[],
    p_types       text[],
    p_node_ids    text[],
    p_payloads    jsonb[],
    p_data        bytea[],
    OUT base_position bigint,
    OUT duplicate_ids uuid[],
    OUT duplicate_positions bigint[]
) LANGUAGE plpgsql
AS $$
DECLARE
    v_until  bigint;
    v_now    timestamptz;
    v_stored bigint;
BEGIN
    IF cardinality(p_event_ids) <> (SELECT count(DISTINCT i) FROM unnest(p_event_ids) i) THEN
        RAISE EXCEPTION 'cairn_append_v1: an event_id is repeated within one batch'
              USING ERRCODE = 'unique_violation';
    END IF;
    SELECT last_position, partitioned_until INTO base_position, v_until
      FROM event_log_head WHERE id = 1 FOR UPDATE;
    IF base_position + cardinality(p_event_ids) >= v_until THEN
        PERFORM cairn_ensure_partitions_v1(base_position + cardinality(p_event_ids));
    END IF;
    v_now := clock_timestamp();

    SELECT coalesce(array_agg(e.event_id ORDER BY e.position), '{}'),
           coalesce(array_agg(e.position ORDER BY e.position), '{}')
      INTO duplicate_ids, duplicate_positions
      FROM events e WHERE e.event_id = ANY (p_event_ids);

    IF cardinality(duplicate_ids) = 0 THEN  -- the common case: positions are base + ord
        INSERT INTO events (position, event_id, recorded_at, job_id, entity_kind, entity_id,
                            event_type, node_id, payload, data)
        SELECT base_position + u.ord, u.event_id, v_now, u.job_id, u.kind, u.entity_id,
               u.event_type, u.node_id, u.payload, u.data
          FROM unnest(p_event_ids, p_job_ids, p_kinds, p_entity_ids, p_types, p_node_ids,
                      p_payloads, p_data)
               WITH ORDINALITY AS u(event_id, job_id, kind, entity_id, event_type, node_id,
                                    payload, data, ord);
    ELSE
        INSERT INTO events (position, event_id, recorded_at, job_id, entity_kind, entity_id,
                            event_type, node_id, payload, data)
        SELECT base_position + row_number() OVER (ORDER BY u.ord), u.event_id, v_now,
               u.job_id, u.kind, u.entity_id, u.event_type, u.node_id, u.payload, u.data
          FROM unnest(p_event_ids, p_job_ids, p_kinds, p_entity_ids, p_types, p_node_ids,
                      p_payloads, p_data)
               WITH ORDINALITY AS u(event_id, job_id, kind, entity_id, event_type, node_id,
                                    payload, data, ord)
         WHERE u.event_id <> ALL (duplicate_ids)
         ORDER BY u.ord;
    END IF;
    GET DIAGNOSTICS v_stored = ROW_COUNT;

    IF v_stored > 0 THEN
        UPDATE event_log_head SET last_position = base_position + v_stored WHERE id = 1;
        PERFORM pg_notify('cairn_events_v1', (base_position + v_stored)::text);
    END IF;
END;
$$;

CREATE FUNCTION cairn_append_fenced_v1(
    p_writer      text,
    p_event_ids   uuid[],
    p_job_ids     text[],
    p_kinds       entity_kind[],
    p_entity_ids  text[],
    p_types       text[],
    p_node_ids    text[],
    p_payloads    jsonb[],
    p_data        bytea[],
    OUT base_position bigint,
    OUT duplicate_ids uuid[],
    OUT duplicate_positions bigint[],
    OUT refused boolean
) LANGUAGE plpgsql
AS $$
DECLARE
    v_fenced timestamptz;
    v_reason jsonb;
BEGIN
    -- first the lock, then the fence: a death declared before we hold the lock has
    -- committed by now and is seen by the next statement (READ COMMITTED)
    PERFORM 1 FROM event_log_head WHERE id = 1 FOR UPDATE;
    SELECT l.fenced_at INTO v_fenced FROM node_liveness l WHERE l.node_id = p_writer;
    refused := v_fenced IS NOT NULL;
    IF NOT refused THEN
        SELECT a.base_position, a.duplicate_ids, a.duplicate_positions
          INTO base_position, duplicate_ids, duplicate_positions
          FROM cairn_append_v1(p_event_ids, p_job_ids, p_kinds, p_entity_ids, p_types,
                               p_node_ids, p_payloads, p_data) a;
        RETURN;
    END IF;
    SELECT jsonb_build_object(
               'reason', format('node %s was declared dead at %s; its old incarnation '
                                'may no longer append', p_writer, v_fenced),
               'events', cardinality(p_event_ids),
               'event_types', (SELECT jsonb_agg(DISTINCT t) FROM unnest(p_types) t),
               'entity_ids', (SELECT jsonb_agg(e) FROM (SELECT e FROM unnest(p_entity_ids) e
                                                         LIMIT 20) s))
      INTO v_reason;
    SELECT a.base_position, a.duplicate_ids, a.duplicate_positions
      INTO base_position, duplicate_ids, duplicate_positions
      FROM cairn_append_v1(ARRAY[gen_random_uuid()], ARRAY[NULL::text],
                           ARRAY['node'::entity_kind], ARRAY[p_writer],
                           ARRAY['stale_refused'], ARRAY[NULL::text], ARRAY[v_reason],
                           ARRAY[NULL::bytea]) a;
END;
$$;

CREATE OR REPLACE FUNCTION cairn_identity_v1(OUT system_id bigint, OUT cluster_id uuid, OUT epoch bigint,
                                  OUT epoch_id uuid, OUT timeline integer,
                                  OUT head_position bigint, OUT standby boolean)
LANGUAGE sql VOLATILE AS $$
    SELECT e.system_id, i.cluster_id, e.epoch, e.epoch_id, e.timeline, h.last_position,
           pg_is_in_recovery()
      FROM cairn_epoch_v1() e, gcs_identity i, event_log_head h
     WHERE h.id = 1
$$;

DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
    v_function text;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'cairn_append_v1(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[], bytea[])',
        'cairn_append_fenced_v1(text, uuid[], text[], entity_kind[], text[], text[], text[], '
            'jsonb[], bytea[])'
    ] LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %s',
                       v_function, v_path);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_function);
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_append_v1(uuid[], text[], entity_kind[], text[],
            text[], text[], jsonb[], bytea[]) TO cairn_runtime;
        GRANT EXECUTE ON FUNCTION cairn_append_fenced_v1(text, uuid[], text[], entity_kind[],
            text[], text[], text[], jsonb[], bytea[]) TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on the append functions: %', SQLERRM;
END
$$;
