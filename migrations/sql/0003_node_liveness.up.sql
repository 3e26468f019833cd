-- Node liveness: each node daemon pings its row a few times a second; a monitor
-- declares a node dead when its pings stop. Pings are not state transitions, so they
-- update this row in place instead of appending to the log; what the log records is
-- registration, load changes (heartbeat events, at a bounded rate) and the death.
CREATE TABLE node_liveness (
    node_id    text PRIMARY KEY,
    address    text NOT NULL,
    last_ping  timestamptz NOT NULL DEFAULT clock_timestamp(),
    dead_at    timestamptz
) WITH (fillfactor = 50);  -- room for in-place (HOT) updates of the ping time

-- The nodes projection shows each node's latest load (from its heartbeat events).
ALTER TABLE nodes ADD COLUMN available jsonb, ADD COLUMN load jsonb;
