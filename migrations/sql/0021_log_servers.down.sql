-- Back to one server (0020): only a log that lies on one server goes back.
DO $$
BEGIN
    IF (SELECT server_count FROM event_log_head WHERE id = 1) > 1 THEN
        RAISE EXCEPTION 'this log lies on % servers: only a log on one server can go back '
                        'to revision 0020', (SELECT server_count FROM event_log_head WHERE id = 1);
    END IF;
END
$$;

DROP FUNCTION cairn_append_after_v1(bigint, uuid[], text[], entity_kind[], text[], text[],
                                    text[], jsonb[], bytea[]);
DROP FUNCTION cairn_set_log_server_v1(integer, integer);
ALTER TABLE event_log_head DROP CONSTRAINT event_log_head_server,
    DROP COLUMN server_index, DROP COLUMN server_count;
