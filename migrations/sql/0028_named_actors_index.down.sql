DROP INDEX IF EXISTS events_actor_names_idx;
