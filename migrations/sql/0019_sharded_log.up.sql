-- The sharded log (issue 20). One head row serialized every append; now the log has
-- `shard_count` shards (set when the GCS is made, cairn_set_log_shards_v1), each with a
-- head row of its own in event_log_shards. An event's shard is its job's
-- (cairn_shard_of_v1: events that name no job, such as membership, are shard 0), so
-- appends of different jobs lock different heads: they never wait for one another.
--
-- Positions stay unique across the log, and say more than before
-- (controlplane/README.md, "The sharded log"):
-- * shard s hands out positions p with p % shard_count = s: no two shards collide;
-- * within a shard, positions are commit-ordered, as the single log's were: an append
--   holds its shards' head rows until it commits;
-- * across shards, a cause comes before its effect: an append's first position is past
--   every head it can see (the highest last_position of all shards, read after its locks
--   are taken), so an event appended after another committed -- one that read it, or was
--   caused by what read it -- has a higher position. Position order is a causal order of
--   the whole log: the views, lineage() and replay order by it as before. Positions of a
--   shard may skip (to stay past the others), so a reader never expects p + 1.
--
-- A reader follows each shard from its own position: in one statement it reads each
-- head H_s and that shard's events up to H_s; every position of shard s up to H_s is
-- committed (the head lock), so nothing is left behind, and it moves to H_s.
-- A single-shard log is what it was: positions 1, 2, 3, ... from one head.

ALTER TABLE events ADD COLUMN shard smallint NOT NULL DEFAULT 0;

CREATE TABLE event_log_shards (
    shard          smallint PRIMARY KEY CHECK (shard >= 0),
    last_position  bigint NOT NULL
);
INSERT INTO event_log_shards (shard, last_position)
SELECT 0, last_position FROM event_log_head WHERE id = 1;
ALTER TABLE event_log_head DROP COLUMN last_position;
ALTER TABLE event_log_head ADD COLUMN shard_count smallint NOT NULL DEFAULT 1
    CHECK (shard_count BETWEEN 1 AND 1024);

-- A job's shard: the same on every server and PostgreSQL version (md5, not hashtext).
CREATE FUNCTION cairn_shard_of_v1(p_job_id text, p_count integer) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_job_id IS NULL OR p_count <= 1 THEN 0
                ELSE (('x' || left(md5(p_job_id), 8))::bit(32)::bigint % p_count)::smallint
           END
$$;

-- The next position of shard p_shard after p_after.
CREATE FUNCTION cairn_next_in_shard_v1(p_after bigint, p_shard integer, p_count integer)
RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_after + 1 + (((p_shard - (p_after + 1)) % p_count) + p_count) % p_count
$$;

-- Sets the number of shards: new shards start past every position handed out. Takes
-- every head's lock, so no append is in flight; events of a job appended before keep
-- their shard (and their positions, all below what any shard hands out next). With more
-- than one shard, readers find each shard's events by (shard, position).
CREATE FUNCTION cairn_set_log_shards_v1(p_count integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_head bigint;
BEGIN
    IF p_count < 1 OR p_count > 1024 THEN
        RAISE EXCEPTION 'the log''s shard count must be between 1 and 1024, not %', p_count
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM event_log_head WHERE id = 1 FOR UPDATE;
    PERFORM 1 FROM event_log_shards ORDER BY shard FOR UPDATE;
    SELECT max(last_position) INTO v_head FROM event_log_shards;
    -- every head at the highest: a shard appends past every head whatever it reads (a log
    -- of one shard reads only its own), and readers have nothing to read below them
    UPDATE event_log_shards SET last_position = v_head;
    INSERT INTO event_log_shards (shard, last_position)
    SELECT s, v_head FROM generate_series(0, p_count - 1) s
    ON CONFLICT (shard) DO NOTHING;
    UPDATE event_log_head SET shard_count = p_count WHERE id = 1;
    IF p_count > 1 AND to_regclass('events_shard_position_idx') IS NULL THEN
        CREATE INDEX events_shard_position_idx ON events (shard, position);
    END IF;
    RETURN p_count;
END;
$$;

-- The highest position handed out, once no append is in flight: nothing appended later
-- takes a position at or below it. For maintenance (full partitions, gc), not for
-- appends' hot path: it waits for the appends in flight and holds the next ones back
-- for as long as it runs (one statement).
CREATE FUNCTION cairn_settled_position_v1() RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM event_log_shards ORDER BY shard FOR SHARE;
    RETURN (SELECT max(last_position) FROM event_log_shards);
END;
$$;

DROP FUNCTION cairn_append_fenced_v1(text, uuid[], text[], entity_kind[], text[], text[],
                                     text[], jsonb[], bytea[]);
DROP FUNCTION cairn_append_v1(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[],
                              bytea[]);

-- Appends a batch: each event to its job's shard, under the lock of each shard it uses
-- (taken in shard order: two batches cannot deadlock). Events whose event_id is stored
-- already are not stored again and keep their position; a batch must not repeat an
-- event_id. Returns each event's position, in input order; the stored events' positions
-- rise in input order too.
CREATE FUNCTION cairn_append_v2(
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
BEGIN
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

    -- (through events_event_id_idx on every partition: see enable_seqscan below)
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
    -- (no NOTIFY here: a transaction that notifies holds a lock of the whole database
    -- from before its commit until after it, so every append's commit, fsync included,
    -- would wait for the last one's whatever its shard; the readers are told after the
    -- commit instead: queries.sql, notify_appended)
END;
$$;

-- The node fence's lock (0012 used the one head row, which every append took): a node's
-- appends hold it shared while they check the fence and until they commit; the monitor's
-- declaration of its death takes it exclusive (queries.sql, declare_stale_nodes_dead), in
-- the transaction that sets fenced_at and appends `dead`. So a batch either commits
-- before the `dead` event or waits and is refused. An advisory lock, not a row lock:
-- locking the liveness row wrote to it (and to the WAL) on every append.
CREATE FUNCTION cairn_fence_lock_v1(p_node text, p_shared boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_shared THEN
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('cairn-fence:' || p_node, 0));
    ELSE
        PERFORM pg_advisory_xact_lock(hashtextextended('cairn-fence:' || p_node, 0));
    END IF;
    RETURN true;
END;
$$;

-- cairn_append_fenced_v1 (0012), over the sharded log, under the fence's lock.
CREATE FUNCTION cairn_append_fenced_v2(
    p_writer      text,
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
    v_fenced timestamptz;
    v_reason jsonb;
BEGIN
    PERFORM cairn_fence_lock_v1(p_writer, true);
    SELECT l.fenced_at INTO v_fenced FROM node_liveness l WHERE l.node_id = p_writer;
    refused := v_fenced IS NOT NULL;
    IF NOT refused THEN
        positions := cairn_append_v2(p_event_ids, p_job_ids, p_kinds, p_entity_ids, p_types,
                                     p_node_ids, p_payloads, p_data);
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
    positions := cairn_append_v2(ARRAY[gen_random_uuid()], ARRAY[NULL::text],
                                 ARRAY['node'::entity_kind], ARRAY[p_writer],
                                 ARRAY['stale_refused'], ARRAY[NULL::text], ARRAY[v_reason],
                                 ARRAY[NULL::bytea]);
END;
$$;

-- cairn_ensure_partitions_v1 (0001) locked the one head row "as appends do"; appends now
-- lock their shards' rows and then, rarely, this one (head id 1, which holds the
-- partitioning): the order is always shards first, so still no deadlock.

CREATE OR REPLACE FUNCTION cairn_identity_v1(OUT system_id bigint, OUT cluster_id uuid,
                                             OUT epoch bigint, OUT epoch_id uuid,
                                             OUT timeline integer, OUT head_position bigint,
                                             OUT standby boolean)
LANGUAGE sql VOLATILE AS $$
    SELECT e.system_id, i.cluster_id, e.epoch, e.epoch_id, e.timeline,
           (SELECT max(last_position) FROM event_log_shards), pg_is_in_recovery()
      FROM cairn_epoch_v1() e, gcs_identity i
$$;

-- Followers' saved positions, one per shard (index shard + 1); `position` stays the
-- highest of them (what a person reads, and the lag).
ALTER TABLE subscriptions ADD COLUMN positions bigint[] NOT NULL DEFAULT '{}';
UPDATE subscriptions SET positions = ARRAY[position];
ALTER TABLE checkpoints ADD COLUMN positions bigint[] NOT NULL DEFAULT '{}';
UPDATE checkpoints SET positions = ARRAY[position];

-- As the other functions that write the log (0010, 0012): run as the owner with the
-- log's schema first; the runtime may append and read the settled position, not reshard.
DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
    v_function text;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[], bytea[])',
        'cairn_append_fenced_v2(text, uuid[], text[], entity_kind[], text[], text[], text[], '
            'jsonb[], bytea[])',
        'cairn_settled_position_v1()',
        'cairn_set_log_shards_v1(integer)'
    ] LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = %s',
                       v_function, v_path);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', v_function);
    END LOOP;
    -- A session keeps the plan of the duplicate check; one made while the newest partition
    -- was empty scanned it row by row, and went on doing so as it filled (each append of
    -- 1000 events probing it 1000 times: half a second at 300,000 rows). Appends never
    -- need a sequential scan: the check always goes through the event_id index.
    ALTER FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[],
                                   jsonb[], bytea[]) SET enable_seqscan = off;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[],
            text[], text[], jsonb[], bytea[]) TO cairn_runtime;
        GRANT EXECUTE ON FUNCTION cairn_append_fenced_v2(text, uuid[], text[], entity_kind[],
            text[], text[], text[], jsonb[], bytea[]) TO cairn_runtime;
        GRANT EXECUTE ON FUNCTION cairn_settled_position_v1() TO cairn_runtime;
        GRANT SELECT ON event_log_shards TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on the sharded log: %', SQLERRM;
END
$$;
