-- cairn_append_v2 as migration 0029 made it: its duplicate check reads every partition
CREATE OR REPLACE FUNCTION cairn_append_v2(
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
    v_size     integer := cardinality(p_event_ids);
    v_count    integer;
    v_until    bigint;
    v_shards   smallint[];
    v_used     smallint[];
    v_floor    bigint;
    v_dup_ids  uuid[];
    v_dup_pos  bigint[];
    v_at       bigint;
    v_i        integer;
    v_shard    smallint;
BEGIN
    IF v_size = 1 THEN
        -- one event: the steps below, as scalars
        SELECT shard_count, partitioned_until INTO v_count, v_until
          FROM event_log_head WHERE id = 1;
        v_shard := cairn_shard_of_v1(p_job_ids[1], v_count);
        SELECT last_position INTO v_floor FROM event_log_shards WHERE shard = v_shard
           FOR UPDATE;
        IF v_count > 1 THEN
            SELECT max(last_position) INTO v_floor FROM event_log_shards;
        END IF;
        IF v_floor + 2 * v_count >= v_until THEN
            PERFORM cairn_ensure_partitions_v1(v_floor + 2 * v_count);
        END IF;
        SELECT e.position INTO v_at FROM events e WHERE e.event_id = p_event_ids[1];
        IF NOT FOUND THEN
            v_at := cairn_next_in_shard_v1(v_floor, v_shard, v_count);
            INSERT INTO events (position, shard, event_id, recorded_at, job_id, entity_kind,
                                entity_id, event_type, node_id, payload, data)
            VALUES (v_at, v_shard, p_event_ids[1], clock_timestamp(), p_job_ids[1],
                    p_kinds[1], p_entity_ids[1], p_types[1], p_node_ids[1], p_payloads[1],
                    p_data[1]);
            UPDATE event_log_shards SET last_position = v_at WHERE shard = v_shard;
        END IF;
        positions := ARRAY[v_at];
        RETURN;
    END IF;
    IF v_size <> (SELECT count(DISTINCT i) FROM unnest(p_event_ids) i) THEN
        RAISE EXCEPTION 'cairn_append_v2: an event_id is repeated within one batch'
              USING ERRCODE = 'unique_violation';
    END IF;
    IF v_size = 0 THEN  -- (nothing to store, nothing to lock)
        positions := '{}';
        RETURN;
    END IF;
    -- (partitioned_until only grows: read before the locks, it is at most too low)
    SELECT shard_count, partitioned_until INTO v_count, v_until
      FROM event_log_head WHERE id = 1;
    IF v_count = 1 THEN
        -- one shard: its head is past every other row's (cairn_set_log_shards_v1), as the
        -- single log's was, and the statements are the single log's
        SELECT last_position INTO v_floor FROM event_log_shards WHERE shard = 0 FOR UPDATE;
        v_used := ARRAY[0::smallint];
    ELSE
        SELECT array_agg(cairn_shard_of_v1(j, v_count) ORDER BY o) INTO v_shards
          FROM unnest(p_job_ids) WITH ORDINALITY AS u(j, o);
        SELECT array_agg(DISTINCT s ORDER BY s) INTO v_used FROM unnest(v_shards) s;
        PERFORM 1 FROM event_log_shards WHERE shard = ANY (v_used) ORDER BY shard FOR UPDATE;
        -- past every head (this statement's snapshot: after the locks, so every append
        -- that committed before ours is in it)
        SELECT max(last_position) INTO v_floor FROM event_log_shards;
    END IF;
    IF v_floor + (v_size + 1) * v_count >= v_until THEN
        PERFORM cairn_ensure_partitions_v1(v_floor + (v_size + 1) * v_count);
    END IF;

    -- (through events_event_id_idx on every partition: enable_seqscan is off)
    SELECT coalesce(array_agg(e.event_id), '{}'), coalesce(array_agg(e.position), '{}')
      INTO v_dup_ids, v_dup_pos
      FROM events e WHERE e.event_id = ANY (p_event_ids);

    IF v_count = 1 AND cardinality(v_dup_ids) = 0 THEN
        -- the most common case, as the single log did it: v_floor + 1, v_floor + 2, ...
        INSERT INTO events (position, event_id, recorded_at, job_id, entity_kind, entity_id,
                            event_type, node_id, payload, data)
        SELECT v_floor + u.ord, u.event_id, clock_timestamp(), u.job_id, u.kind,
               u.entity_id, u.event_type, u.node_id, u.payload, u.data
          FROM unnest(p_event_ids, p_job_ids, p_kinds, p_entity_ids, p_types, p_node_ids,
                      p_payloads, p_data)
               WITH ORDINALITY AS u(event_id, job_id, kind, entity_id, event_type, node_id,
                                    payload, data, ord);
        UPDATE event_log_shards SET last_position = v_floor + v_size WHERE shard = 0;
        SELECT array_agg(v_floor + o ORDER BY o) INTO positions
          FROM generate_series(1, v_size) o;
        RETURN;
    END IF;
    IF v_count = 1 THEN
        v_shards := array_fill(0::smallint, ARRAY[v_size]);
    END IF;

    IF cardinality(v_used) = 1 AND cardinality(v_dup_ids) = 0 THEN
        -- the common case: one shard, nothing stored before; one step of v_count apart
        v_at := cairn_next_in_shard_v1(v_floor, v_used[1], v_count);
        SELECT array_agg(v_at + (o - 1) * v_count ORDER BY o) INTO positions
          FROM generate_series(1, v_size) o;
    ELSE
        positions := array_fill(NULL::bigint, ARRAY[v_size]);
        v_at := v_floor;
        FOR v_i IN 1 .. v_size LOOP
            IF p_event_ids[v_i] = ANY (v_dup_ids) THEN
                positions[v_i] := v_dup_pos[array_position(v_dup_ids, p_event_ids[v_i])];
            ELSE
                v_at := cairn_next_in_shard_v1(v_at, v_shards[v_i], v_count);
                positions[v_i] := v_at;
            END IF;
        END LOOP;
    END IF;

    INSERT INTO events (position, shard, event_id, recorded_at, job_id, entity_kind,
                        entity_id, event_type, node_id, payload, data)
    SELECT u.position, u.shard, u.event_id, clock_timestamp(), u.job_id, u.kind,
           u.entity_id, u.event_type, u.node_id, u.payload, u.data
      FROM unnest(positions, v_shards, p_event_ids, p_job_ids, p_kinds, p_entity_ids,
                  p_types, p_node_ids, p_payloads, p_data)
           AS u(position, shard, event_id, job_id, kind, entity_id, event_type, node_id,
                payload, data)
     WHERE u.event_id <> ALL (v_dup_ids)
     ORDER BY u.position;
    IF FOUND THEN
        UPDATE event_log_shards h SET last_position = n.last
          FROM (SELECT u.shard, max(u.position) AS last
                  FROM unnest(positions, v_shards, p_event_ids) AS u(position, shard, event_id)
                 WHERE u.event_id <> ALL (v_dup_ids)
                 GROUP BY u.shard) n
         WHERE h.shard = n.shard;
    END IF;
    -- (no NOTIFY here: see cairn_append_commit_v1 and queries.sql, append_events_committed)
END;
$$;

DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
BEGIN
    -- (CREATE OR REPLACE reset what 0019 and 0025 set)
    EXECUTE format('ALTER FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], '
                   'text[], text[], jsonb[], bytea[]) SECURITY DEFINER SET search_path = %s',
                   v_path);
    ALTER FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[],
                                   jsonb[], bytea[]) SET enable_seqscan = off;
    ALTER FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[],
                                   jsonb[], bytea[]) SET plan_cache_mode = force_generic_plan;
END
$$;


-- log_union as 0023 made it
CREATE OR REPLACE FUNCTION cairn_make_log_union_v1() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_home    name := (SELECT n.nspname FROM pg_class c
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.oid = 'events'::regclass);
    v_others  text;
    v_names   name[];
    v_bodies  text[];
    v_done    name[] := '{}';
    v_grantee text;
    v_more    boolean := true;
    i         integer;
BEGIN
    PERFORM pg_advisory_xact_lock(7165064707736470273);  -- one maker at a time
    SELECT string_agg(format(' UNION ALL SELECT * FROM %I.events', n.nspname), ''
                      ORDER BY n.nspname)
      INTO v_others
      FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid
     WHERE n.nspname LIKE 'log\_server\_%' AND c.relname = 'events' AND c.relkind = 'f';
    -- the views as the log's schema reads them (names unqualified: they bind anew below)
    SELECT array_agg(c.relname ORDER BY c.oid), array_agg(pg_get_viewdef(c.oid) ORDER BY c.oid)
      INTO v_names, v_bodies
      FROM pg_class c WHERE c.relnamespace = v_home::regnamespace AND c.relkind = 'v';
    DROP SCHEMA IF EXISTS log_union CASCADE;
    CREATE SCHEMA log_union;
    EXECUTE format('CREATE VIEW log_union.events AS SELECT * FROM %I.events%s',
                   v_home, coalesce(v_others, ''));
    PERFORM set_config('search_path', format('log_union, %I, pg_temp', v_home), true);
    WHILE v_more LOOP  -- a view once the views it reads are made
        v_more := false;
        FOR i IN 1 .. coalesce(cardinality(v_names), 0) LOOP
            CONTINUE WHEN v_names[i] = ANY (v_done);
            CONTINUE WHEN EXISTS (
                SELECT 1 FROM pg_rewrite r
                  JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                  JOIN pg_class used ON used.oid = d.refobjid
                 WHERE r.ev_class = format('%I.%I', v_home, v_names[i])::regclass
                   AND used.relkind = 'v' AND used.oid <> r.ev_class
                   AND used.relnamespace = v_home::regnamespace
                   AND NOT used.relname = ANY (v_done));
            EXECUTE format('CREATE VIEW log_union.%I AS %s', v_names[i], v_bodies[i]);
            v_done := v_done || v_names[i];
            v_more := true;
        END LOOP;
    END LOOP;
    FOREACH v_grantee IN ARRAY ARRAY['cairn_runtime', 'cairn_audit'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_grantee);
        EXECUTE format('GRANT USAGE ON SCHEMA log_union TO %I', v_grantee);
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA log_union TO %I', v_grantee);
    END LOOP;
    RETURN cardinality(v_done);
END;
$$;

DROP FUNCTION cairn_seal_partitions_v1();
DROP FUNCTION cairn_define_recent_event_ids_v1();
DROP FUNCTION cairn_refuse_made_ahead_v1(bigint, interval);
DROP FUNCTION cairn_uuid7_ms_v1(uuid);
DROP VIEW recent_event_ids;
ALTER TABLE event_log_shards DROP COLUMN recent_until, DROP COLUMN recent_ids_after;
ALTER TABLE event_log_head DROP COLUMN max_clock_skew, DROP COLUMN recent_from,
    DROP COLUMN recent_sealed_at, DROP COLUMN recent_partitions;
ALTER TABLE event_partitions DROP COLUMN sealed_at;
