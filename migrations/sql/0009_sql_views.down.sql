DROP VIEW IF EXISTS placement_groups, nodes, actor_calls, actors, functions, objects,
                    task_attempts, tasks, jobs;
DROP STATISTICS IF EXISTS events_attempt_of_stats;
DROP FUNCTION IF EXISTS cairn_attempt_of(text, jsonb);
DROP FUNCTION IF EXISTS cairn_attempt(jsonb);
DROP FUNCTION IF EXISTS cairn_state_name(int);
DROP FUNCTION IF EXISTS cairn_state_code(entity_kind, text);
DROP FUNCTION IF EXISTS cairn_value(text);
DROP FUNCTION IF EXISTS cairn_at(bigint, text);
DROP FUNCTION IF EXISTS cairn_untag(bigint);
DROP FUNCTION IF EXISTS cairn_tag(bigint, int);
ALTER TABLE projection.jobs SET SCHEMA public;
ALTER TABLE projection.tasks SET SCHEMA public;
ALTER TABLE projection.objects SET SCHEMA public;
ALTER TABLE projection.actors SET SCHEMA public;
ALTER TABLE projection.nodes SET SCHEMA public;
DROP SCHEMA projection;
