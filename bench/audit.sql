-- The synthetic log of bench/audit.py, written in one statement per part with
-- generate_series (`-- name --` blocks, loaded like controlplane/sql/queries.sql).
--
-- Events go straight into `events` with positions after the head and the head moved
-- past them in the same transaction (as cairn_append_v1 does), because the append
-- function stamps a whole batch with one time and the audit queries need times spread
-- as a real run spreads them: one task submitted every 4 ms.
--
-- Parameters: $1 tasks, $2 start time, $3 length of the lineage chain (tasks 1..$3 each
-- take the previous one's result), $4 the task number at which node-07 dies.

-- bench_events --
WITH head AS (SELECT last_position AS base FROM event_log_shards WHERE shard = 0),
task AS (
    SELECT i,
           md5('task' || i) AS task_id,
           'job-' || lpad((i % 10)::text, 2, '0') AS job_id,
           'bench.f' || lpad((i % 20)::text, 2, '0') AS fn,
           $2::timestamptz + i * interval '4 ms' AS submitted_at,
           -- duration: 10..200 ms by function, times 1..2 by a hash of the task
           ((i % 20) + 1) * interval '10 ms' * (1 + (abs(hashint4(i)) % 100) / 100.0) AS dur,
           CASE WHEN i % 8 = 7 AND i > $4 THEN 'node-0' || (i % 7) ELSE 'node-0' || (i % 8) END
               AS node,
           CASE WHEN i <= $3 AND i > 1 THEN jsonb_build_array(md5('task' || (i - 1)) || '00000001')
                WHEN i = 1 THEN jsonb_build_array(md5('put') || '00000000')
                ELSE '[]'::jsonb END AS deps,
           CASE WHEN i % 8 = 7 AND i BETWEEN $4 - 60 AND $4 THEN 'node_died'
                WHEN i % 100 = 50 THEN 'retried'
                WHEN i % 1000 = 999 THEN 'failed'
                ELSE 'finished' END AS fate
      FROM generate_series(1, $1::int) AS i
),
death AS (SELECT $2::timestamptz + $4 * interval '4 ms' + interval '250 ms' AS at),
timed AS (  -- attempt 0 ends at end0; a retried task's attempt 1 runs on node1 from start1
    SELECT t.*,
           CASE WHEN t.fate = 'node_died' THEN d.at ELSE t.submitted_at + interval '2 ms' + t.dur END
               AS end0,
           CASE WHEN t.fate = 'node_died' THEN 'node-0' || (t.i % 7) ELSE t.node END AS node1,
           CASE WHEN t.fate = 'node_died' THEN d.at + interval '1500 ms'
                ELSE t.submitted_at + interval '3 ms' + t.dur END AS start1
      FROM task t, death d
),
ev AS (
    SELECT t.i, e.k, e.at, e.kind, e.entity_id, e.event_type, e.node_id, e.job_id, e.payload
      FROM timed t
     CROSS JOIN LATERAL (VALUES
        (0, t.submitted_at, 'task', t.task_id, 'submitted', t.node, t.job_id,
         jsonb_build_object('name', t.fn, 'function', md5(t.fn), 'num_returns', 1,
                            'max_retries', 3, 'resources', '{"CPU": 1}'::jsonb,
                            'dependencies', t.deps,
                            'options', '{"retry_exceptions": true}'::jsonb), true),
        (1, t.submitted_at + interval '1 ms', 'task', t.task_id, 'scheduled', t.node, NULL,
         '{"attempt": 0}'::jsonb, true),
        (2, t.submitted_at + interval '2 ms', 'task', t.task_id, 'running', t.node, NULL,
         jsonb_build_object('worker_id', t.node || '-w' || (t.i % 2), 'attempt', 0), true),
        (3, t.end0, 'task', t.task_id, 'finished', t.node, t.job_id,
         jsonb_build_object('attempt', 0, 'output_digest', md5('out' || t.i)),
         t.fate = 'finished'),
        (3, t.end0, 'task', t.task_id, 'failed', t.node, t.job_id,
         '{"error": "task_error: RuntimeError: boom", "attempt": 0}'::jsonb, t.fate = 'failed'),
        (3, t.end0 + interval '1 ms', 'task', t.task_id, 'retried', NULL, NULL,
         jsonb_build_object('attempt', 1, 'reason',
             CASE WHEN t.fate = 'node_died' THEN 'node node-07 died'
                  ELSE 'task_error: ValueError: flaky' END),
         t.fate IN ('retried', 'node_died')),
        (4, t.start1 - interval '1 ms', 'task', t.task_id, 'scheduled', t.node1, NULL,
         '{"attempt": 1}'::jsonb, t.fate IN ('retried', 'node_died')),
        (5, t.start1, 'task', t.task_id, 'running', t.node1, NULL,
         jsonb_build_object('worker_id', t.node1 || '-w' || (t.i % 2), 'attempt', 1),
         t.fate IN ('retried', 'node_died')),
        (6, t.start1 + t.dur, 'task', t.task_id, 'finished', t.node1, t.job_id,
         jsonb_build_object('attempt', 1, 'output_digest', md5('out' || t.i)),
         t.fate IN ('retried', 'node_died')),
        (7, CASE WHEN t.fate = 'finished' THEN t.end0 ELSE t.start1 + t.dur END, 'object',
         t.task_id || '00000001', 'created',
         CASE WHEN t.fate = 'finished' THEN t.node ELSE t.node1 END, t.job_id,
         jsonb_build_object('size_bytes', 1000 + t.i % 5000, 'task_id', t.task_id,
                            'inline', true), t.fate <> 'failed')
     ) AS e(k, at, kind, entity_id, event_type, node_id, job_id, payload, included)
     WHERE e.included
  UNION ALL  -- the jobs, the nodes, the put the chain starts from, node-07's death
    SELECT -1, 0, $2::timestamptz - interval '1 s', 'node', 'node-0' || n, 'registered',
           'node-0' || n, NULL,
           jsonb_build_object('address', '10.0.0.' || n || ':7000', 'resources',
                              '{"CPU": 2}'::jsonb)
      FROM generate_series(0, 7) AS n
  UNION ALL
    SELECT -1, 1 + s.k, $2::timestamptz - interval '500 ms' + s.k * interval '1 ms', 'job',
           'job-' || lpad(j::text, 2, '0'), s.event_type, NULL, 'job-' || lpad(j::text, 2, '0'),
           s.payload
      FROM generate_series(0, 9) AS j
     CROSS JOIN (VALUES (0, 'submitted', '{"entrypoint": "python bench.py"}'::jsonb),
                        (1, 'started', '{}'::jsonb)) AS s(k, event_type, payload)
  UNION ALL
    SELECT -1, 3, $2::timestamptz - interval '100 ms', 'object', md5('put') || '00000000',
           'created', 'node-00', 'job-01', '{"size_bytes": 8, "inline": true}'::jsonb
  UNION ALL
    SELECT -1, 4, d.at, 'node', 'node-07', 'dead', 'node-07', NULL,
           '{"cause": "missed heartbeats"}'::jsonb
      FROM death d
  UNION ALL
    SELECT -1, 5, $2::timestamptz + ($1 + 500) * interval '4 ms', 'job',
           'job-' || lpad(j::text, 2, '0'), 'finished', NULL, 'job-' || lpad(j::text, 2, '0'),
           '{}'::jsonb
      FROM generate_series(0, 9) AS j
)
INSERT INTO events (position, event_id, recorded_at, job_id, entity_kind, entity_id,
                    event_type, node_id, payload)
SELECT (SELECT base FROM head) + row_number() OVER (ORDER BY at, i, k), gen_random_uuid(), at,
       job_id, kind::entity_kind, entity_id, event_type, node_id, payload
  FROM ev

-- bench_move_head --
UPDATE event_log_shards SET last_position = (SELECT max(position) FROM events) WHERE shard = 0

-- bench_log_size --
SELECT count(*) AS events,
       count(*) FILTER (WHERE entity_kind = 'task') AS task_events,
       (SELECT sum(pg_total_relation_size(inhrelid))::bigint FROM pg_inherits
         WHERE inhparent = 'events'::regclass) AS table_bytes
  FROM events
