-- An append's duplicate check reads only the partitions that may hold a copy of its
-- events (issue 20: it read every attached partition's event_id index, so a one-event
-- append slowed as the log grew: one writer's 1,771 appends/s with 5 partitions, 442
-- with 302, bench/append_partitions.py).
--
-- Why a partition can be skipped. An event id made by new_event_id is a UUIDv7: the
-- writer's clock at the event's making, in milliseconds. An append refuses an id made
-- more than event_log_head.max_clock_skew ahead of the server's clock, so every stored
-- copy of an id made at t was recorded at t - max_clock_skew or later. The partition
-- upkeep seals partitions (cairn_seal_partitions_v1): under every shard head's lock
-- (shared: no append in flight), a partition whose positions are all handed out is
-- stamped with the time, after every event in it was recorded. So no copy of an id made
-- at t lies in a partition sealed before t - max_clock_skew (before t - 2 x
-- max_clock_skew, if the server that sealed it was another whose clock differs from this
-- one's by up to max_clock_skew: a promoted replica); sealing follows position
-- order, and those partitions are the ones below some bound (cairn_copies_from_v1),
-- which the check passes as `position >= bound` (pruned at the executor's start). The
-- newest seal is kept with the head (sealed_until, sealed_at), which every append reads:
-- the partition table is read only for an id made before it. Ids of other versions are
-- checked in every partition, as before (the scheduler's decisions are UUIDv7s of their
-- cause's recording: controlplane/scheduler.py, decision_event_id).
--
-- Plans: 0027 tried a bound once and took it out (a generic plan made while the hot
-- partition was new scanned its primary key over the bound). Since 0029 the one-event
-- check compares one id (`=`, not `= ANY`), and the bound is a whole partition's lower
-- end: tests/test_schema_and_partitions.py holds both checks to the event_id index.

ALTER TABLE event_partitions ADD COLUMN sealed_at timestamptz;
CREATE INDEX event_partitions_sealed_idx ON event_partitions (sealed_at, upper_bound)
    WHERE sealed_at IS NOT NULL;
-- (read with the head by every append: the newest seal, and the skew allowed)
ALTER TABLE event_log_head
    ADD COLUMN max_clock_skew interval NOT NULL DEFAULT '1 minute'
        CHECK (max_clock_skew >= interval '0'),
    ADD COLUMN sealed_until bigint NOT NULL DEFAULT 0,
    ADD COLUMN sealed_at timestamptz;

-- The writer's clock when a UUIDv7 was made (Unix milliseconds; NULL for other versions).
CREATE FUNCTION cairn_uuid7_ms_v1(p_id uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN get_byte(uuid_send(p_id), 6) >> 4 = 7
                THEN ('x' || encode(substring(uuid_send(p_id) FROM 1 FOR 6), 'hex'))
                         ::bit(48)::bigint END
$$;

-- Stamps the partitions whose positions are all handed out and settled with the time: no
-- event is recorded in them after it. Run by the partition upkeep (PartitionManager).
-- A shard whose lock an append holds for long (one inside a transaction whose client is
-- gone) is not waited for: the shares already taken would hold back the appends to the
-- shards before it. The next round tries again (0 sealed).
CREATE FUNCTION cairn_seal_partitions_v1() RETURNS integer
LANGUAGE plpgsql SET lock_timeout = '200ms' AS $$
DECLARE
    v_settled bigint;
    v_sealed  integer;
    v_now     timestamptz;
BEGIN
    BEGIN
        PERFORM 1 FROM event_log_shards ORDER BY shard FOR SHARE;
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;
    END;
    SELECT max(last_position) INTO v_settled FROM event_log_shards;
    v_now := clock_timestamp();
    UPDATE event_partitions SET sealed_at = v_now
     WHERE sealed_at IS NULL AND upper_bound <= v_settled + 1;
    GET DIAGNOSTICS v_sealed = ROW_COUNT;
    IF v_sealed > 0 THEN
        UPDATE event_log_head SET sealed_at = v_now,
               sealed_until = (SELECT max(upper_bound) FROM event_partitions
                                WHERE sealed_at IS NOT NULL)
         WHERE id = 1;
    END IF;
    RETURN v_sealed;
END;
$$;

-- The lowest position a stored copy of an id made from p_oldest to p_newest (Unix ms;
-- p_oldest NULL: some id is not a UUIDv7) can have: the upper end of the newest
-- partition sealed before p_oldest less twice the skew (once for the writer's clock,
-- once for the server's: a promoted replica's clock may differ from the primary's that
-- sealed; the migration's header says why), 0 if none or an id is not a UUIDv7.
-- p_sealed_until, p_sealed_at: the newest seal, as the append read it with the head.
-- Refuses ids made more than p_skew ahead of this server's clock, naming the clocks.
CREATE FUNCTION cairn_copies_from_v1(p_oldest bigint, p_newest bigint, p_skew interval,
                                     p_sealed_until bigint, p_sealed_at timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_from     bigint;
    v_before   timestamptz;
BEGIN
    IF p_newest > extract(epoch FROM clock_timestamp() + p_skew) * 1000 THEN
        RAISE EXCEPTION 'an event id was made at % by its writer''s clock, more than % ahead '
                        'of the GCS''s clock (%): the machines'' clocks differ; set the '
                        'writer''s clock right (or raise event_log_head.max_clock_skew)',
              to_timestamp(p_newest / 1000.0), p_skew, clock_timestamp()
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_oldest IS NULL OR p_sealed_at IS NULL THEN
        RETURN 0;
    END IF;
    v_before := to_timestamp(p_oldest / 1000.0) - 2 * p_skew;
    IF p_sealed_at < v_before THEN
        RETURN p_sealed_until;  -- (the common case: every seal is older than the ids)
    END IF;
    SELECT p.upper_bound INTO v_from FROM event_partitions p
     WHERE p.sealed_at IS NOT NULL AND p.sealed_at < v_before
     ORDER BY p.sealed_at DESC, p.upper_bound DESC LIMIT 1;
    RETURN coalesce(v_from, 0);
END;
$$;

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
    v_skew     interval;
    v_lo       bigint;
    v_sealed_until bigint;
    v_sealed_at    timestamptz;
    v_oldest   bigint;
    v_newest   bigint;
    v_id       uuid;
    v_latest   bigint;
    v_past_seal bigint;
BEGIN
    IF v_size = 1 THEN
        -- one event: the steps below, as scalars
        -- (with the head, in its one statement: the id's time, the latest time an id may
        -- be made at now, and the time past which ids skip the newest seal; in ms)
        SELECT shard_count, partitioned_until, max_clock_skew, sealed_until, sealed_at,
               cairn_uuid7_ms_v1(p_event_ids[1]),
               floor(date_part('epoch', clock_timestamp() + max_clock_skew) * 1000),
               ceil(date_part('epoch', sealed_at + 2 * max_clock_skew) * 1000)
          INTO v_count, v_until, v_skew, v_sealed_until, v_sealed_at, v_oldest, v_latest,
               v_past_seal
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
        -- what cairn_copies_from_v1 says, inline where it is read off the head: an id made
        -- after the newest seal skips every sealed partition; one made before any seal,
        -- or not a UUIDv7, none
        IF v_oldest > v_latest OR v_oldest <= v_past_seal THEN  -- (made ahead: refused)
            v_lo := cairn_copies_from_v1(v_oldest, v_oldest, v_skew, v_sealed_until,
                                         v_sealed_at);
        ELSIF v_oldest > v_past_seal THEN
            v_lo := v_sealed_until;
        ELSE
            v_lo := 0;
        END IF;
        SELECT e.position INTO v_at FROM events e
         WHERE e.event_id = p_event_ids[1] AND e.position >= v_lo;
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
    SELECT shard_count, partitioned_until, max_clock_skew, sealed_until, sealed_at
      INTO v_count, v_until, v_skew, v_sealed_until, v_sealed_at
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

    -- (through events_event_id_idx of each partition that may hold a copy: enable_seqscan
    -- is off)
    -- the ids' times: UUIDv7s sort by them (the newest's is the future check's)
    SELECT i INTO v_id FROM unnest(p_event_ids) i
     WHERE get_byte(uuid_send(i), 6) >> 4 = 7 ORDER BY i DESC LIMIT 1;
    v_newest := cairn_uuid7_ms_v1(v_id);
    v_oldest := NULL;
    IF NOT EXISTS (SELECT 1 FROM unnest(p_event_ids) i WHERE get_byte(uuid_send(i), 6) >> 4 <> 7)
    THEN
        SELECT i INTO v_id FROM unnest(p_event_ids) i ORDER BY i LIMIT 1;
        v_oldest := cairn_uuid7_ms_v1(v_id);
    END IF;
    v_lo := cairn_copies_from_v1(v_oldest, v_newest, v_skew, v_sealed_until, v_sealed_at);
    SELECT coalesce(array_agg(e.event_id), '{}'), coalesce(array_agg(e.position), '{}')
      INTO v_dup_ids, v_dup_pos
      FROM events e WHERE e.event_id = ANY (p_event_ids) AND e.position >= v_lo;

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
    -- (the appends call the bound as the log's owner; the upkeep seals as the owner, or
    -- as the runtime, as it makes partitions ahead: a stamp taken under the heads' locks)
    REVOKE EXECUTE ON FUNCTION cairn_copies_from_v1(bigint, bigint, interval, bigint,
                                                    timestamptz) FROM PUBLIC;
    EXECUTE format('ALTER FUNCTION cairn_seal_partitions_v1() SECURITY DEFINER '
                   'SET search_path = %s', v_path);
    REVOKE EXECUTE ON FUNCTION cairn_seal_partitions_v1() FROM PUBLIC;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_seal_partitions_v1() TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on cairn_seal_partitions_v1: %', SQLERRM;
END
$$;

