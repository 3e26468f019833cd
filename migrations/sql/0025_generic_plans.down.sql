ALTER FUNCTION cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[], bytea[])
    RESET plan_cache_mode;
ALTER FUNCTION cairn_append_fenced_v2(text, uuid[], text[], entity_kind[], text[], text[], text[],
    jsonb[], bytea[])
    RESET plan_cache_mode;
ALTER FUNCTION cairn_append_after_v1(bigint, uuid[], text[], entity_kind[], text[], text[], text[],
    jsonb[], bytea[])
    RESET plan_cache_mode;
ALTER FUNCTION cairn_append_fenced_after_v1(text, bigint, uuid[], text[], entity_kind[], text[], text[],
    text[], jsonb[], bytea[])
    RESET plan_cache_mode;
ALTER FUNCTION cairn_read_events_v1(bigint[], integer, bigint, text, text)
    RESET plan_cache_mode;
