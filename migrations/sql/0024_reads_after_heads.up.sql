-- A reader's heads and events in two statements (issue 20; controlplane/README.md, "Reading
-- only what concerns a reader"): the tailers read through cairn_read_events_v1.
--
-- Until now one statement read the shards' heads and the events up to them. But a
-- partition is attached (cairn_ensure_partitions_v1, 0001) under a SHARE UPDATE
-- EXCLUSIVE lock, which a reader's ACCESS SHARE does not wait for. A reader that checked
-- its plan (taking its locks) before the attach committed and took its snapshot after an
-- append committed rows into the new partition saw those rows' heads but scanned no such
-- partition: it moved past events it never read. The first append of a log attaches its
-- first partition, and an append on a server of a log on several may attach many (its
-- positions jump to the writer's clock), so this happened: a merged reader lost the
-- first event of a server in 1 run in 6 (tests/test_log_servers.py).
--
-- Here the heads are read first, then the events up to them by a statement of their own:
-- it takes its lock on `events` after the heads' statement, so it has received the
-- invalidation of every partition attached before those heads were seen (a row is
-- committed after its partition is attached), and it plans with them; its snapshot,
-- taken later still, holds every event up to the heads. Each statement of a volatile
-- function has its own snapshot, and its plan is checked when it runs. (One statement per
-- reader, not one that tests p_for as it runs: each is planned for its own index.)
CREATE FUNCTION cairn_read_events_v1(
    p_after   bigint[],  -- where the reader stands in each shard (index: shard + 1)
    p_limit   integer,   -- the batch size, per shard
    p_start   bigint,    -- where it stands in a shard past p_after
    p_reader  text,      -- a node's id (p_for 'node')
    p_for     text       -- 'all', 'node' or 'scheduler'
) RETURNS TABLE (shard smallint, "position" bigint, event_id uuid, recorded_at timestamptz,
                 job_id text, entity_kind text, entity_id text, event_type text,
                 node_id text, payload text, data bytea, horizon bigint,
                 shard_count smallint)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    v_count  smallint;
    v_shards smallint[];
    v_heads  bigint[];
BEGIN
    SELECT c.shard_count, array_agg(h.shard ORDER BY h.shard),
           array_agg(h.last_position ORDER BY h.shard)
      INTO v_count, v_shards, v_heads
      FROM event_log_shards h, event_log_head c
     WHERE c.id = 1
     GROUP BY c.shard_count;
    RETURN QUERY
        SELECT s.shard, NULL::bigint, NULL::uuid, NULL::timestamptz, NULL::text, NULL::text,
               NULL::text, NULL::text, NULL::text, NULL::text, NULL::bytea, s.head, v_count
          FROM unnest(v_shards, v_heads) AS s(shard, head);
    IF p_for = 'all' THEN
        RETURN QUERY
            SELECT s.shard, e.* FROM unnest(v_shards, v_heads) AS s(shard, head)
            CROSS JOIN LATERAL (
                SELECT ev.position, ev.event_id, ev.recorded_at, ev.job_id,
                       ev.entity_kind::text, ev.entity_id, ev.event_type, ev.node_id,
                       ev.payload::text, ev.data, NULL::bigint, NULL::smallint
                  FROM events ev
                 WHERE ev.shard = s.shard
                   AND ev.position > coalesce(p_after[s.shard + 1], p_start)
                   AND ev.position <= s.head
                 ORDER BY ev.position
                 LIMIT p_limit) e;
    ELSIF p_for = 'node' THEN  -- through the partial indexes of migration 0017
        RETURN QUERY
            SELECT s.shard, e.* FROM unnest(v_shards, v_heads) AS s(shard, head)
            CROSS JOIN LATERAL (
                SELECT ev.position, ev.event_id, ev.recorded_at, ev.job_id,
                       ev.entity_kind::text, ev.entity_id, ev.event_type, ev.node_id,
                       ev.payload::text, ev.data, NULL::bigint, NULL::smallint
                  FROM events ev
                 WHERE ev.shard = s.shard
                   AND ev.position > coalesce(p_after[s.shard + 1], p_start)
                   AND ev.position <= s.head
                   AND ((ev.payload ? 'to_node' AND ev.payload ->> 'to_node' IN (p_reader, '*'))
                        OR (ev.payload ? 'owner_node' AND ev.payload ->> 'owner_node' = p_reader))
                 ORDER BY ev.position
                 LIMIT p_limit) e;
    ELSIF p_for = 'scheduler' THEN  -- events_scheduler_idx
        RETURN QUERY
            SELECT s.shard, e.* FROM unnest(v_shards, v_heads) AS s(shard, head)
            CROSS JOIN LATERAL (
                SELECT ev.position, ev.event_id, ev.recorded_at, ev.job_id,
                       ev.entity_kind::text, ev.entity_id, ev.event_type, ev.node_id,
                       ev.payload::text, ev.data, NULL::bigint, NULL::smallint
                  FROM events ev
                 WHERE ev.shard = s.shard
                   AND ev.position > coalesce(p_after[s.shard + 1], p_start)
                   AND ev.position <= s.head
                   AND (ev.entity_kind IN ('node', 'placement_group')
                        OR (ev.entity_kind = 'task' AND ev.event_type IN ('spilled', 'placed'))
                        OR ev.payload ? 'owner_node')
                 ORDER BY ev.position
                 LIMIT p_limit) e;
    ELSE
        RAISE EXCEPTION 'cairn_read_events_v1: no reader %', p_for
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
END;
$$;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION cairn_read_events_v1(bigint[], integer, bigint, text, text) '
        'SET search_path = %I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
END
$$;
