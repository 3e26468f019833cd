DROP INDEX IF EXISTS events_scheduler_idx;
DROP INDEX IF EXISTS events_owner_node_idx;
DROP INDEX IF EXISTS events_to_node_idx;
