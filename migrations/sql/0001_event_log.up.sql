-- The event log: one partitioned table, a head row that hands out positions, and the
-- functions that append and manage partitions. See controlplane/README.md for the design.

CREATE TYPE entity_kind AS ENUM (
    'job', 'task', 'object', 'actor', 'node', 'placement_group', 'worker'
);

-- Partition key: position. Positions are global, start at 1, and are gap-free and
-- commit-ordered because every append holds the head row's lock until it commits.
CREATE TABLE events (
    position     bigint      NOT NULL,
    event_id     uuid        NOT NULL,
    recorded_at  timestamptz NOT NULL,
    job_id       text,
    entity_kind  entity_kind NOT NULL,
    entity_id    text        NOT NULL,
    event_type   text        NOT NULL,
    node_id      text,
    payload      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    data         bytea,
    CONSTRAINT events_payload_is_object CHECK (jsonb_typeof(payload) = 'object'),
    PRIMARY KEY (position)
) PARTITION BY RANGE (position);

-- Duplicate detection (idempotent appends). The per-entity history index
-- (entity_id, position) is built on each partition once it is full, by
-- PartitionManager.maintain(), so appends to the hot partition do not pay for it.
CREATE INDEX events_event_id_idx ON events (event_id);

-- The single row every append locks: the last position handed out and the exclusive
-- upper bound of the partitions that exist.
CREATE TABLE event_log_head (
    id                 smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    last_position      bigint NOT NULL DEFAULT 0,
    partition_size     bigint NOT NULL DEFAULT 1000000 CHECK (partition_size > 0),
    partitions_ahead   integer NOT NULL DEFAULT 2 CHECK (partitions_ahead >= 1),
    partitioned_until  bigint NOT NULL DEFAULT 1
);
INSERT INTO event_log_head (id) VALUES (1);

-- Every partition the log has had, and what became of it. The migration creates none:
-- the first append (or PartitionManager.ensure_ahead) does, with the partition size
-- configured by then.
CREATE TABLE event_partitions (
    table_name   text PRIMARY KEY,
    lower_bound  bigint NOT NULL,          -- inclusive
    upper_bound  bigint NOT NULL,          -- exclusive
    state        text NOT NULL DEFAULT 'attached'
                 CHECK (state IN ('attached', 'detached', 'archived', 'dropped')),
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    detached_at  timestamptz,
    archived_to  text,
    dropped_at   timestamptz,
    UNIQUE (lower_bound)
);

-- Saved positions of followers (projections, schedulers): name -> last position applied.
CREATE TABLE subscriptions (
    name        text PRIMARY KEY,
    position    bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Creates and attaches the next partition after the highest one. The table is made
-- standalone with a CHECK matching its range and then attached, so ATTACH needs only
-- SHARE UPDATE EXCLUSIVE on events: appends and readers are not blocked.
CREATE FUNCTION cairn_create_next_partition_v1() RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_lower bigint;
    v_size  bigint;
    v_name  text;
BEGIN
    SELECT coalesce(max(upper_bound), 1) INTO v_lower FROM event_partitions;
    SELECT partition_size INTO v_size FROM event_log_head WHERE id = 1;
    v_name := format('events_p%s', lpad(v_lower::text, 19, '0'));
    EXECUTE format(
        'CREATE TABLE %I (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS,'
        ' CONSTRAINT %I CHECK (position >= %s AND position < %s))',
        v_name, v_name || '_range', v_lower, v_lower + v_size);
    EXECUTE format('ALTER TABLE events ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)',
                   v_name, v_lower, v_lower + v_size);
    INSERT INTO event_partitions (table_name, lower_bound, upper_bound)
    VALUES (v_name, v_lower, v_lower + v_size);
    UPDATE event_log_head SET partitioned_until = v_lower + v_size WHERE id = 1;
    RETURN v_name;
END;
$$;

-- Makes sure partitions cover every position up to `p_position` plus `partitions_ahead`
-- partitions' worth of positions.
CREATE FUNCTION cairn_ensure_partitions_v1(p_position bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_created integer := 0;
    v_until   bigint;
    v_size    bigint;
    v_ahead   integer;
BEGIN
    -- Appends lock the head row before they touch events; so does this, so that
    -- creating partitions from maintenance and from an append cannot deadlock.
    PERFORM 1 FROM event_log_head WHERE id = 1 FOR UPDATE;
    LOOP
        SELECT partitioned_until, partition_size, partitions_ahead
          INTO v_until, v_size, v_ahead FROM event_log_head WHERE id = 1;
        EXIT WHEN v_until > p_position + v_size * v_ahead;
        PERFORM cairn_create_next_partition_v1();
        v_created := v_created + 1;
    END LOOP;
    RETURN v_created;
END;
$$;

-- Appends a batch. Holding the head row's lock from position allocation until commit
-- makes positions commit-ordered: no reader can see position p+1 before p.
-- Events whose event_id is already in an attached partition are not stored again; a
-- batch must not repeat an event_id. Returns the position before the batch and the duplicates'
-- event ids with the positions they already have; the stored events take
-- base+1, base+2, ... in input order.
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
