-- Events addressed to their readers, so that each reads only its own (issue 20). A node
-- daemon follows the events whose payload names it: `to_node` (the node that must act:
-- a task placed there, a call forwarded to its actor, a kill of an actor it hosts; '*'
-- for what every node follows: membership and placement groups) or `owner_node` (the
-- node that owns the task or actor: what became of what it spilled or made elsewhere).
-- The global scheduler follows nodes, placement groups, spills, placements and what
-- became of the spilled. Each reader's query is an index scan over its own events
-- (controlplane/sql/queries.sql, read_events_for_node / read_events_for_scheduler);
-- the partial indexes hold only addressed events, so a private cluster's appends (none
-- addressed) pay nothing for them.
CREATE INDEX events_to_node_idx ON events ((payload ->> 'to_node'), position)
    WHERE payload ? 'to_node';
CREATE INDEX events_owner_node_idx ON events ((payload ->> 'owner_node'), position)
    WHERE payload ? 'owner_node';
CREATE INDEX events_scheduler_idx ON events (position)
    WHERE entity_kind IN ('node', 'placement_group')
       OR (entity_kind = 'task' AND event_type IN ('spilled', 'placed'))
       OR payload ? 'owner_node';
