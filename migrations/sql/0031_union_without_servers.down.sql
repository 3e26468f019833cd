DROP FUNCTION cairn_log_union_without_v1(smallint[]);

-- log_union's maker as 0030 made it
CREATE OR REPLACE FUNCTION cairn_make_log_union_v1() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_home    name := (SELECT n.nspname FROM pg_class c
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.oid = 'events'::regclass);
    v_others  text;
    v_names   name[];
    v_bodies  text[];
    v_done    name[] := '{}';
    v_grantee text;
    v_more    boolean := true;
    i         integer;
BEGIN
    PERFORM pg_advisory_xact_lock(7165064707736470273);  -- one maker at a time
    SELECT string_agg(format(' UNION ALL SELECT * FROM %I.events', n.nspname), ''
                      ORDER BY n.nspname)
      INTO v_others
      FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid
     WHERE n.nspname LIKE 'log\_server\_%' AND c.relname = 'events' AND c.relkind = 'f';
    -- the views as the log's schema reads them (names unqualified: they bind anew below)
    SELECT array_agg(c.relname ORDER BY c.oid), array_agg(pg_get_viewdef(c.oid) ORDER BY c.oid)
      INTO v_names, v_bodies
      FROM pg_class c WHERE c.relnamespace = v_home::regnamespace AND c.relkind = 'v'
       AND c.relname <> 'recent_event_ids';  -- (not the log's: 0030)
    DROP SCHEMA IF EXISTS log_union CASCADE;
    CREATE SCHEMA log_union;
    EXECUTE format('CREATE VIEW log_union.events AS SELECT * FROM %I.events%s',
                   v_home, coalesce(v_others, ''));
    PERFORM set_config('search_path', format('log_union, %I, pg_temp', v_home), true);
    WHILE v_more LOOP  -- a view once the views it reads are made
        v_more := false;
        FOR i IN 1 .. coalesce(cardinality(v_names), 0) LOOP
            CONTINUE WHEN v_names[i] = ANY (v_done);
            CONTINUE WHEN EXISTS (
                SELECT 1 FROM pg_rewrite r
                  JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                  JOIN pg_class used ON used.oid = d.refobjid
                 WHERE r.ev_class = format('%I.%I', v_home, v_names[i])::regclass
                   AND used.relkind = 'v' AND used.oid <> r.ev_class
                   AND used.relnamespace = v_home::regnamespace
                   AND NOT used.relname = ANY (v_done));
            EXECUTE format('CREATE VIEW log_union.%I AS %s', v_names[i], v_bodies[i]);
            v_done := v_done || v_names[i];
            v_more := true;
        END LOOP;
    END LOOP;
    FOREACH v_grantee IN ARRAY ARRAY['cairn_runtime', 'cairn_audit'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_grantee);
        EXECUTE format('GRANT USAGE ON SCHEMA log_union TO %I', v_grantee);
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA log_union TO %I', v_grantee);
    END LOOP;
    RETURN cardinality(v_done);
END;
$$;

DROP FUNCTION cairn_log_views_v1();
DROP FUNCTION cairn_log_union_events_v1(smallint[]);
