-- The nodes' events, fast: ray.nodes(), cairn status and every daemon's join read the
-- cluster's membership (registrations, deaths, each node's latest heartbeat), which would
-- otherwise scan the whole log. Partial: only node events are indexed, so other appends
-- pay nothing.
CREATE INDEX events_node_idx ON events (entity_id, position) WHERE entity_kind = 'node';
