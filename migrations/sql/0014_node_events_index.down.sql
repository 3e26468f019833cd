DROP INDEX IF EXISTS events_node_idx;
