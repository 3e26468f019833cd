DROP INDEX IF EXISTS events_actor_calls_idx;
