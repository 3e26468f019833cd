-- The state API (controlplane/state_api.py, Ray's ray.util.state): one query per kind
-- of entity, over the SQL views of migration 0009, each row one of Ray's state
-- dataclasses (controlplane/state_schema.py) by its field names, plus sort_key (the
-- order of the listing). state_api.py wraps a query as
--   SELECT <columns> FROM (<query>) s WHERE <filters> ORDER BY sort_key LIMIT n
-- so filters and limits run in PostgreSQL and nothing is truncated but by the limit.
-- Where Ray's names differ from Cairn's (task states, error types), the mapping is a
-- parameter (a JSON object, from state_api.py), so that it is written once.
--
-- A node's IP: its address is "host:port" of its gRPC service, or a socket path (a
-- node of a private cluster, which has none: 127.0.0.1), as sdk.nodes() says.

-- state_tasks --
-- One row per task attempt: the tasks view's row (its latest attempt), and, from
-- task_attempts, each earlier attempt (retried or rebuilt: FAILED unless it finished).
-- A failed attempt's error_message is its traceback where its failed event has one
-- (as Ray's), else the error's message.
-- $1: Cairn's task state -> Ray's TaskStatus; $2: Cairn's error kind -> Ray's error type.
SELECT x.task_id,
       x.attempt AS attempt_number,
       x.name,
       -- (an actor's call waits for its arguments, or for its turn at the actor, in
       -- Ray's actor task states)
       CASE WHEN x.actor_id IS NOT NULL AND x.method <> '__init__'
                 AND x.state = 'WAITING_FOR_DEPENDENCIES' THEN 'PENDING_ACTOR_TASK_ARGS_FETCH'
            WHEN x.actor_id IS NOT NULL AND x.method <> '__init__' AND x.state = 'SUBMITTED'
                 THEN 'PENDING_ACTOR_TASK_ORDERING_OR_CONCURRENCY'
            ELSE coalesce($1::jsonb ->> x.state, 'NIL') END AS state,
       x.job_id,
       x.actor_id,
       CASE WHEN x.actor_id IS NULL THEN 'NORMAL_TASK'
            WHEN x.method = '__init__' THEN 'ACTOR_CREATION_TASK'
            ELSE 'ACTOR_TASK' END AS type,
       CASE WHEN x.actor_id IS NULL THEN coalesce(s.payload ->> 'function_name', x.name)
            -- as Ray's: the class by its own name (its module left out), then the method
            ELSE coalesce(regexp_replace(a.class_name, '^.*\.', '') || '.' || x.method, x.name)
            END AS func_or_class_name,
       s.payload ->> 'parent_task_id' AS parent_task_id,
       x.node_id,
       x.worker_id,
       (SELECT (w.payload ->> 'pid')::int FROM events w
         WHERE w.entity_id = x.worker_id AND w.entity_kind = 'worker'
           AND w.event_type = 'started'
         ORDER BY w.position DESC LIMIT 1) AS worker_pid,
       CASE WHEN x.state = 'CANCELLED' THEN 'TASK_CANCELLED'
            WHEN x.state = 'FAILED' AND x.error IS NOT NULL
            THEN coalesce($2::jsonb ->> split_part(x.error, ': ', 1),
                          upper(split_part(x.error, ': ', 1))) END AS error_type,
       'PYTHON' AS language,
       s.payload -> 'resources' AS required_resources,
       s.payload -> 'runtime_env' AS runtime_env_info,
       s.payload ->> 'placement_group_id' AS placement_group_id,
       (SELECT jsonb_agg(jsonb_build_object(
                   'state', $1::jsonb ->> cairn_state_name(cairn_state_code('task', e.event_type)),
                   'created_ms', floor(extract(epoch FROM e.recorded_at) * 1000)::bigint)
                ORDER BY e.position)
          FROM events e
         WHERE e.entity_id = x.task_id AND e.entity_kind = 'task'
           AND cairn_state_code('task', e.event_type) IS NOT NULL
           AND cairn_attempt_of(e.event_type, e.payload) = x.attempt) AS events,
       NULL::jsonb AS profiling_data,
       floor(extract(epoch FROM x.submitted_at) * 1000)::bigint AS creation_time_ms,
       floor(extract(epoch FROM x.started_at) * 1000)::bigint AS start_time_ms,
       floor(extract(epoch FROM x.ended_at) * 1000)::bigint AS end_time_ms,
       NULL::jsonb AS task_log_info,
       CASE WHEN x.state = 'CANCELLED' THEN 'the task was cancelled'
            WHEN x.state = 'FAILED' AND f.traceback IS NOT NULL THEN f.traceback
            WHEN x.state = 'FAILED' AND strpos(x.error, ': ') > 0
            THEN substr(x.error, strpos(x.error, ': ') + 2)
            WHEN x.state = 'FAILED' THEN x.error END AS error_message,
       NULL::boolean AS is_debugger_paused,
       NULL::text AS call_site,
       s.payload -> 'label_selector' AS label_selector,
       x.sort_key
  FROM (SELECT t.task_id, t.attempt, t.name, t.state, t.job_id, t.actor_id, t.method,
               t.node_id, t.worker_id, t.error, t.submitted_at,
               CASE WHEN t.state IN ('RUNNING', 'FINISHED', 'FAILED', 'CANCELLED')
                    THEN t.started_at END AS started_at,
               CASE WHEN t.state IN ('FINISHED', 'FAILED', 'CANCELLED')
                    THEN t.ended_at END AS ended_at,
               floor(extract(epoch FROM t.submitted_at) * 1000000)::bigint * 1000 + t.attempt
                   AS sort_key
          FROM tasks t
        UNION ALL
        SELECT r.task_id, r.attempt, t.name,
               CASE r.outcome WHEN 'FINISHED' THEN 'FINISHED' WHEN 'RUNNING' THEN 'RUNNING'
                              ELSE 'FAILED' END,
               t.job_id, t.actor_id, t.method, r.node_id, r.worker_id,
               coalesce(r.error, r.retry_reason), t.submitted_at, r.started_at, r.ended_at,
               floor(extract(epoch FROM t.submitted_at) * 1000000)::bigint * 1000 + r.attempt
          FROM task_attempts r
          JOIN tasks t ON t.task_id = r.task_id AND r.attempt < t.attempt) x
  LEFT JOIN LATERAL (SELECT payload FROM events
                      WHERE entity_id = x.task_id AND entity_kind = 'task'
                        AND event_type = 'submitted'
                      ORDER BY position LIMIT 1) s ON true
  LEFT JOIN LATERAL (SELECT class_name FROM actors WHERE actors.actor_id = x.actor_id) a
    ON true
  LEFT JOIN LATERAL (SELECT payload ->> 'traceback' AS traceback FROM events
                      WHERE entity_id = x.task_id AND entity_kind = 'task'
                        AND event_type = 'failed' AND payload ->> 'attempt' = x.attempt::text
                      ORDER BY position DESC LIMIT 1) f ON x.state = 'FAILED'

-- state_actors --
-- (an actor whose name is claimed in a cluster and which is not made yet is left out)
SELECT a.actor_id,
       a.class_name,
       a.state,
       a.job_id,
       coalesce(a.name, '') AS name,
       a.node_id,
       (SELECT (w.payload ->> 'pid')::int FROM events w
         WHERE w.entity_id = a.worker_id AND w.entity_kind = 'worker'
           AND w.event_type = 'started'
         ORDER BY w.position DESC LIMIT 1) AS pid,
       a.namespace AS ray_namespace,
       NULL::text AS serialized_runtime_env,
       c.payload -> 'resources' AS required_resources,
       CASE WHEN a.state = 'DEAD' THEN jsonb_build_object(
           'actor_died_error_context',
           jsonb_build_object('error_message', a.death_cause, 'actor_id', a.actor_id,
                              'class_name', a.class_name, 'name', coalesce(a.name, ''),
                              'ray_namespace', a.namespace, 'node_id', a.node_id))
       END AS death_cause,
       (r.payload ->> 'detached')::boolean AS is_detached,
       c.payload ->> 'placement_group_id' AS placement_group_id,
       '' AS repr_name,
       a.num_restarts,
       0 AS num_restarts_due_to_lineage_reconstruction,
       floor(extract(epoch FROM a.created_at) * 1000)::bigint AS sort_key
  FROM actors a
  LEFT JOIN LATERAL (SELECT payload FROM events
                      WHERE payload ->> 'actor_id' = a.actor_id AND entity_kind = 'task'
                        AND event_type = 'submitted' AND payload ? 'actor_id'
                        AND payload ->> 'method' = '__init__'
                      ORDER BY position LIMIT 1) c ON true
  LEFT JOIN LATERAL (SELECT payload FROM events
                      WHERE entity_id = a.actor_id AND entity_kind = 'actor'
                        AND event_type = 'creation_requested'
                      ORDER BY position LIMIT 1) r ON true
 WHERE a.class_name IS NOT NULL

-- state_objects --
-- Every object the log knows, freed ones too (Ray lists the referenced ones); Cairn's
-- own columns (state, job_id, task_id, node_id, locations) after Ray's.
-- $1: Cairn's task state -> Ray's TaskStatus (of the task that made it; NIL for a put).
SELECT o.object_id,
       o.size_bytes AS object_size,
       CASE WHEN o.task_id IS NULL THEN 'NIL'
            ELSE coalesce($1::jsonb ->> t.state, 'NIL') END AS task_status,
       'UNKNOWN_STATUS' AS reference_type,
       'disabled' AS call_site,
       NULL::text AS type,
       NULL::int AS pid,
       CASE WHEN n.address ~ ':[0-9]+$' THEN btrim(regexp_replace(n.address, ':[0-9]+$', ''), '[]')
            WHEN n.address IS NOT NULL THEN '127.0.0.1' END AS ip,
       o.state,
       o.job_id,
       o.task_id,
       o.node_id,
       to_jsonb(o.locations) AS locations,
       floor(extract(epoch FROM o.created_at) * 1000)::bigint AS created_time_ms,
       o.last_position AS sort_key
  FROM objects o
  LEFT JOIN LATERAL (SELECT state FROM tasks WHERE tasks.task_id = o.task_id) t ON true
  LEFT JOIN LATERAL (SELECT address FROM nodes WHERE nodes.node_id = o.node_id) n ON true

-- state_nodes --
SELECT n.node_id,
       CASE WHEN n.address ~ ':[0-9]+$' THEN btrim(regexp_replace(n.address, ':[0-9]+$', ''), '[]')
            ELSE '127.0.0.1' END AS node_ip,
       coalesce((r.payload ->> 'head')::boolean, false)
           OR coalesce(n.resources ? 'node:__internal_head__', false) AS is_head_node,
       CASE n.state WHEN 'ALIVE' THEN 'ALIVE' ELSE 'DEAD' END AS state,
       n.death_cause AS state_message,
       CASE WHEN n.address ~ ':[0-9]+$' THEN btrim(regexp_replace(n.address, ':[0-9]+$', ''), '[]')
            ELSE '127.0.0.1' END AS node_name,
       coalesce(n.resources, '{}'::jsonb) AS resources_total,
       coalesce(r.payload -> 'labels', '{}'::jsonb)
           || jsonb_build_object('ray.io/node-id', n.node_id) AS labels,
       floor(extract(epoch FROM n.registered_at) * 1000)::bigint AS start_time_ms,
       floor(extract(epoch FROM n.dead_at) * 1000)::bigint AS end_time_ms,
       floor(extract(epoch FROM n.registered_at) * 1000)::bigint AS sort_key
  FROM nodes n
  LEFT JOIN LATERAL (SELECT payload FROM events
                      WHERE entity_id = n.node_id AND entity_kind = 'node'
                        AND event_type = 'registered'
                      ORDER BY position DESC LIMIT 1) r ON true

-- state_jobs --
-- Drivers' jobs: Ray's type SUBMISSION for a driver a job submission started (its
-- submission's id, entrypoint, metadata and runtime_env), DRIVER for the others.
SELECT j.job_id,
       sub.submission_id,
       coalesce(sub.payload ->> 'entrypoint', j.entrypoint) AS entrypoint,
       CASE WHEN sub.submission_id IS NULL THEN 'DRIVER' ELSE 'SUBMISSION' END AS type,
       j.state AS status,
       j.error AS message,
       NULL::text AS error_type,
       jsonb_build_object(
           'id', j.job_id,
           'node_ip_address',
           CASE WHEN n.address ~ ':[0-9]+$' THEN btrim(regexp_replace(n.address, ':[0-9]+$', ''), '[]')
                WHEN n.address IS NOT NULL THEN '127.0.0.1' END) AS driver_info,
       floor(extract(epoch FROM coalesce(j.started_at, j.submitted_at)) * 1000)::bigint AS start_time,
       floor(extract(epoch FROM j.ended_at) * 1000)::bigint AS end_time,
       coalesce(sub.payload -> 'metadata', '{}'::jsonb) AS metadata,
       sub.payload -> 'runtime_env' AS runtime_env,
       NULL::text AS driver_agent_http_address,
       j.driver_node_id,
       NULL::int AS driver_exit_code,
       floor(extract(epoch FROM j.submitted_at) * 1000)::bigint AS sort_key
  FROM jobs j
  LEFT JOIN LATERAL (SELECT address FROM nodes WHERE nodes.node_id = j.driver_node_id) n ON true
  LEFT JOIN LATERAL (
        SELECT d.payload ->> 'submission_id' AS submission_id,
               (SELECT e.payload FROM events e
                 WHERE e.entity_kind = 'submission' AND e.event_type = 'submitted'
                   AND e.entity_id = d.payload ->> 'submission_id'
                 ORDER BY e.position LIMIT 1) AS payload
          FROM events d
         WHERE d.entity_kind = 'job' AND d.entity_id = j.job_id AND d.event_type = 'submitted'
         ORDER BY d.position LIMIT 1) sub ON true

-- state_placement_groups --
-- Ray has no INFEASIBLE state for a group: it stays PENDING (stats say why).
SELECT g.placement_group_id,
       coalesce(g.name, '') AS name,
       g.job_id AS creator_job_id,
       CASE g.state WHEN 'INFEASIBLE' THEN 'PENDING' ELSE g.state END AS state,
       (SELECT jsonb_agg(jsonb_build_object(
                   'bundle_id', g.placement_group_id || '_' || (b.i - 1),
                   'node_id', g.bundle_nodes ->> (b.i - 1)::int,
                   'unit_resources', b.resources) ORDER BY b.i)
          FROM jsonb_array_elements(g.bundles) WITH ORDINALITY AS b(resources, i)) AS bundles,
       NULL::boolean AS is_detached,
       jsonb_build_object(
           'scheduling_state',
           CASE g.state WHEN 'CREATED' THEN 'FINISHED' WHEN 'REMOVED' THEN 'REMOVED'
                        WHEN 'INFEASIBLE' THEN 'INFEASIBLE' ELSE 'QUEUED' END,
           'infeasible_reason', g.infeasible_reason,
           'end_to_end_creation_latency_ms',
           floor(extract(epoch FROM g.ready_at - g.created_at) * 1000)::bigint) AS stats,
       g.strategy,
       floor(extract(epoch FROM g.created_at) * 1000)::bigint AS sort_key
  FROM placement_groups g

-- state_workers --
-- Worker processes, from their own events (started, died); one whose node is dead
-- without a `died` event of its own went with its node. Drivers are not listed.
SELECT w.entity_id AS worker_id,
       d.position IS NULL AND n.state = 'ALIVE' AS is_alive,
       'WORKER' AS worker_type,
       CASE WHEN d.position IS NOT NULL
            THEN CASE WHEN (d.payload ->> 'exit_code')::int = 0
                        OR d.payload ->> 'cause' = 'retired' THEN 'INTENDED_SYSTEM_EXIT'
                      ELSE 'SYSTEM_ERROR' END
            WHEN n.state IS DISTINCT FROM 'ALIVE'
            THEN CASE WHEN n.death_cause = 'shutdown' THEN 'INTENDED_SYSTEM_EXIT'
                      ELSE 'SYSTEM_ERROR' END END AS exit_type,
       w.node_id,
       CASE WHEN n.address ~ ':[0-9]+$' THEN btrim(regexp_replace(n.address, ':[0-9]+$', ''), '[]')
            ELSE '127.0.0.1' END AS ip,
       (w.payload ->> 'pid')::int AS pid,
       CASE WHEN d.position IS NOT NULL
            THEN (d.payload ->> 'cause')
                 || coalesce(' (exit code ' || (d.payload ->> 'exit_code') || ')', '')
            WHEN n.state IS DISTINCT FROM 'ALIVE'
            THEN 'its node is dead: ' || coalesce(n.death_cause, 'unknown') END AS exit_detail,
       NULL::bigint AS worker_launch_time_ms,
       floor(extract(epoch FROM w.recorded_at) * 1000)::bigint AS worker_launched_time_ms,
       floor(extract(epoch FROM w.recorded_at) * 1000)::bigint AS start_time_ms,
       floor(extract(epoch FROM coalesce(d.recorded_at, n.dead_at)) * 1000)::bigint AS end_time_ms,
       NULL::int AS debugger_port,
       NULL::int AS num_paused_threads,
       w.position AS sort_key
  FROM events w
  LEFT JOIN LATERAL (SELECT position, payload, recorded_at FROM events
                      WHERE entity_id = w.entity_id AND entity_kind = 'worker'
                        AND event_type = 'died'
                      ORDER BY position LIMIT 1) d ON true
  LEFT JOIN LATERAL (SELECT state, address, death_cause, dead_at FROM nodes
                      WHERE nodes.node_id = w.node_id) n ON true
 WHERE w.entity_kind = 'worker' AND w.event_type = 'started'

-- log_seen --
-- The highest position in the log, in the snapshot an answer was read in: past every
-- event it was made of, so the reader's clock moves past them (controlplane/README.md,
-- "A log on several servers"; dataplane/protocol.py, LogSeen).
SELECT coalesce(max(position), 0) FROM events
