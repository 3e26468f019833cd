ALTER FUNCTION cairn_read_events_v1(bigint[], integer, bigint, text, text)
    SET plan_cache_mode = force_generic_plan;
