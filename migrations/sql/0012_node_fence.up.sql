-- The node fence (issue 15, network faults). A node cut off from the cluster for longer
-- than the death timeout is declared dead by the membership monitor, and its work is
-- redone elsewhere. When the link comes back, its old incarnation may still try to
-- append what it did meanwhile (a late result, events of a placement it took late)
-- before its pinger learns of its death and the daemon stops. Those appends must not
-- land: after a node's `dead` event, no event of that node may follow in the log.
--
-- fenced_at is set when the monitor declares the node dead (not when a node leaves
-- cleanly, whose last events -- its own `dead` among them -- still land).
-- cairn_append_fenced_v1 appends on behalf of a node: under the head row's lock (the
-- lock the monitor's `dead` append also takes, in the same transaction as fenced_at),
-- it checks the node's fence; a fenced node's batch is not stored, and one
-- `stale_refused` event about the node records what was refused instead (its node_id
-- is NULL: the log wrote it, not the node). The caller learns it from `refused`.
ALTER TABLE node_liveness ADD COLUMN fenced_at timestamptz;

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

-- As the other append functions (0010): run as the owner, with the log's schema first;
-- callable by the runtime, not by PUBLIC.
DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
    v_function text := 'cairn_append_fenced_v1(text, uuid[], text[], entity_kind[], text[], '
                       'text[], text[], jsonb[], bytea[])';
BEGIN
    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %s',
                   v_function, v_path);
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_function);
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_append_fenced_v1(text, uuid[], text[], entity_kind[],
            text[], text[], text[], jsonb[], bytea[]) TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on cairn_append_fenced_v1: %', SQLERRM;
END
$$;
