-- An append's duplicate check reads only the partitions that may hold a copy of its
-- events (issue 20): it read every attached partition's event_id index, so a one-event
-- append slowed as the log grew (one writer's ~1,700 appends/s with 5 partitions, ~440
-- with 302; bench/README.md, "The duplicate check as the log grows").
--
-- Which partitions may hold a copy. An event id made by new_event_id is a UUIDv7: its
-- writer's clock at the making, in milliseconds. An append refuses an id made more than
-- event_log_head.max_clock_skew ahead of the server's clock, so a copy of an id made at t
-- was recorded at t - max_clock_skew or later. The partition upkeep seals partitions
-- (cairn_seal_partitions_v1): under every shard head's lock (no append in flight) a
-- partition whose positions are all handed out is stamped with the time, after every
-- event in it was recorded. So no copy of an id made at t lies in a partition sealed
-- before t - 2 x max_clock_skew (twice: the server that sealed may be another, a promoted
-- replica, whose clock differs by up to the skew). Sealing follows position order.
--
-- Where the check reads. Not `events` with a bound on position: a bound is a parameter of
-- the function's generic plan, and 0027 and a first version of this migration both saw
-- such a plan read a partition through its primary key (every row past the bound, on
-- each append). The check reads a view, recent_event_ids: a UNION ALL of the attached
-- partitions from recent_from on, named one by one, each read through its event_id index
-- and nothing else. The upkeep moves recent_from past the partitions sealed more than
-- three skews ago (new ids are made after their seal plus twice the skew, less one skew
-- of the writer's clock) and redefines the view, under every shard head's lock; the
-- shard rows carry what an append needs to know whether the view holds every possible
-- copy of its ids: recent_until (the view's last partition's upper end: every stored
-- event at or past it is outside the view) and recent_ids_after (ids made after it, in
-- Unix ms, have no copy below recent_from; -1: the view holds every attached partition).
-- An append reads them with its shard's lock (a batch compares its ids with the value it
-- read before, in the pass that finds repeats, and uses the view only if the value is no
-- later now), and reads the view after it: a view
-- redefined, and rows updated, by a transaction that committed before the lock are both
-- what it sees; none can commit while it holds the lock. Anything else (ids made before
-- the floor's seal, ids not UUIDv7s, a head past the view after an append made partitions
-- itself) is checked in every partition, as before.

ALTER TABLE event_partitions ADD COLUMN sealed_at timestamptz;
ALTER TABLE event_log_head
    ADD COLUMN max_clock_skew interval NOT NULL DEFAULT '1 minute'
        CHECK (max_clock_skew >= interval '0'),
    ADD COLUMN recent_from bigint NOT NULL DEFAULT 0,     -- the view's floor (a position)
    ADD COLUMN recent_sealed_at timestamptz,              -- when what lies below was sealed
    ADD COLUMN recent_partitions text[] NOT NULL DEFAULT '{}';  -- the view's, in order
ALTER TABLE event_log_shards
    ADD COLUMN recent_until bigint NOT NULL DEFAULT 0,
    ADD COLUMN recent_ids_after bigint NOT NULL DEFAULT -1;

CREATE VIEW recent_event_ids AS
    SELECT NULL::bigint AS "position", NULL::uuid AS event_id WHERE false;

-- The writer's clock when a UUIDv7 was made (Unix milliseconds; NULL for other versions).
CREATE FUNCTION cairn_uuid7_ms_v1(p_id uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN get_byte(uuid_send(p_id), 6) >> 4 = 7
                THEN ('x' || encode(substring(uuid_send(p_id) FROM 1 FOR 6), 'hex'))
                         ::bit(48)::bigint END
$$;

-- Refuses an id made ahead of this server's clock by more than the skew allowed: the
-- check's choice of partitions holds only for ids that are not.
CREATE FUNCTION cairn_refuse_made_ahead_v1(p_made_ms bigint, p_skew interval)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'an event id was made at % by its writer''s clock, more than % ahead '
                    'of the GCS''s clock (%): the machines'' clocks differ; set the '
                    'writer''s clock right (or raise event_log_head.max_clock_skew)',
          to_timestamp(p_made_ms / 1000.0), p_skew, clock_timestamp()
          USING ERRCODE = 'invalid_parameter_value';
END;
$$;

-- Makes recent_event_ids the attached partitions from event_log_head.recent_from on, and
-- tells the shard rows (see the header). Takes every shard head's lock first (under the
-- caller's lock_timeout), so no append is between reading its row and reading the view,
-- and no other call redefines it meanwhile. Returns whether the view changed.
CREATE FUNCTION cairn_define_recent_event_ids_v1() RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_from      bigint;
    v_sealed_at timestamptz;
    v_skew      interval;
    v_had       text[];
    v_names     text[];
    v_until     bigint;
    v_after     bigint;
BEGIN
    PERFORM 1 FROM event_log_shards ORDER BY shard FOR NO KEY UPDATE;
    SELECT recent_from, recent_sealed_at, max_clock_skew, recent_partitions
      INTO v_from, v_sealed_at, v_skew, v_had
      FROM event_log_head WHERE id = 1;
    SELECT coalesce(array_agg(table_name ORDER BY lower_bound), '{}'), max(upper_bound)
      INTO v_names, v_until
      FROM event_partitions WHERE state = 'attached' AND lower_bound >= v_from;
    IF v_names IS DISTINCT FROM v_had THEN
        IF cardinality(v_names) = 0 THEN
            CREATE OR REPLACE VIEW recent_event_ids AS
                SELECT NULL::bigint AS "position", NULL::uuid AS event_id WHERE false;
        ELSE
            EXECUTE 'CREATE OR REPLACE VIEW recent_event_ids AS '
                || (SELECT string_agg(format('SELECT "position", event_id FROM %I', n),
                                      ' UNION ALL ' ORDER BY o)
                      FROM unnest(v_names) WITH ORDINALITY AS u(n, o));
        END IF;
        UPDATE event_log_head SET recent_partitions = v_names WHERE id = 1;
    END IF;
    v_until := coalesce(v_until, 0);
    v_after := CASE WHEN v_sealed_at IS NULL THEN -1
                    ELSE ceil(date_part('epoch', v_sealed_at + 2 * v_skew) * 1000) END;
    UPDATE event_log_shards SET recent_until = v_until, recent_ids_after = v_after
     WHERE recent_until <> v_until OR recent_ids_after <> v_after;
    RETURN v_names IS DISTINCT FROM v_had;
END;
$$;

-- Stamps the partitions whose positions are all handed out and settled with the time (no
-- event is recorded in them after it), moves recent_from past those sealed more than
-- three skews ago, and redefines recent_event_ids. Run by the partition upkeep
-- (PartitionManager). A shard whose lock an append holds for long (one inside a
-- transaction whose client is gone) is not waited for: the locks already taken would hold
-- back the appends to the shards before it. The next round tries again (0 sealed).
CREATE FUNCTION cairn_seal_partitions_v1() RETURNS integer
LANGUAGE plpgsql SET lock_timeout = '200ms' AS $$
DECLARE
    v_settled bigint;
    v_sealed  integer;
    v_now     timestamptz;
BEGIN
    PERFORM 1 FROM event_log_shards ORDER BY shard FOR NO KEY UPDATE;
    SELECT max(last_position) INTO v_settled FROM event_log_shards;
    v_now := clock_timestamp();
    UPDATE event_partitions SET sealed_at = v_now
     WHERE sealed_at IS NULL AND upper_bound <= v_settled + 1;
    GET DIAGNOSTICS v_sealed = ROW_COUNT;
    UPDATE event_log_head h SET recent_from = p.upper_bound, recent_sealed_at = p.sealed_at
      FROM (SELECT upper_bound, sealed_at FROM event_partitions
             WHERE sealed_at < v_now - 3 * (SELECT max_clock_skew FROM event_log_head
                                            WHERE id = 1)
             ORDER BY upper_bound DESC LIMIT 1) p
     WHERE h.id = 1 AND p.upper_bound > h.recent_from;
    PERFORM cairn_define_recent_event_ids_v1();
    RETURN v_sealed;
EXCEPTION WHEN lock_not_available THEN
    RETURN 0;
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
    v_made     bigint;   -- the id's making, Unix ms; NULL: not a UUIDv7
    v_latest   bigint;   -- the latest making accepted now, Unix ms
    v_hint     bigint;   -- the shards' recent_ids_after, read before their locks
    v_after_hint boolean;  -- every id a UUIDv7 made after v_hint
    v_ahead    boolean;
    v_id       uuid;
    v_recent_until bigint;
    v_ids_after    bigint;
BEGIN
    IF v_size = 1 THEN
        -- one event: the steps below, as scalars
        SELECT shard_count, partitioned_until, max_clock_skew,
               cairn_uuid7_ms_v1(p_event_ids[1]),
               floor(date_part('epoch', clock_timestamp() + max_clock_skew) * 1000)
          INTO v_count, v_until, v_skew, v_made, v_latest
          FROM event_log_head WHERE id = 1;
        IF v_made > v_latest THEN
            PERFORM cairn_refuse_made_ahead_v1(v_made, v_skew);
        END IF;
        v_shard := cairn_shard_of_v1(p_job_ids[1], v_count);
        SELECT last_position, recent_until, recent_ids_after
          INTO v_floor, v_recent_until, v_ids_after
          FROM event_log_shards WHERE shard = v_shard FOR UPDATE;
        IF v_count > 1 THEN
            SELECT max(last_position) INTO v_floor FROM event_log_shards;
        END IF;
        IF v_floor + 2 * v_count >= v_until THEN
            PERFORM cairn_ensure_partitions_v1(v_floor + 2 * v_count);
        END IF;
        -- (through each partition's event_id index: enable_seqscan is off)
        IF v_floor < v_recent_until AND (v_ids_after < 0 OR v_made > v_ids_after) THEN
            SELECT r.position INTO v_at FROM recent_event_ids r
             WHERE r.event_id = p_event_ids[1];
        ELSE
            SELECT e.position INTO v_at FROM events e WHERE e.event_id = p_event_ids[1];
        END IF;
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
    -- (partitioned_until only grows: read before the locks, it is at most too low; so
    -- may the shards' recent_ids_after be: read again with the locks)
    SELECT shard_count, partitioned_until, max_clock_skew,
           floor(date_part('epoch', clock_timestamp() + max_clock_skew) * 1000),
           (SELECT max(recent_ids_after) FROM event_log_shards)
      INTO v_count, v_until, v_skew, v_latest, v_hint
      FROM event_log_head WHERE id = 1;
    -- in one pass over the ids: repeats; whether each is a UUIDv7 made after v_hint, and
    -- whether one was made after v_latest (UUIDv7s sort by their making: such an id is
    -- at or past the smallest id of the next millisecond)
    SELECT count(DISTINCT i),
           bool_and(i >= (lpad(to_hex(greatest(v_hint + 1, 0)), 12, '0')
                          || repeat('0', 20))::uuid
                    AND get_byte(uuid_send(i), 6) >> 4 = 7),
           bool_or(i >= (lpad(to_hex(v_latest + 1), 12, '0') || repeat('0', 20))::uuid
                   AND get_byte(uuid_send(i), 6) >> 4 = 7)
      INTO v_i, v_after_hint, v_ahead
      FROM unnest(p_event_ids) i;
    IF v_size <> v_i THEN
        RAISE EXCEPTION 'cairn_append_v2: an event_id is repeated within one batch'
              USING ERRCODE = 'unique_violation';
    END IF;
    IF v_size = 0 THEN  -- (nothing to store, nothing to lock)
        positions := '{}';
        RETURN;
    END IF;
    IF v_ahead THEN
        SELECT i INTO v_id FROM unnest(p_event_ids) i
         WHERE get_byte(uuid_send(i), 6) >> 4 = 7 ORDER BY i DESC LIMIT 1;
        PERFORM cairn_refuse_made_ahead_v1(cairn_uuid7_ms_v1(v_id), v_skew);
    END IF;
    IF v_count = 1 THEN
        -- one shard: its head is past every other row's (cairn_set_log_shards_v1), as the
        -- single log's was, and the statements are the single log's
        SELECT last_position, recent_until, recent_ids_after
          INTO v_floor, v_recent_until, v_ids_after
          FROM event_log_shards WHERE shard = 0 FOR UPDATE;
        v_used := ARRAY[0::smallint];
    ELSE
        SELECT array_agg(cairn_shard_of_v1(j, v_count) ORDER BY o) INTO v_shards
          FROM unnest(p_job_ids) WITH ORDINALITY AS u(j, o);
        SELECT array_agg(DISTINCT s ORDER BY s) INTO v_used FROM unnest(v_shards) s;
        PERFORM 1 FROM event_log_shards WHERE shard = ANY (v_used) ORDER BY shard FOR UPDATE;
        -- past every head (this statement's snapshot: after the locks, so every append
        -- that committed before ours is in it, and what the last upkeep told the rows)
        SELECT max(last_position), min(recent_until), max(recent_ids_after)
          INTO v_floor, v_recent_until, v_ids_after FROM event_log_shards;
    END IF;
    IF v_floor + (v_size + 1) * v_count >= v_until THEN
        PERFORM cairn_ensure_partitions_v1(v_floor + (v_size + 1) * v_count);
    END IF;

    -- (through each partition's event_id index: enable_seqscan is off)
    IF v_floor < v_recent_until
       AND (v_ids_after < 0 OR (v_after_hint AND v_ids_after <= v_hint)) THEN
        SELECT coalesce(array_agg(r.event_id), '{}'), coalesce(array_agg(r.position), '{}')
          INTO v_dup_ids, v_dup_pos
          FROM recent_event_ids r WHERE r.event_id = ANY (p_event_ids);
    ELSE
        SELECT coalesce(array_agg(e.event_id), '{}'), coalesce(array_agg(e.position), '{}')
          INTO v_dup_ids, v_dup_pos
          FROM events e WHERE e.event_id = ANY (p_event_ids);
    END IF;

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
    v_function text;
BEGIN
    -- (CREATE OR REPLACE reset what 0019 and 0025 set)
    EXECUTE format('ALTER FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], '
                   'text[], text[], jsonb[], bytea[]) SECURITY DEFINER SET search_path = %s',
                   v_path);
    ALTER FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[],
                                   jsonb[], bytea[]) SET enable_seqscan = off;
    ALTER FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[],
                                   jsonb[], bytea[]) SET plan_cache_mode = force_generic_plan;
    -- (the view is redefined as its owner: by the upkeep, which may run as the runtime
    -- while it makes partitions ahead, and by `cairn gc` before it drops a partition)
    FOREACH v_function IN ARRAY ARRAY['cairn_define_recent_event_ids_v1()',
                                      'cairn_seal_partitions_v1()'] LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %s',
                       v_function, v_path);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_function);
    END LOOP;
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

-- log_union (0023) makes every view of the log's schema again; not this one, which is no
-- view of the log but of some of its partitions, named: a copy made once would keep
-- them from being dropped (`cairn gc`) and stop saying what the view holds.
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
      FROM pg_class c WHERE c.relnamespace = v_home::regnamespace AND c.relkind = 'v'
       AND c.relname <> 'recent_event_ids';  -- (not the log's: 0030)
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

-- (every attached partition to start with: recent_from is 0)
SELECT cairn_define_recent_event_ids_v1();
