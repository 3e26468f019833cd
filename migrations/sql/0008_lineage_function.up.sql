-- The task whose return an object is (NULL for a put): its `created` event says so;
-- an object not created yet is named after its task (task id + 8 hex digits, 00000000
-- for puts).
CREATE FUNCTION cairn_creating_task(p_object_id text) RETURNS text
LANGUAGE sql STABLE AS $$
SELECT COALESCE(
    (SELECT payload ->> 'task_id' FROM events
      WHERE entity_id = p_object_id AND event_type = 'created' AND entity_kind = 'object'
      ORDER BY position LIMIT 1),
    CASE WHEN length(p_object_id) > 8 AND right(p_object_id, 8) <> '00000000'
         THEN left(p_object_id, length(p_object_id) - 8) END)
$$;

-- lineage(object_id): the object, the task that made it, that task's argument objects,
-- the tasks that made them, and so on up to objects with no task (puts), each with its
-- depth (0: the object asked for). Read from the log alone: `created` events name an
-- object's task (else its id does: a task's returns are its id and an index), and
-- `submitted` events list a task's argument objects. What `cairn lineage` shows, and
-- what lineage reconstruction re-runs.
CREATE FUNCTION lineage(p_object_id text)
RETURNS TABLE (
    depth         int,
    object_id     text,
    task_id       text,
    function_name text,
    node_id       text,
    submitted_at  timestamptz
)
LANGUAGE sql STABLE AS $$
WITH RECURSIVE walk(depth, object_id, task_id) AS (
    SELECT 0, p_object_id, cairn_creating_task(p_object_id)
  UNION
    SELECT w.depth + 1, argument.id, cairn_creating_task(argument.id)
      FROM walk w
      JOIN events s
        ON s.entity_id = w.task_id AND s.event_type = 'submitted' AND s.entity_kind = 'task'
     CROSS JOIN LATERAL jsonb_array_elements_text(s.payload -> 'dependencies') AS argument(id)
     WHERE w.task_id IS NOT NULL
)
SELECT w.depth, w.object_id, w.task_id, s.payload ->> 'name', s.node_id, s.recorded_at
  FROM walk w
  LEFT JOIN LATERAL (
        SELECT payload, node_id, recorded_at FROM events
         WHERE entity_id = w.task_id AND event_type = 'submitted' AND entity_kind = 'task'
         ORDER BY position LIMIT 1) s ON true
 ORDER BY w.depth, w.object_id;
$$;
