-- The documented SQL surface (docs/sql.md): views over the log, always current because
-- they are computed from `events` when read (nothing to keep up to date, no process).
--
-- The projection tables of migration 0002 (kept by controlplane/projections/projector.py)
-- move to the schema `projection`, so that the plain names are the views. States are
-- those of controlplane/projections/spec.py (TRANSITIONS), so a view and the fold of the
-- same log agree on the columns they share (tests/test_sql_views.py checks it).
--
-- How the views stay fast: each one groups its entity's events by entity_id, so a filter
-- on the id (task_id = ..., object_id = ...) is pushed below the grouping and read
-- through events_entity_idx; a column a query does not select is not computed (the
-- planner drops unused aggregates). "The value of the latest event" is a max() over a
-- tag that sorts by position: cairn_tag() for small integers, cairn_at() for text.

CREATE SCHEMA projection;
ALTER TABLE jobs SET SCHEMA projection;
ALTER TABLE tasks SET SCHEMA projection;
ALTER TABLE objects SET SCHEMA projection;
ALTER TABLE actors SET SCHEMA projection;
ALTER TABLE nodes SET SCHEMA projection;

-- A small integer (0 <= value < 2^20) tagged with the position of its event: the
-- max() of tags is the latest event's; cairn_untag() gives the value back.
CREATE FUNCTION cairn_tag(p_position bigint, p_value int) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT p_position * 1048576 + p_value $$;
CREATE FUNCTION cairn_untag(p_tag bigint) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT (p_tag % 1048576)::int $$;

-- The same for text: cairn_value(max(cairn_at(position, x))) is x of the latest event.
CREATE FUNCTION cairn_at(p_position bigint, p_value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT lpad(p_position::text, 19, '0') || p_value $$;
CREATE FUNCTION cairn_value(p_tagged text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT substr(p_tagged, 20) $$;

-- The state an event sets (spec.py TRANSITIONS), as a code; NULL: the event sets none.
-- cairn_state_name(code) is the state's name.
CREATE FUNCTION cairn_state_code(p_kind entity_kind, p_event_type text) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT CASE p_kind
    WHEN 'job' THEN CASE p_event_type
        WHEN 'submitted' THEN 1 WHEN 'started' THEN 2 WHEN 'finished' THEN 3
        WHEN 'failed' THEN 4 END
    WHEN 'task' THEN CASE p_event_type
        WHEN 'submitted' THEN 5 WHEN 'waiting_for_dependencies' THEN 6
        WHEN 'scheduled' THEN 7 WHEN 'placed' THEN 7 WHEN 'running' THEN 8
        WHEN 'finished' THEN 9 WHEN 'failed' THEN 4 WHEN 'retried' THEN 10
        WHEN 'reconstructing' THEN 11 WHEN 'cancelled' THEN 12 WHEN 'spilled' THEN 13
        WHEN 'infeasible' THEN 14 END
    WHEN 'object' THEN CASE p_event_type
        WHEN 'created' THEN 15 WHEN 'restored' THEN 15 WHEN 'freed' THEN 16
        WHEN 'lost' THEN 17 WHEN 'spilled' THEN 18 END
    WHEN 'actor' THEN CASE p_event_type
        WHEN 'creation_requested' THEN 19 WHEN 'scheduled' THEN 19 WHEN 'alive' THEN 20
        WHEN 'restarting' THEN 21 WHEN 'dead' THEN 22 END
    WHEN 'node' THEN CASE p_event_type
        WHEN 'registered' THEN 20 WHEN 'dead' THEN 22 END
    WHEN 'placement_group' THEN CASE p_event_type
        WHEN 'created' THEN 23 WHEN 'placed' THEN 23 WHEN 'bundle_reserved' THEN 23
        WHEN 'ready' THEN 15 WHEN 'infeasible' THEN 14 WHEN 'removed' THEN 24 END
END
$$;
CREATE FUNCTION cairn_state_name(p_code int) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT (ARRAY['PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'SUBMITTED',
              'WAITING_FOR_DEPENDENCIES', 'SCHEDULED', 'RUNNING', 'FINISHED', 'RETRYING',
              'RECONSTRUCTING', 'CANCELLED', 'PENDING_NODE_ASSIGNMENT', 'INFEASIBLE',
              'CREATED', 'FREED', 'LOST', 'SPILLED', 'PENDING_CREATION', 'ALIVE',
              'RESTARTING', 'DEAD', 'PENDING', 'REMOVED'])[p_code]
$$;

-- The attempt an event is about: a missing "attempt" means 0.
CREATE FUNCTION cairn_attempt(p_payload jsonb) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT coalesce((p_payload ->> 'attempt')::int, 0) $$;

CREATE VIEW jobs AS
SELECT entity_id AS job_id,
       cairn_state_name(cairn_untag(max(cairn_tag(position, cairn_state_code('job', event_type)))))
           AS state,
       max(payload ->> 'entrypoint') FILTER (WHERE event_type = 'submitted') AS entrypoint,
       max(payload ->> 'driver_node_id') FILTER (WHERE event_type = 'submitted') AS driver_node_id,
       max(payload ->> 'namespace') FILTER (WHERE event_type = 'submitted') AS namespace,
       max(payload ->> 'replay_of') FILTER (WHERE event_type = 'submitted') AS replay_of,
       max(recorded_at) FILTER (WHERE event_type = 'submitted') AS submitted_at,
       max(recorded_at) FILTER (WHERE event_type = 'started') AS started_at,
       max(recorded_at) FILTER (WHERE event_type IN ('finished', 'failed')) AS ended_at,
       max(recorded_at) FILTER (WHERE event_type IN ('finished', 'failed'))
         - max(recorded_at) FILTER (WHERE event_type = 'started') AS duration,
       cairn_value(max(cairn_at(position, payload ->> 'error')) FILTER (WHERE event_type = 'failed'))
           AS error,
       max(position) AS last_position,
       max(recorded_at) AS updated_at
  FROM events
 WHERE entity_kind = 'job'
 GROUP BY entity_id;

CREATE VIEW tasks AS
SELECT entity_id AS task_id,
       cairn_value(max(cairn_at(position, job_id))) AS job_id,
       max(payload ->> 'name') FILTER (WHERE event_type = 'submitted') AS name,
       max(payload ->> 'function') FILTER (WHERE event_type = 'submitted') AS function,
       max(payload ->> 'actor_id') FILTER (WHERE event_type = 'submitted') AS actor_id,
       max(payload ->> 'method') FILTER (WHERE event_type = 'submitted') AS method,
       cairn_state_name(cairn_untag(max(cairn_tag(position, cairn_state_code('task', event_type)))))
           AS state,
       cairn_value(max(cairn_at(position, node_id))) AS node_id,
       cairn_value(max(cairn_at(position, payload ->> 'worker_id'))
                   FILTER (WHERE event_type = 'running')) AS worker_id,
       coalesce(cairn_untag(max(cairn_tag(position, (payload ->> 'attempt')::int))
                FILTER (WHERE event_type NOT IN ('submitted', 'waiting_for_dependencies',
                                                 'cancelled', 'infeasible'))), 0) AS attempt,
       count(*) FILTER (WHERE event_type = 'running') AS attempts,
       max(recorded_at) FILTER (WHERE event_type = 'submitted') AS submitted_at,
       max(recorded_at) FILTER (WHERE event_type IN ('scheduled', 'placed')) AS scheduled_at,
       max(recorded_at) FILTER (WHERE event_type = 'running') AS started_at,
       max(recorded_at) FILTER (WHERE event_type IN ('finished', 'failed', 'cancelled'))
           AS ended_at,
       max(recorded_at) FILTER (WHERE event_type IN ('finished', 'failed', 'cancelled'))
         - max(recorded_at) FILTER (WHERE event_type = 'running') AS duration,
       cairn_value(max(cairn_at(position, payload ->> 'error')) FILTER (WHERE event_type = 'failed'))
           AS error,
       cairn_value(max(cairn_at(position, payload ->> 'output_digest'))
                   FILTER (WHERE event_type = 'finished')) AS output_digest,
       max(position) AS last_position,
       max(recorded_at) AS updated_at
  FROM events
 WHERE entity_kind = 'task' AND event_type <> 'forwarded'
 GROUP BY entity_id;

-- The attempt an event belongs to: its payload's, except that a `retried` event (which
-- names the new attempt) ends the attempt before it. Statistics on it (below) let the
-- planner estimate the attempt joins of task_attempts.
CREATE FUNCTION cairn_attempt_of(p_event_type text, p_payload jsonb) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT coalesce((p_payload ->> 'attempt')::int, 0) - (p_event_type = 'retried')::int
$$;
CREATE STATISTICS events_attempt_of_stats ON (cairn_attempt_of(event_type, payload)) FROM events;

-- One row per attempt that started running: its `running` event, joined to the event
-- that ended it (finished, failed, cancelled, or retried: a new attempt followed).
-- A flat join, so filters on task_id (events_entity_idx), node_id or started_at go
-- straight to the scan of `running` events.
CREATE VIEW task_attempts AS
SELECT r.entity_id AS task_id,
       cairn_attempt_of(r.event_type, r.payload) AS attempt,
       s.job_id,
       s.payload ->> 'name' AS name,
       r.node_id,
       r.payload ->> 'worker_id' AS worker_id,
       r.recorded_at AS started_at,
       e.recorded_at AS ended_at,
       e.recorded_at - r.recorded_at AS duration,
       CASE e.event_type WHEN 'finished' THEN 'FINISHED' WHEN 'failed' THEN 'FAILED'
                         WHEN 'cancelled' THEN 'CANCELLED' WHEN 'retried' THEN 'RETRIED'
                         ELSE 'RUNNING' END AS outcome,
       e.payload ->> 'error' AS error,
       CASE WHEN e.event_type = 'retried' THEN e.payload ->> 'reason' END AS retry_reason,
       (SELECT c.payload ->> 'object_id' FROM events c
         WHERE c.entity_id = r.entity_id AND c.event_type = 'reconstructing'
           AND c.entity_kind = 'task'
           AND cairn_attempt(c.payload) = cairn_attempt_of(r.event_type, r.payload)
         ORDER BY c.position LIMIT 1) AS rebuilds_object,
       (SELECT c.payload ->> 'reason' FROM events c
         WHERE c.entity_id = r.entity_id AND c.event_type = 'reconstructing'
           AND c.entity_kind = 'task'
           AND cairn_attempt(c.payload) = cairn_attempt_of(r.event_type, r.payload)
         ORDER BY c.position LIMIT 1) AS rebuild_reason,
       e.payload ->> 'output_digest' AS output_digest
  FROM events r
  JOIN events s
    ON s.entity_id = r.entity_id AND s.event_type = 'submitted' AND s.entity_kind = 'task'
  LEFT JOIN events e
    ON e.entity_id = r.entity_id AND e.entity_kind = 'task'
   AND e.event_type IN ('finished', 'failed', 'cancelled', 'retried')
   AND cairn_attempt_of(e.event_type, e.payload) = cairn_attempt_of(r.event_type, r.payload)
 WHERE r.entity_kind = 'task' AND r.event_type = 'running';

-- Where an object's copies are: per node, the latest created/transferred/restored event
-- after that node's latest `freed`; a `lost` event (the object is gone) drops every copy
-- recorded before it.
CREATE VIEW objects AS
SELECT object_id, job_id, task_id, size_bytes,
       cairn_state_name(cairn_untag(state_tag)) AS state,
       cairn_value(node_at) AS node_id,
       ARRAY(SELECT n FROM unnest(holders, held_at) AS h(n, p)
              WHERE p > coalesce(lost_at, 0) ORDER BY n) AS locations,
       inline, created_at, freed_at, last_position, updated_at
  FROM (SELECT entity_id AS object_id,
               cairn_value(max(job_at)) AS job_id,
               cairn_value(max(task_at)) AS task_id,
               (cairn_value(max(size_at)))::bigint AS size_bytes,
               max(state_tag) AS state_tag,
               max(node_at) AS node_at,
               array_agg(node_id) FILTER (WHERE held_at IS NOT NULL) AS holders,
               array_agg(held_at) FILTER (WHERE held_at IS NOT NULL) AS held_at,
               max(lost_at) AS lost_at,
               bool_or(inline) AS inline,
               max(created_at) AS created_at,
               max(freed_at) AS freed_at,
               max(last_position) AS last_position,
               max(updated_at) AS updated_at
          FROM (SELECT entity_id, node_id,
                       max(cairn_at(position, job_id)) AS job_at,
                       max(cairn_at(position, payload ->> 'task_id'))
                           FILTER (WHERE event_type = 'created') AS task_at,
                       max(cairn_at(position, payload ->> 'size_bytes'))
                           FILTER (WHERE event_type = 'created') AS size_at,
                       max(cairn_tag(position, cairn_state_code('object', event_type)))
                           AS state_tag,
                       max(cairn_at(position, node_id))
                           FILTER (WHERE cairn_state_code('object', event_type) IS NOT NULL)
                           AS node_at,
                       CASE WHEN max(position) FILTER (WHERE event_type IN
                                     ('created', 'transferred', 'restored'))
                                 > coalesce(max(position) FILTER (WHERE event_type = 'freed'), 0)
                            THEN max(position) FILTER (WHERE event_type IN
                                     ('created', 'transferred', 'restored')) END AS held_at,
                       max(position) FILTER (WHERE event_type = 'lost') AS lost_at,
                       bool_or((payload ->> 'inline')::boolean)
                           FILTER (WHERE event_type = 'created') AS inline,
                       max(recorded_at) FILTER (WHERE event_type = 'created') AS created_at,
                       max(recorded_at) FILTER (WHERE event_type = 'freed') AS freed_at,
                       max(position) FILTER (WHERE cairn_state_code('object', event_type)
                                             IS NOT NULL) AS last_position,
                       max(recorded_at) FILTER (WHERE cairn_state_code('object', event_type)
                                                IS NOT NULL) AS updated_at
                  FROM events
                 WHERE entity_kind = 'object'
                 GROUP BY entity_id, node_id) per_node
         GROUP BY entity_id) o;

-- One row per function (name and code id): its tasks, how many finished and failed,
-- and the duration of the finished ones (last `running` to last `finished`). One pass
-- over the task events that matter, grouped by task, then by function.
CREATE VIEW functions AS
SELECT name, function,
       count(*) AS tasks,
       count(duration) AS finished,
       count(*) FILTER (WHERE failed) AS failed,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration) AS p50_duration,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration) AS p95_duration,
       max(duration) AS max_duration
  FROM (SELECT max(payload ->> 'name') FILTER (WHERE event_type = 'submitted') AS name,
               max(payload ->> 'function') FILTER (WHERE event_type = 'submitted') AS function,
               bool_or(event_type = 'failed') AS failed,
               CASE WHEN max(position) FILTER (WHERE event_type = 'finished')
                         > max(position) FILTER (WHERE event_type = 'running')
                    THEN max(recorded_at) FILTER (WHERE event_type = 'finished')
                         - max(recorded_at) FILTER (WHERE event_type = 'running') END AS duration
          FROM events
         WHERE entity_kind = 'task' AND event_type IN ('submitted', 'running', 'finished', 'failed')
         GROUP BY entity_id) t
 GROUP BY name, function;

CREATE VIEW actors AS
SELECT entity_id AS actor_id,
       cairn_value(max(cairn_at(position, job_id))
                   FILTER (WHERE cairn_state_code('actor', event_type) IS NOT NULL)) AS job_id,
       max(payload ->> 'name') FILTER (WHERE event_type = 'creation_requested') AS name,
       max(payload ->> 'namespace') FILTER (WHERE event_type = 'creation_requested') AS namespace,
       max(payload ->> 'class_name') FILTER (WHERE event_type = 'creation_requested')
           AS class_name,
       cairn_state_name(cairn_untag(max(cairn_tag(position, cairn_state_code('actor', event_type)))))
           AS state,
       cairn_value(max(cairn_at(position, node_id))
                   FILTER (WHERE cairn_state_code('actor', event_type) IS NOT NULL)) AS node_id,
       cairn_value(max(cairn_at(position, payload ->> 'worker_id'))
                   FILTER (WHERE event_type = 'alive')) AS worker_id,
       coalesce(cairn_untag(max(cairn_tag(position, (payload ->> 'attempt')::int))
                FILTER (WHERE event_type = 'restarting')), 0) AS num_restarts,
       max((payload ->> 'max_restarts')::int) FILTER (WHERE event_type = 'creation_requested')
           AS max_restarts,
       cairn_value(max(cairn_at(position, payload ->> 'cause')) FILTER (WHERE event_type = 'dead'))
           AS death_cause,
       max(recorded_at) FILTER (WHERE event_type = 'creation_requested') AS created_at,
       max(recorded_at) FILTER (WHERE event_type = 'dead') AS ended_at,
       max(position) FILTER (WHERE cairn_state_code('actor', event_type) IS NOT NULL)
           AS last_position,
       max(recorded_at) FILTER (WHERE cairn_state_code('actor', event_type) IS NOT NULL)
           AS updated_at
  FROM events
 WHERE entity_kind = 'actor'
 GROUP BY entity_id;

-- Method calls: the tasks whose `submitted` event names an actor (events_actor_calls_idx
-- finds them), each with its own events (events_entity_idx).
CREATE VIEW actor_calls AS
SELECT s.entity_id AS task_id, s.payload ->> 'actor_id' AS actor_id,
       s.payload ->> 'method' AS method, (s.payload ->> 'sequence')::int AS sequence,
       s.job_id, t.state, t.node_id, t.worker_id, t.attempt, t.submitted_at, t.started_at,
       t.ended_at, t.duration, t.error, t.output_digest
  FROM events s
 CROSS JOIN LATERAL (SELECT * FROM tasks WHERE tasks.task_id = s.entity_id) t
 WHERE s.event_type = 'submitted' AND s.payload ? 'actor_id' AND s.entity_kind = 'task';

CREATE VIEW nodes AS
SELECT entity_id AS node_id,
       coalesce(cairn_state_name(cairn_untag(max(cairn_tag(position,
                    cairn_state_code('node', event_type))))), 'UNKNOWN') AS state,
       cairn_value(max(cairn_at(position, payload ->> 'address'))
                   FILTER (WHERE event_type = 'registered')) AS address,
       cairn_value(max(cairn_at(position, payload ->> 'resources'))
                   FILTER (WHERE event_type = 'registered'))::jsonb AS resources,
       cairn_value(max(cairn_at(position, payload ->> 'available'))
                   FILTER (WHERE event_type = 'heartbeat'))::jsonb AS available,
       cairn_value(max(cairn_at(position, payload ->> 'load'))
                   FILTER (WHERE event_type = 'heartbeat'))::jsonb AS load,
       max(recorded_at) FILTER (WHERE event_type = 'registered') AS registered_at,
       max(recorded_at) FILTER (WHERE event_type IN ('registered', 'heartbeat'))
           AS last_heartbeat_at,
       max(recorded_at) FILTER (WHERE event_type = 'dead') AS dead_at,
       cairn_value(max(cairn_at(position, payload ->> 'cause')) FILTER (WHERE event_type = 'dead'))
           AS death_cause,
       max(position) AS last_position,
       max(recorded_at) AS updated_at
  FROM events
 WHERE entity_kind = 'node'
 GROUP BY entity_id;

CREATE VIEW placement_groups AS
SELECT entity_id AS placement_group_id,
       cairn_value(max(cairn_at(position, job_id))) AS job_id,
       max(payload ->> 'name') FILTER (WHERE event_type = 'created') AS name,
       max(payload ->> 'strategy') FILTER (WHERE event_type = 'created') AS strategy,
       cairn_value(max(cairn_at(position, payload ->> 'bundles'))
                   FILTER (WHERE event_type = 'created'))::jsonb AS bundles,
       cairn_value(max(cairn_at(position, payload ->> 'bundle_nodes'))
                   FILTER (WHERE payload ? 'bundle_nodes'))::jsonb AS bundle_nodes,
       cairn_state_name(cairn_untag(max(cairn_tag(position,
           cairn_state_code('placement_group', event_type))))) AS state,
       cairn_value(max(cairn_at(position, payload ->> 'reason'))
                   FILTER (WHERE event_type = 'infeasible')) AS infeasible_reason,
       max(recorded_at) FILTER (WHERE event_type = 'created') AS created_at,
       max(recorded_at) FILTER (WHERE event_type = 'ready') AS ready_at,
       max(recorded_at) FILTER (WHERE event_type = 'removed') AS removed_at,
       max(position) AS last_position
  FROM events
 WHERE entity_kind = 'placement_group'
 GROUP BY entity_id;

-- The audit role reads the views (and the projections in their new schema).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_audit') THEN
        GRANT SELECT ON jobs, tasks, task_attempts, objects, functions, actors, actor_calls,
                        nodes, placement_groups TO cairn_audit;
        GRANT USAGE ON SCHEMA projection TO cairn_audit;
        GRANT SELECT ON ALL TABLES IN SCHEMA projection TO cairn_audit;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_audit keeps its grants: %', SQLERRM;
END
$$;
