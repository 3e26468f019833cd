-- Fewer events per task (issue 20, point 4): a task scheduled and run in one commit is
-- logged as one `running` event with "scheduled": true, no `scheduled` event before it.
-- The tasks view's scheduled_at counts that event too, so it answers as before (older
-- logs keep their `scheduled` events, which still count).
CREATE OR REPLACE VIEW tasks AS
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
       max(recorded_at) FILTER (WHERE event_type IN ('scheduled', 'placed')
                                   OR (event_type = 'running' AND payload ? 'scheduled'))
           AS scheduled_at,
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
