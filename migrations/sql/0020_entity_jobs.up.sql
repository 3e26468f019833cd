-- An entity's events always in one shard (issue 20). A task, object, actor or
-- placement group belongs to one job, and its first event names it (`submitted`,
-- `created`, ...); a later event's writer may not know the job (a node freeing an object
-- it fetched, or marking one lost). The appends pass their job ids through this function
-- (controlplane/sql/queries.sql, append_events): an event of such an entity that names
-- no job gets the job another event of the batch, or the entity's stored history, names.
-- So the event is in its job's shard (cairn_shard_of_v1), and `job_id` says the same
-- thing whatever the number of shards. Events of nodes, workers, jobs and submissions
-- name no job and stay in shard 0.
--
-- Writers name the job where they know it (every task and actor event does), so the
-- look-up in `events` (events_entity_idx) is the exception; a batch with nothing to fill
-- costs one pass over its arrays.
CREATE FUNCTION cairn_jobs_of_v1(p_job_ids text[], p_kinds entity_kind[],
                                 p_entity_ids text[]) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN NOT EXISTS (
            SELECT 1 FROM unnest(p_job_ids, p_kinds) AS u(job_id, kind)
             WHERE u.job_id IS NULL
               AND u.kind IN ('task', 'object', 'actor', 'placement_group'))
        THEN p_job_ids
        ELSE (SELECT array_agg(
                         CASE WHEN u.job_id IS NOT NULL
                                OR u.kind NOT IN ('task', 'object', 'actor', 'placement_group')
                              THEN u.job_id
                              ELSE coalesce(
                                  (SELECT b.job_id
                                     FROM unnest(p_job_ids, p_kinds, p_entity_ids)
                                          AS b(job_id, kind, entity_id)
                                    WHERE b.entity_id = u.entity_id AND b.kind = u.kind
                                      AND b.job_id IS NOT NULL
                                    LIMIT 1),
                                  (SELECT e.job_id FROM events e
                                    WHERE e.entity_id = u.entity_id
                                      AND e.entity_kind = u.kind
                                      AND e.job_id IS NOT NULL
                                    LIMIT 1))
                         END ORDER BY u.ord)
                FROM unnest(p_job_ids, p_kinds, p_entity_ids) WITH ORDINALITY
                     AS u(job_id, kind, entity_id, ord))
    END
$$;
