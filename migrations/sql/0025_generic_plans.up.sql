-- The log's append and read functions run on generic plans (issue 20: appends of one
-- event, and readers woken for a few, were mostly planning).
--
-- PL/pgSQL keeps each statement's plan in the session's plan cache, which makes a custom
-- plan for the first five executions and then keeps making one whenever a custom plan's
-- estimated cost is below the generic plan's. For these functions' statements it always
-- was (a custom plan sees the one event id to check, or a reader's positions), so every
-- call planned every statement again: over `events`, a partitioned table with eleven
-- indexes on every partition, partial ones among them whose predicates the planner tests
-- one by one. Measured on a 2-vCPU VM (synchronous_commit off, to leave the fsync out):
-- an append of one event 626 -> 403 us, a node's read of 4 events 924 -> 309 us, with the
-- same plans' results; an append of 1000 events the same either way.
--
-- A generic plan is checked before each use as any cached plan is: a partition attached
-- since it was made invalidates it (so migration 0024's reasoning holds), and run-time
-- pruning still skips the partitions outside a reader's positions.
ALTER FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[], bytea[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION cairn_append_fenced_v2(text, uuid[], text[], entity_kind[], text[], text[], text[],
    jsonb[], bytea[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION cairn_append_after_v1(bigint, uuid[], text[], entity_kind[], text[], text[], text[],
    jsonb[], bytea[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION cairn_append_fenced_after_v1(text, bigint, uuid[], text[], entity_kind[], text[], text[],
    text[], jsonb[], bytea[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION cairn_read_events_v1(bigint[], integer, bigint, text, text)
    SET plan_cache_mode = force_generic_plan;
