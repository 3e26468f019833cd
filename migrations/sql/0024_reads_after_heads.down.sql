DROP FUNCTION cairn_read_events_v1(bigint[], integer, bigint, text, text);
