DO $$
DECLARE
    v_function text;
BEGIN
    FOREACH v_function IN ARRAY ARRAY[
        'cairn_append_v2(uuid[], text[], entity_kind[], text[], text[], text[], jsonb[], bytea[])',
        'cairn_append_fenced_v2(text, uuid[], text[], entity_kind[], text[], text[], text[], '
            'jsonb[], bytea[])',
        'cairn_append_after_v1(bigint, uuid[], text[], entity_kind[], text[], text[], text[], '
            'jsonb[], bytea[])',
        'cairn_append_fenced_after_v1(text, bigint, uuid[], text[], entity_kind[], text[], '
            'text[], text[], jsonb[], bytea[])',
        'cairn_read_events_v1(bigint[], integer, bigint, text, text)'
    ] LOOP
        EXECUTE format('ALTER FUNCTION %s RESET plan_cache_mode', v_function);
    END LOOP;
END
$$;
