-- The duplicate check of an append reads only the partitions that may hold its events
-- (issue 20: it read every attached partition's event_id index, so an append cost more
-- the more partitions the log kept; with shards, positions run S times faster and
-- partitions fill S times sooner).
--
-- An append stores no event whose id an attached partition holds (migration 0001). The
-- ids new_event_id() makes are UUIDv7s, which carry the time they were made, and an event
-- is recorded after its id was made. So once a partition can take no more events (every
-- position up to its end handed out and no append in flight below: settled), the time
-- of its newest event bounds what it holds: PartitionManager.maintain seals it, recording
-- that time (cairn_seal_partitions_v1), and an append whose ids were all made later
-- (by more than the skew allowed between a writer's clock and this server's, one
-- minute) skips it. The time is taken from the ids themselves, not from the writer: a
-- retry, another process sending the same event, or a batch that waited out an outage
-- all carry their first making time. Measured on a 2-vCPU VM with 22 partitions: the
-- check cost a one-event append 77 us of 244, 4.7 us of 17 per event at batch 1000.

ALTER TABLE event_partitions ADD COLUMN newest_recorded_at timestamptz;

-- Seals the attached partitions that end at or below p_settled, which must be what
-- cairn_settled_position_v1 returned (in a transaction of its own, so that its locks
-- are not held through the scans here): the newest recorded_at of each ('-infinity' for
-- one that holds nothing). Returns how many it sealed.
CREATE FUNCTION cairn_seal_partitions_v1(p_settled bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_name    text;
    v_newest  timestamptz;
    v_sealed  integer := 0;
BEGIN
    IF p_settled > (SELECT max(last_position) FROM event_log_shards) THEN
        RAISE EXCEPTION 'cairn_seal_partitions_v1: % is past every position handed out',
              p_settled USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_name IN
        SELECT table_name FROM event_partitions
         WHERE state = 'attached' AND newest_recorded_at IS NULL
           AND upper_bound <= p_settled + 1
         ORDER BY lower_bound
    LOOP
        EXECUTE format('SELECT coalesce(max(recorded_at), ''-infinity'') FROM %I', v_name)
           INTO v_newest;
        UPDATE event_partitions SET newest_recorded_at = v_newest WHERE table_name = v_name;
        v_sealed := v_sealed + 1;
    END LOOP;
    RETURN v_sealed;
END;
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION cairn_seal_partitions_v1(bigint) SECURITY DEFINER '
                   'SET search_path = %I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
    REVOKE EXECUTE ON FUNCTION cairn_seal_partitions_v1(bigint) FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_seal_partitions_v1(bigint) TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on cairn_seal_partitions_v1: %', SQLERRM;
END
$$;

-- cairn_append_v2 (0019), its duplicate check from the first partition that may hold
-- one of the batch's events.
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
    v_from     bigint := 0;
BEGIN
    IF v_size <> (SELECT count(DISTINCT i) FROM unnest(p_event_ids) i) THEN
        RAISE EXCEPTION 'cairn_append_v2: an event_id is repeated within one batch'
              USING ERRCODE = 'unique_violation';
    END IF;
    IF v_size = 0 THEN  -- (nothing to store, nothing to lock)
        positions := '{}';
        RETURN;
    END IF;
    -- The partitions that may hold one of these events already. An id made by
    -- new_event_id() is a UUIDv7, which carries when it was made; a sealed partition
    -- (cairn_seal_partitions_v1) whose newest event was recorded before that, less the
    -- clocks' allowed skew, cannot hold it. Other ids (the scheduler's, derived from what
    -- they place) and ids made more than that skew ahead of this server's clock: every
    -- partition. (uuid_extract_*: PostgreSQL 17; before, every partition.)
    IF current_setting('server_version_num')::integer >= 170000 THEN
        SELECT coalesce(min(p.lower_bound) FILTER (
                            WHERE p.newest_recorded_at IS NULL
                               OR p.newest_recorded_at >= m.made - interval '1 minute'),
                        max(p.upper_bound), 0)
          INTO v_from
          FROM (SELECT min(uuid_extract_timestamp(i)) AS made,
                       max(uuid_extract_timestamp(i)) AS last,
                       bool_and(uuid_extract_version(i) = 7) AS v7
                  FROM unnest(p_event_ids) i) m
          LEFT JOIN event_partitions p
            ON p.state = 'attached' AND m.v7
           AND m.last <= clock_timestamp() + interval '1 minute';
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

    -- (through events_event_id_idx on each partition from v_from on, the others pruned
    -- when the plan starts: see enable_seqscan and plan_cache_mode below)
    SELECT coalesce(array_agg(e.event_id), '{}'), coalesce(array_agg(e.position), '{}')
      INTO v_dup_ids, v_dup_pos
      FROM events e WHERE e.event_id = ANY (p_event_ids) AND e.position >= v_from;

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
    -- (no NOTIFY here: a transaction that notifies holds a lock of the whole database
    -- from before its commit until after it, so every append's commit, fsync included,
    -- would wait for the last one's whatever its shard; the readers are told after the
    -- commit instead: queries.sql, notify_appended)
END;
$$;

-- (CREATE OR REPLACE resets what 0019 and 0025 set: set again)
DO $$
DECLARE
    v_function text := 'cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], '
                       'text[], jsonb[], bytea[])';
BEGIN
    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %s', v_function,
        format('%I, pg_temp',
            (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = 'events'::regclass)));
    EXECUTE format('ALTER FUNCTION %s SET enable_seqscan = off', v_function);
    EXECUTE format('ALTER FUNCTION %s SET plan_cache_mode = force_generic_plan', v_function);
END
$$;
