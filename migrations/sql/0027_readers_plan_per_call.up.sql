-- A reader's read is planned for its call again (migration 0025 had put
-- cairn_read_events_v1 on a generic plan with the append functions).
--
-- A generic plan is made once per session, from the statistics of that moment. A node
-- daemon's first read finds the hot partition new and nearly empty, and the generic
-- plan made then for "the events addressed to this node between two positions" scans
-- the partition's primary key over the whole range and filters, instead of reading the
-- partial indexes of migration 0017; it stayed so after the partition was analyzed
-- (measured: a node's read of its 1,000 events among 90,000 went through events_p..._pkey,
-- 10.9 ms). That is every event read by every node again, inside PostgreSQL: the growth
-- issue 20 removed. A custom plan sees the positions and the partition as they are.
-- The append functions stay on generic plans: each of their statements over `events`
-- has one index it can use (event_id), whatever the statistics.
ALTER FUNCTION cairn_read_events_v1(bigint[], integer, bigint, text, text)
    RESET plan_cache_mode;
