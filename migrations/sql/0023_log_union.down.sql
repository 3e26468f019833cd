-- Back to 0022: the union and the servers' addresses go (a log on several servers cannot
-- go back past 0021 anyway).
DROP SCHEMA log_union CASCADE;
DROP FUNCTION cairn_make_log_union_v1();
DROP TABLE log_servers;
