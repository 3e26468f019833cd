-- Named queries of the control plane: `-- name --` starts a query; loaded by
-- controlplane.sql.queries[name]. Parameters use asyncpg's $n syntax.

-- append_events --
-- One batch, one round trip; see cairn_append_v2 in migrations/sql/0019_sharded_log.up.sql
-- ($2: the job ids as `jobs_of` filled them, where the batch needed it).
-- For an append in the caller's transaction (one not in a transaction appends through
-- append_events_committed). A single-shard log wakes its readers in the same statement, at
-- its commit (its head lock serializes the appends anyway): on cairn_events_v1 (every
-- unfiltered tailer) the highest position, on cairn_events_for_v1 $9, the readers the
-- batch concerns (eventlog/events.py readers_of: the filtered tailers wake for their own
-- only). A sharded log's are woken by notify_appended (`notified` false).
SELECT a.positions, h.shard_count = 1 AS notified,
       CASE WHEN h.shard_count = 1 AND cardinality(a.positions) > 0 THEN
            pg_notify('cairn_events_v1', (SELECT max(p) FROM unnest(a.positions) p)::text)
       END,
       CASE WHEN h.shard_count = 1 AND cardinality(a.positions) > 0 THEN
            pg_notify('cairn_events_for_v1', $9::text)
       END
  FROM cairn_append_v2($1::uuid[], $2::text[], $3::text[]::entity_kind[], $4::text[],
                       $5::text[], $6::text[], $7::text[]::jsonb[], $8::bytea[]) a,
       event_log_head h
 WHERE h.id = 1

-- append_events_committed --
-- Any of the appends below and its readers' wake-up in one call, for a caller not in a
-- transaction (migrations/sql/0029_appends_in_one_round_trip.up.sql). $1 the writer node
-- (fenced) or NULL, $2 the writer's clock on a log on several servers or NULL, $3 the
-- writer node's bound on a server other than server 0 or NULL (0032), $12 the readers
-- (as append_events' $9). The append commits, and the readers are woken after it
-- in a transaction of its own, committed without waiting for the disk: a transaction that
-- notifies holds a lock of the whole database through its commit, so that inside the
-- appends it would make each one's commit (fsync included) wait for the one before,
-- whatever their shards; and a wake-up lost in a crash costs a reader one poll, not an
-- event.
CALL cairn_append_commit_v2($1::text, $2::bigint, $3::bigint, $4::uuid[], $5::text[],
                            $6::text[]::entity_kind[], $7::text[], $8::text[], $9::text[],
                            $10::text[]::jsonb[], $11::bytea[], $12::text, NULL, NULL)

-- append_events_fenced --
-- The same on behalf of node $1: refused (not stored, a stale_refused event instead) once
-- the node was declared dead; see migrations/sql/0012_node_fence.up.sql and 0019.
SELECT a.positions, a.refused, h.shard_count = 1 AS notified,
       CASE WHEN h.shard_count = 1 AND cardinality(a.positions) > 0 THEN
            pg_notify('cairn_events_v1', (SELECT max(p) FROM unnest(a.positions) p)::text)
       END,
       CASE WHEN h.shard_count = 1 AND cardinality(a.positions) > 0 THEN
            pg_notify('cairn_events_for_v1', $10::text)
       END
  FROM cairn_append_fenced_v2($1::text, $2::uuid[], $3::text[], $4::text[]::entity_kind[],
                              $5::text[], $6::text[], $7::text[], $8::text[]::jsonb[],
                              $9::bytea[]) a,
       event_log_head h
 WHERE h.id = 1

-- jobs_of --
-- A batch's job ids, each event of a job's entity that names none given the job its
-- entity's other events name (migrations/sql/0020_entity_jobs.up.sql). Asked only for a
-- batch that holds such an event (eventlog/appender.py, append_on): rare, and a SQL
-- function is planned anew at each statement that calls it.
SELECT cairn_jobs_of_v1($1::text[], $2::text[]::entity_kind[], $3::text[])

-- log_server_addresses --
-- Server 0's list of the log's servers, in order (controlplane/log_servers.py; asked with
-- asyncpg by the runtime, with psycopg by the command line).
SELECT address FROM log_servers ORDER BY server_index

-- append_events_after --
-- The same on one server of a log on several (migrations/sql/0021_log_servers.up.sql):
-- positions past $9, the writer's clock; the readers are woken after the commit.
SELECT cairn_append_after_v1($9::bigint, $1::uuid[], $2::text[], $3::text[]::entity_kind[],
                             $4::text[], $5::text[], $6::text[], $7::text[]::jsonb[],
                             $8::bytea[]) AS positions,
       false AS notified

-- append_events_fenced_after --
-- The same on behalf of node $1, refused once it is fenced on this server
-- (migrations/sql/0022_fences_on_servers.up.sql); $2: the writer's clock; $3: its bound
-- or NULL (0032_append_bounds.up.sql).
SELECT a.positions, a.refused, false AS notified
  FROM cairn_append_fenced_after_v2($1::text, $2::bigint, $3::bigint, $4::uuid[], $5::text[],
                                    $6::text[]::entity_kind[], $7::text[], $8::text[],
                                    $9::text[], $10::text[]::jsonb[], $11::bytea[]) a

-- fence_node --
-- Fences node $1 on this server of a log on several; the server's highest head.
SELECT head FROM cairn_fence_node_v1($1::text)

-- notify_appended --
-- Wakes the readers of an append to a sharded log made in the caller's transaction, at
-- its commit: $1 the highest position, on cairn_events_v1; $2 the readers, on
-- cairn_events_for_v1 (as append_events).
SELECT pg_notify('cairn_events_v1', $1::text), pg_notify('cairn_events_for_v1', $2::text)

-- The readers' queries (eventlog/tailer.py; controlplane/README.md, "Reading only what
-- concerns a reader" and "The sharded log"), through cairn_read_events_v1 (migrations/sql/
-- 0024_reads_after_heads.up.sql): one row per shard of this server with its head's
-- position (`horizon`, every position of that shard up to it committed) and the log's
-- shard count, then, per shard, its next events up to that head, at most $2 (the batch
-- size) of them, in position order. $1: where the reader stands in each shard (index
-- shard + 1; a shard past the list: the last parameter, where it started). The reader
-- moves each shard's position on as far as it read it.

-- read_events_after --
SELECT * FROM cairn_read_events_v1($1::bigint[], $2::integer, $3::bigint, NULL, 'all')

-- read_events_for_node --
-- A node daemon's: those addressed to node $3 (or to every node) and those about what it
-- owns, through the partial indexes of migration 0017.
SELECT * FROM cairn_read_events_v1($1::bigint[], $2::integer, $4::bigint, $3::text, 'node')

-- read_events_for_scheduler --
-- The global scheduler's: nodes, placement groups, spills, placements and what became
-- of the tasks spilled (owner_node); events_scheduler_idx.
SELECT * FROM cairn_read_events_v1($1::bigint[], $2::integer, $3::bigint, NULL, 'scheduler')

-- event_ids_at --
-- What the log holds at positions a tailer read before a failover (see tailer.py).
SELECT position, event_id FROM events WHERE position = ANY($1::bigint[])

-- server_clock --
-- The server's clock and how far ahead of it an event id may be made (migration 0030).
SELECT clock_timestamp() AS now, max_clock_skew FROM event_log_head WHERE id = 1

-- head_position --
-- The highest position handed out and committed (of any shard).
SELECT max(last_position) FROM event_log_shards

-- settled_position --
-- The head once no append is in flight (nothing appended later goes at or below it).
SELECT cairn_settled_position_v1()

-- seal_partitions --
-- Stamps the partitions every position of which is handed out and settled with the time
-- (no event is recorded in them later), and redefines the view of the recent ones that an
-- append's duplicate check reads when no copy of its ids can lie before (migration 0030).
SELECT cairn_seal_partitions_v1()

-- define_recent_event_ids --
-- The view of the recent partitions, of the attached ones only (a detached partition's ids
-- are not checked; one in the view could not be dropped).
SELECT cairn_define_recent_event_ids_v1()

-- head_positions --
-- Each shard's head (index shard + 1): where a reader that starts now starts.
SELECT array_agg(last_position ORDER BY shard) FROM event_log_shards

-- shard_heads --
-- Each shard this server holds and its head, with the log's shard count (a log on
-- several servers: eventlog/servers.py, servers_head_positions).
SELECT s.shard, s.last_position, h.shard_count
  FROM event_log_shards s, event_log_head h
 WHERE h.id = 1

-- stored_tailer_positions --
-- Where the log's readers that keep their place in it stand: the projectors (their
-- subscriptions, moved with each batch applied) and the checkpointing ones, such as the
-- global scheduler (moved each checkpoint: their lag is at most one checkpoint's more).
SELECT 'projection:' || name AS tailer, position FROM subscriptions
UNION ALL
SELECT 'checkpoint:' || name, position FROM checkpoints

-- subscription_position --
SELECT positions FROM subscriptions WHERE name = $1

-- save_subscription_position --
-- $2: the position in each shard (the highest is kept in `position`, for people).
WITH v AS (SELECT $1::text AS name, $2::bigint[] AS positions)
INSERT INTO subscriptions (name, position, positions, updated_at)
SELECT v.name, (SELECT coalesce(max(p), 0) FROM unnest(v.positions) p), v.positions,
       clock_timestamp()
  FROM v
ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position,
                                 positions = EXCLUDED.positions,
                                 updated_at = EXCLUDED.updated_at

-- ensure_partitions --
SELECT cairn_ensure_partitions_v1((SELECT max(last_position) FROM event_log_shards))

-- set_partition_size --
UPDATE event_log_head SET partition_size = $1, partitions_ahead = $2 WHERE id = 1

-- partition_index_missing --
-- Whether partition $2 lacks its history index $1, and whether this user may build it:
-- only the partition's owner (or a member of its role) may, not cairn_runtime.
SELECT to_regclass($1) IS NULL AS missing,
       pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = to_regclass($2)),
                   'USAGE') AS may_build

-- list_partitions --
SELECT table_name, lower_bound, upper_bound, state, created_at, detached_at, archived_to,
       dropped_at
  FROM event_partitions
 ORDER BY lower_bound

-- mark_partition_detached --
UPDATE event_partitions SET state = 'detached', detached_at = clock_timestamp()
 WHERE table_name = $1

-- mark_partition_archived --
UPDATE event_partitions SET state = 'archived', archived_to = $2 WHERE table_name = $1

-- mark_partition_dropped --
UPDATE event_partitions SET state = 'dropped', dropped_at = clock_timestamp()
 WHERE table_name = $1

-- ensure_subscription --
INSERT INTO subscriptions (name) VALUES ($1) ON CONFLICT (name) DO NOTHING

-- lock_subscription --
SELECT positions FROM subscriptions WHERE name = $1 FOR UPDATE

-- register_liveness --
-- With the node's first bound (as ping_liveness).
INSERT INTO node_liveness (node_id, address, appends_below)
VALUES ($1, $2, greatest($3::bigint, (SELECT max(last_position) FROM event_log_shards)) + $4)
RETURNING appends_below

-- ping_liveness --
-- No row back: the node was declared dead (its pings stopped for too long) and must go.
-- Else its bound (migrations/sql/0032_append_bounds.up.sql), renewed: past $2, the
-- node's clock, and this server's heads, by $3; it never goes down.
UPDATE node_liveness
   SET last_ping = clock_timestamp(),
       appends_below = greatest(appends_below,
           greatest($2::bigint, (SELECT max(last_position) FROM event_log_shards)) + $3)
 WHERE node_id = $1 AND dead_at IS NULL
RETURNING appends_below

-- declare_stale_nodes_dead --
-- Nodes whose pings stopped more than $1 seconds ago; each is declared dead once
-- (concurrent monitors skip rows another one is declaring), and fenced: the log refuses
-- what its old incarnation appends from now on (cairn_append_fenced_v2, under the fence's
-- lock, taken here for the rest of the transaction: migrations/sql/0019).
UPDATE node_liveness SET dead_at = clock_timestamp(), fenced_at = clock_timestamp()
 WHERE node_id IN (SELECT node_id FROM node_liveness
                    WHERE dead_at IS NULL
                      AND last_ping < clock_timestamp() - make_interval(secs => $1)
                      FOR UPDATE SKIP LOCKED)
RETURNING node_id, last_ping, appends_below, cairn_fence_lock_v1(node_id, false) AS fenced

-- declare_node_restarted --
-- Its daemon died and its node starts another in its place, which adopts what the old
-- one kept in its store; fenced as a node declared dead by the monitor is.
UPDATE node_liveness SET dead_at = clock_timestamp(), fenced_at = clock_timestamp()
 WHERE node_id = $1 AND dead_at IS NULL
RETURNING node_id, appends_below, cairn_fence_lock_v1(node_id, false) AS fenced

-- owe_fence --
-- Node $1's fence on server $2, which did not answer when the node was declared dead:
-- placed once it does (membership.py, place_owed_fences).
INSERT INTO node_fences_owed (node_id, server_index) VALUES ($1, $2) ON CONFLICT DO NOTHING

-- fences_owed --
SELECT node_id, server_index FROM node_fences_owed ORDER BY owed_since, node_id, server_index

-- fence_placed --
DELETE FROM node_fences_owed WHERE node_id = $1 AND server_index = $2

-- store_objects_left --
-- Each object's last event by a node whose daemon died: what its store held when it
-- died is what was created (or adopted) there and not freed, lost or spilled since.
-- A scan of the events (no index by node): once per daemon restart.
SELECT DISTINCT ON (entity_id) entity_id AS object_id, event_type, payload
  FROM log_union.events
 WHERE entity_kind = 'object' AND node_id = $1
 ORDER BY entity_id, position DESC

-- declare_node_gone --
UPDATE node_liveness SET dead_at = clock_timestamp() WHERE node_id = $1 AND dead_at IS NULL
RETURNING node_id

-- node_events --
-- What the membership folds from: every node event but heartbeats, and each node's
-- latest heartbeat (a heartbeat replaces the one before: the others change nothing),
-- through the partial index events_node_idx (migration 0014).
SELECT * FROM (
    SELECT position, event_id, recorded_at, job_id, entity_kind::text AS entity_kind,
           entity_id, event_type, node_id, payload::text AS payload, data
      FROM events
     WHERE entity_kind = 'node' AND event_type <> 'heartbeat'
    UNION ALL
    (SELECT DISTINCT ON (entity_id) position, event_id, recorded_at, job_id,
            entity_kind::text AS entity_kind, entity_id, event_type, node_id,
            payload::text AS payload, data
       FROM events
      WHERE entity_kind = 'node' AND event_type = 'heartbeat'
      ORDER BY entity_id, position DESC)
) membership
 ORDER BY position

-- infeasible_tasks --
-- Tasks and actors reported infeasible (no node has their resources) and not placed,
-- ended or dead since.
SELECT i.entity_kind::text AS kind, i.entity_id AS task_id, i.payload->'resources' AS resources
  FROM log_union.events i
 WHERE i.entity_kind IN ('task', 'actor') AND i.event_type = 'infeasible'
   AND NOT coalesce((i.payload->>'final')::boolean, false)
   AND NOT EXISTS (SELECT 1 FROM log_union.events p
                    WHERE p.entity_kind = i.entity_kind AND p.entity_id = i.entity_id
                      AND p.event_type IN ('placed', 'cancelled', 'failed', 'alive', 'dead')
                      AND p.position > i.position)
 ORDER BY i.position

-- task_lineage --
-- What lineage reconstruction re-runs: a task's `submitted` event (its spec, and its
-- code if it was the first task to use it) and the highest attempt logged for it.
SELECT
    (SELECT data FROM log_union.events
      WHERE entity_id = $1 AND event_type = 'submitted' AND entity_kind = 'task'
      ORDER BY position LIMIT 1) AS submitted,
    (SELECT max((payload->>'attempt')::int) FROM log_union.events
      WHERE entity_id = $1 AND entity_kind = 'task') AS attempt;

-- named_actor --
-- The live actors holding the name $2 in namespace $1 in the whole log, newest first
-- (controlplane/node/actor_names.py, NamesInLog): those that claimed it
-- (`name_reserved`, in a cluster) or were made with it (`creation_requested`), each with
-- its creation task's `submitted` data (its spec: the actor's options) where logged yet
-- (an actor may come twice: claimed, then made). Live: no `dead` event of it, and its
-- owner (the node that logged the event for itself, or the one it names as owner) not
-- declared dead (its actors went with it). Through events_actor_names_idx (migration
-- 0028), events_actor_calls_idx and events_entity_idx.
SELECT c.entity_id AS actor_id,
       (SELECT s.data FROM log_union.events s
         WHERE s.payload ? 'actor_id' AND s.event_type = 'submitted'
           AND s.payload ->> 'actor_id' = c.entity_id AND s.payload ->> 'method' = '__init__'
         ORDER BY s.position LIMIT 1) AS creation
  FROM log_union.events c
 WHERE c.entity_kind = 'actor' AND c.event_type IN ('creation_requested', 'name_reserved')
   AND c.payload ? 'name'
   AND md5(c.payload ->> 'name') = md5($2) AND c.payload ->> 'name' = $2
   AND c.payload ->> 'namespace' = $1
   AND NOT EXISTS (SELECT 1 FROM log_union.events d
                    WHERE d.entity_id = c.entity_id AND d.event_type = 'dead'
                      AND d.entity_kind = 'actor')
   AND NOT EXISTS (SELECT 1 FROM log_union.events n
                    WHERE n.entity_id = coalesce(c.payload ->> 'owner_node', c.node_id)
                      AND n.event_type = 'dead' AND n.entity_kind = 'node')
 ORDER BY c.position DESC

-- lock_actor_name --
-- The lock of name $2 in namespace $1, held by a node claiming it until its claim is
-- durable (NamesInLog.claim), on the log's first server.
SELECT pg_advisory_xact_lock(hashtextextended('cairn-actor-name:' || $1 || '/' || $2, 0))

-- named_actors --
-- Every live named actor of the log whose creation is logged ($1: one namespace, or NULL
-- for all), without their specs (`ray.util.list_named_actors`).
SELECT DISTINCT c.entity_id AS actor_id, c.payload ->> 'namespace' AS namespace,
       c.payload ->> 'name' AS name
  FROM log_union.events c
 WHERE c.entity_kind = 'actor' AND c.event_type = 'creation_requested' AND c.payload ? 'name'
   AND ($1::text IS NULL OR c.payload ->> 'namespace' = $1)
   AND NOT EXISTS (SELECT 1 FROM log_union.events d
                    WHERE d.entity_id = c.entity_id AND d.event_type = 'dead'
                      AND d.entity_kind = 'actor')
   AND NOT EXISTS (SELECT 1 FROM log_union.events n
                    WHERE n.entity_id = coalesce(c.payload ->> 'owner_node', c.node_id)
                      AND n.event_type = 'dead' AND n.entity_kind = 'node')

-- actor_whereabouts --
-- Where actor $1 lives now, for a node that calls it without having made or hosting it
-- (controlplane/node/actors_borrowed.py): its latest state event (`alive`: on the node
-- that logged it; `creation_requested`, `restarting`: not yet; `dead`: its `cause`),
-- whether that node was declared dead, whether its owner's was (the node that logged
-- its creation for itself, or the one that event names as owner), and its creation
-- task's spec (its options). No row: the log does not name it (yet).
SELECT s.event_type AS state, s.node_id AS node, s.payload ->> 'cause' AS cause,
       EXISTS (SELECT 1 FROM log_union.events n
                WHERE n.entity_id = s.node_id AND n.event_type = 'dead'
                  AND n.entity_kind = 'node') AS node_dead,
       EXISTS (SELECT 1 FROM log_union.events r
                WHERE r.entity_id = $1 AND r.event_type = 'creation_requested'
                  AND r.entity_kind = 'actor'
                  AND EXISTS (SELECT 1 FROM log_union.events n
                               WHERE n.entity_id = coalesce(r.payload ->> 'owner_node', r.node_id)
                                 AND n.event_type = 'dead' AND n.entity_kind = 'node'))
           AS owner_dead,
       (SELECT c.data FROM log_union.events c
         WHERE c.payload ? 'actor_id' AND c.event_type = 'submitted'
           AND c.payload ->> 'actor_id' = $1 AND c.payload ->> 'method' = '__init__'
         ORDER BY c.position LIMIT 1) AS creation
  FROM (SELECT event_type, node_id, payload FROM log_union.events
         WHERE entity_id = $1 AND entity_kind = 'actor'
           AND event_type IN ('creation_requested', 'alive', 'restarting', 'dead')
         ORDER BY position DESC LIMIT 1) s

-- put_value --
-- How a put object can be recovered: its value (small ones are in their `created`
-- event) or the path of its durable copy (put(durable=True)).
SELECT data, payload->>'durable_path' AS durable_path, (payload->>'size_bytes')::bigint AS size
  FROM log_union.events
 WHERE entity_id = $1 AND event_type = 'created' AND entity_kind = 'object'
 ORDER BY position LIMIT 1;

-- replay_put_value --
-- put_value for `cairn replay`, read in an audit session (readonly_sql), whose `events`
-- is the whole log's union, or the union without the servers it leaves out.
SELECT data, payload->>'durable_path' AS durable_path, (payload->>'size_bytes')::bigint AS size
  FROM events
 WHERE entity_id = $1 AND event_type = 'created' AND entity_kind = 'object'
 ORDER BY position LIMIT 1;

-- load_checkpoint --
SELECT positions, state FROM checkpoints WHERE name = $1;

-- save_checkpoint --
-- $2: the position in each shard. Only ever moves forward: of several readers saving one
-- name, the furthest (by its highest position) wins.
WITH v AS (SELECT $1::text AS name, $2::bigint[] AS positions, $3::bytea AS state)
INSERT INTO checkpoints (name, position, positions, state)
SELECT v.name, (SELECT coalesce(max(p), 0) FROM unnest(v.positions) p), v.positions, v.state
  FROM v
ON CONFLICT (name) DO UPDATE
   SET position = EXCLUDED.position, positions = EXCLUDED.positions, state = EXCLUDED.state,
       saved_at = clock_timestamp()
 WHERE checkpoints.position < EXCLUDED.position;

-- actor_checkpoint --
-- The actor's latest checkpoint (its __cairn_save__() state, in `data`), if any.
SELECT position, data FROM log_union.events
 WHERE entity_id = $1 AND event_type = 'checkpointed' AND entity_kind = 'actor'
 ORDER BY position DESC LIMIT 1;

-- actor_calls_to_replay --
-- What an actor restarted with replay_calls_on_restart re-runs: its method calls that
-- ran to the end (finished, or raised an error of their own) after position $2 (its
-- checkpoint), each once, in the order they ended, which for an actor running one
-- call at a time is the order they ran.
SELECT s.entity_id AS task_id, s.data
  FROM log_union.events s
  JOIN LATERAL (
        SELECT e.position FROM log_union.events e
         WHERE e.entity_id = s.entity_id
           AND (e.event_type = 'finished'
                OR (e.event_type = 'failed' AND e.payload->>'error' LIKE 'task_error:%'))
         ORDER BY e.position LIMIT 1) ended ON true
 WHERE s.event_type = 'submitted' AND s.payload ? 'actor_id'
   AND s.payload->>'actor_id' = $1 AND s.payload->>'method' <> '__init__'
   AND ended.position > $2
 ORDER BY ended.position;

-- job_known --
-- Whether the log has heard of job $1 (`cairn timeline`, `cairn replay`): its own
-- events, or any event filed under it.
SELECT EXISTS (SELECT 1 FROM events WHERE entity_id = $1 AND entity_kind = 'job')
    OR EXISTS (SELECT 1 FROM events WHERE job_id = $1) AS known

-- timeline_task_events --
-- The events that time job $1's task attempts (`cairn timeline`): its tasks are those
-- whose `submitted` event carries the job id (later events of a task may not), then
-- their events are found through events_entity_idx (entity_id, event_type).
SELECT entity_id AS task_id, event_type, recorded_at, node_id, payload::text AS payload
  FROM events
 WHERE entity_kind = 'task'
   AND entity_id = ANY (ARRAY (SELECT entity_id FROM events
                                WHERE job_id = $1 AND entity_kind = 'task'
                                  AND event_type = 'submitted'))
   AND event_type = ANY ('{submitted,running,finished,failed,cancelled}'::text[])
 ORDER BY position

-- retention_full_partitions --
-- Every attached partition whose positions are all handed out and settled (no append in
-- flight can still take one: cairn_settled_position_v1; never the one taking appends), with its event count and newest event, and the cutoff: the server's clock
-- less $1 seconds (`cairn gc`). The lateral subquery is pruned to one partition.
SELECT p.table_name, p.lower_bound, p.upper_bound, s.events, s.newest,
       clock_timestamp() - make_interval(secs => $1::float8) AS cutoff
  FROM event_partitions p
  CROSS JOIN LATERAL (
        SELECT count(*) AS events, max(e.recorded_at) AS newest FROM events e
         WHERE e.position >= p.lower_bound AND e.position < p.upper_bound) s
 WHERE p.state = 'attached'
   AND p.upper_bound <= (SELECT cairn_settled_position_v1()) + 1
 ORDER BY p.lower_bound

-- replay_job_tasks --
-- Every task and actor call a job submitted (its spec, and its code when it was the
-- first of its function on that node), in submission order.
SELECT position, entity_id AS task_id, data FROM events
 WHERE job_id = $1 AND entity_kind = 'task' AND event_type = 'submitted'
 ORDER BY position;

-- replay_task_outcomes --
-- How each task ended last (finished, failed or cancelled), with its output digest.
SELECT DISTINCT ON (entity_id)
       entity_id AS task_id, event_type AS outcome,
       payload->>'output_digest' AS digest, payload->>'error' AS error
  FROM events
 WHERE entity_id = ANY($1::text[]) AND entity_kind = 'task'
   AND event_type IN ('finished', 'failed', 'cancelled')
 ORDER BY entity_id, position DESC;

-- replay_function_code --
-- `submitted` events of a function up to a position, a page at a time: the code is
-- in the first one each node logged.
SELECT position, data FROM events
 WHERE entity_kind = 'task' AND event_type = 'submitted' AND payload->>'function' = $1
   AND position > $2 AND position <= $3
 ORDER BY position LIMIT 20;

-- replay_open_tasks --
-- How many of a job's tasks have not ended yet.
SELECT count(*) FROM events s
 WHERE s.job_id = $1 AND s.entity_kind = 'task' AND s.event_type = 'submitted'
   AND NOT EXISTS (
       SELECT 1 FROM events e
        WHERE e.entity_id = s.entity_id AND e.entity_kind = 'task'
          AND e.event_type IN ('finished', 'failed', 'cancelled'));

-- object_known --
-- Whether the log knows an object: an event of its own, or its task's submission.
SELECT EXISTS (SELECT 1 FROM events WHERE entity_id = $1 AND entity_kind = 'object')
    OR EXISTS (SELECT 1 FROM events
                WHERE entity_id = cairn_creating_task($1) AND entity_kind = 'task'
                  AND event_type = 'submitted') AS known;

-- state_at_summary --
-- `cairn state --at` (controlplane/state_at.py), pass 1: every entity's state at
-- position $1 from its last state-setting event, by one scan of the log up to $1.
-- $2/$3/$4: (kind, event type, state index) of every transition, from
-- projections/spec.py TRANSITIONS (state index NULL: the event sets no state);
-- the index rides in the low 6 bits of max(position * 64 + index), so one integer max
-- finds the last one. Returns counts per (kind, job, state) and, listed one by one,
-- every entity that is not a task plus the $6 tasks least recently changed whose
-- state is not among $5 (the states a task ends in).
WITH t AS (
    SELECT * FROM unnest($2::entity_kind[], $3::text[], $4::int[]) AS t(kind, event_type, state)
), s AS MATERIALIZED (
    SELECT e.entity_kind AS kind, e.entity_id, max(e.job_id) AS job_id,
           max(e.position * 64 + t.state) FILTER (WHERE t.state IS NOT NULL) % 64 AS state,
           max(e.position) AS last_position
      FROM events e JOIN t ON t.kind = e.entity_kind AND t.event_type = e.event_type
     WHERE e.position <= $1
     GROUP BY e.entity_kind, e.entity_id
)
SELECT kind, job_id, state, count(*) AS n, NULL::text AS entity_id,
       max(last_position) AS last_position
  FROM s GROUP BY kind, job_id, state
UNION ALL
SELECT kind, job_id, state, 1, entity_id, last_position FROM s WHERE kind <> 'task'
UNION ALL
(SELECT kind, job_id, state, 1, entity_id, last_position FROM s
  WHERE kind = 'task' AND (state IS NULL OR state <> ALL ($5::int[]))
  ORDER BY last_position LIMIT $6);

-- state_at_entities --
-- `cairn state --at`, the fields of entities at position $1: each field from the last
-- event (position <= $1) that sets it, as the projector's fold does: max((position,
-- value)) over the events that carry it. $2..$9 say, per (kind, event type) from
-- TRANSITIONS, the state index it sets and which payload keys feed the kind's two text
-- fields and its counter, and whether it stamps its start or end time. $10: the
-- entities wanted (found by their index), or NULL for all (one scan of the log).
WITH t AS (
    SELECT * FROM unnest($2::entity_kind[], $3::text[], $4::int[], $5::text[], $6::text[],
                         $7::text[], $8::bool[], $9::bool[])
               AS t(kind, event_type, state, text1, text2, int1, stamp1, stamp2)
)
SELECT e.entity_kind AS kind, e.entity_id,
       max(e.position * 64 + t.state) FILTER (WHERE t.state IS NOT NULL) % 64 AS state,
       max((e.position, e.job_id)) FILTER (WHERE e.job_id IS NOT NULL) AS job_id,
       max((e.position, e.node_id)) FILTER (WHERE e.node_id IS NOT NULL) AS node_id,
       max((e.position, e.payload ->> t.text1))
           FILTER (WHERE e.payload ->> t.text1 IS NOT NULL) AS text1,
       max((e.position, e.payload ->> t.text2))
           FILTER (WHERE e.payload ->> t.text2 IS NOT NULL) AS text2,
       max((e.position, e.payload ->> t.int1))
           FILTER (WHERE e.payload ->> t.int1 IS NOT NULL) AS int1,
       max((e.position, e.recorded_at)) FILTER (WHERE t.stamp1) AS stamp1,
       max((e.position, e.recorded_at)) FILTER (WHERE t.stamp2) AS stamp2
  FROM events e JOIN t ON t.kind = e.entity_kind AND t.event_type = e.event_type
 WHERE e.position <= $1
   AND ($10::text[] IS NULL OR (e.entity_id = ANY ($10::text[]) AND e.event_type = ANY ($3::text[])))
 GROUP BY e.entity_kind, e.entity_id;

-- retained_range --
-- The positions still in the log (old partitions may have been dropped) and their times.
SELECT lo.position AS first_position, lo.recorded_at AS first_recorded_at,
       hi.position AS last_position, hi.recorded_at AS last_recorded_at,
       clock_timestamp() AS now
  FROM (SELECT position, recorded_at FROM events ORDER BY position LIMIT 1) lo,
       (SELECT position, recorded_at FROM events ORDER BY position DESC LIMIT 1) hi;

-- recorded_at_or_after --
-- The first retained event at or after position $1 (binary search of a time).
SELECT position, recorded_at FROM events WHERE position >= $1 ORDER BY position LIMIT 1;

-- log_identity --
-- A log's identity: the id of its first retained event (two URLs name the same log
-- when they give the same one). Read in an audit session (readonly_sql): `events` is the
-- whole log's union there, or the union without the servers it leaves out.
SELECT event_id::text AS first_event FROM events ORDER BY position LIMIT 1;

-- gcs_epoch --
-- The server's fencing epoch (migration 0011), recording a new one first if the server
-- was promoted since: which log it is (system_id, database), its epoch and timeline.
SELECT system_id, current_database() AS database, epoch, epoch_id::text AS epoch_id, timeline
  FROM cairn_epoch_v1()

-- gcs_identity --
-- What every runtime connection checks first (migration 0013, eventlog/fencing.py): the
-- server's epoch (recording a promotion first, as gcs_epoch), which log it is (its
-- cluster_id and the server's system_id), the log's head position, and whether the
-- server is a standby; and which server of its log it is (migration 0021).
SELECT system_id, current_database() AS database, cluster_id::text AS cluster_id, epoch,
       epoch_id::text AS epoch_id, timeline, head_position, standby,
       (SELECT server_index FROM event_log_head WHERE id = 1) AS server_index
  FROM cairn_identity_v1()

-- gcs_epochs --
-- Every epoch of the log: its first, and one per promotion of a replica.
SELECT epoch, epoch_id::text AS epoch_id, timeline, recorded_at FROM gcs_epochs ORDER BY epoch

-- runtime_env_package_exists --
SELECT 1 FROM runtime_env_packages WHERE digest = $1

-- runtime_env_package_store --
-- Content-addressed: a second upload of the same bytes changes nothing.
INSERT INTO runtime_env_packages (digest, size_bytes, data) VALUES ($1, $2, $3)
    ON CONFLICT (digest) DO NOTHING

-- runtime_env_package_fetch --
SELECT data FROM runtime_env_packages WHERE digest = $1

-- job_driver_node --
-- The node of a job's driver, where its workers' output is sent.
SELECT payload->>'driver_node_id' FROM log_union.events
 WHERE entity_kind = 'job' AND entity_id = $1 AND event_type = 'submitted'
 LIMIT 1

-- job_submission_events --
-- The events of one job submission ($1), or of all ($1 NULL), in order (controlplane/jobs.py
-- folds them into each one's state). Both predicates: events_submission_idx has one or the
-- other (migrations/sql/0026_submission_index_predicate.up.sql).
SELECT entity_id, event_type, payload, recorded_at FROM events
 WHERE entity_kind = 'submission' AND cairn_is_submission(entity_kind)
   AND ($1::text IS NULL OR entity_id = $1)
 ORDER BY position


-- submissions_running_on --
-- The job submissions not ended whose driver ran on one of the nodes $1 (text[]): when
-- those are declared dead, so is the job (controlplane/membership.py).
SELECT entity_id,
       max(payload->>'driver_node_id') FILTER (WHERE event_type = 'running') AS driver_node_id
  FROM events
 WHERE entity_kind = 'submission' AND cairn_is_submission(entity_kind)  -- (as above)
 GROUP BY entity_id
HAVING bool_or(event_type = 'running' AND payload->>'driver_node_id' = ANY($1::text[]))
   AND NOT bool_or(event_type IN ('succeeded', 'failed', 'stopped', 'deleted'))
-- log_attempts_on_worker --
-- Every attempt a worker ran, in order, with where its output files stood when it was
-- sent (controlplane/logs.py cuts one attempt's lines out from these).
SELECT entity_id AS task_id, position, node_id, payload FROM log_union.events
 WHERE entity_kind = 'task' AND event_type = 'running' AND payload->>'worker_id' = $1
 ORDER BY position

-- log_task_attempts --
-- A task's attempts (its running events), in order.
SELECT position, node_id, payload->>'worker_id' AS worker_id FROM log_union.events
 WHERE entity_kind = 'task' AND event_type = 'running' AND entity_id = $1
 ORDER BY position

-- log_task_known --
-- Whether a task was submitted ($1), and whether it has ended for good (no attempt to
-- come: finished, failed or cancelled as its last word).
SELECT bool_or(event_type = 'submitted') AS submitted,
       (array_agg(event_type ORDER BY position DESC))[1]
           IN ('finished', 'failed', 'cancelled') AS over
  FROM log_union.events
 WHERE entity_kind = 'task' AND entity_id = $1

-- log_task_attempt_ended --
-- Whether a task's attempt sent at $2 (a position) has ended: a later event of the task
-- that closes it.
SELECT EXISTS (
  SELECT 1 FROM log_union.events
   WHERE entity_kind = 'task' AND entity_id = $1 AND position > $2
     AND event_type IN ('finished', 'failed', 'retried', 'cancelled', 'running'))

-- log_worker --
-- A worker's node and pid (its started event).
SELECT node_id, (payload->>'pid')::int AS pid FROM log_union.events
 WHERE entity_kind = 'worker' AND entity_id = $1 AND event_type = 'started'
 ORDER BY position LIMIT 1

-- log_actor_workers --
-- The workers of an actor, one per life (its alive events), in order.
SELECT payload->>'worker_id' AS worker_id, node_id FROM log_union.events
 WHERE entity_kind = 'actor' AND entity_id = $1 AND event_type = 'alive'
 ORDER BY position

-- log_job_workers --
-- The workers that ran a job's tasks or actors, by first use.
SELECT worker_id, min(position) AS first FROM (
  SELECT payload->>'worker_id' AS worker_id, position FROM log_union.events
   WHERE entity_kind IN ('task', 'actor') AND event_type IN ('running', 'alive')
     AND entity_id IN (SELECT entity_id FROM log_union.events
                        WHERE entity_kind IN ('task', 'actor') AND job_id = $1
                          AND event_type IN ('submitted', 'creation_requested'))) used
 GROUP BY worker_id ORDER BY first

-- log_node --
-- A node's addresses (its last registered event) and, once dead, why.
SELECT (SELECT payload->>'address' FROM log_union.events
         WHERE entity_kind = 'node' AND entity_id = $1 AND event_type = 'registered'
         ORDER BY position DESC LIMIT 1) AS address,
       (SELECT payload->>'socket' FROM log_union.events
         WHERE entity_kind = 'node' AND entity_id = $1 AND event_type = 'registered'
         ORDER BY position DESC LIMIT 1) AS socket,
       (SELECT payload->>'cause' FROM log_union.events
         WHERE entity_kind = 'node' AND entity_id = $1 AND event_type = 'dead'
         ORDER BY position DESC LIMIT 1) AS dead

-- log_nodes --
-- Every node's address (its last registered event) and, once dead, why.
SELECT entity_id AS node_id,
       (array_agg(payload->>'address' ORDER BY position DESC)
          FILTER (WHERE event_type = 'registered'))[1] AS address,
       (array_agg(payload->>'cause' ORDER BY position DESC)
          FILTER (WHERE event_type = 'dead'))[1] AS dead
  FROM log_union.events
 WHERE entity_kind = 'node' AND event_type IN ('registered', 'dead')
 GROUP BY entity_id

-- log_worker_of_pid --
-- The workers that ran as a pid, in order (pids are reused: the caller picks).
SELECT entity_id AS worker_id, node_id FROM log_union.events
 WHERE entity_kind = 'worker' AND event_type = 'started' AND (payload->>'pid')::int = $1
 ORDER BY position
