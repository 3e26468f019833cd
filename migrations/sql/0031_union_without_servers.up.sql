-- Audit queries while a server of the log does not answer (issue 20; controlplane/
-- README.md, "A log on several servers"). log_union (0023) reads every server, so a
-- query through it fails while one is away, naming it; cairn_log_union_without_v1 makes
-- the same union without the servers named, as temporary views of the caller's session
-- (`cairn sql --without-server K`), which shadow log_union's for that session alone.

-- The views of the log's schema that a union makes again (not recent_event_ids: 0030),
-- each after the views it reads, with their definitions as the log's schema reads them
-- (names unqualified: they bind anew where they are made).
CREATE FUNCTION cairn_log_views_v1(OUT name name, OUT body text) RETURNS SETOF record
LANGUAGE plpgsql AS $$
DECLARE
    v_home   name := (SELECT n.nspname FROM pg_class c
                        JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE c.oid = 'events'::regclass);
    v_names  name[];
    v_bodies text[];
    v_done   name[] := '{}';
    v_more   boolean := true;
    i        integer;
BEGIN
    SELECT array_agg(c.relname ORDER BY c.oid), array_agg(pg_get_viewdef(c.oid) ORDER BY c.oid)
      INTO v_names, v_bodies
      FROM pg_class c WHERE c.relnamespace = v_home::regnamespace AND c.relkind = 'v'
       AND c.relname <> 'recent_event_ids';
    WHILE v_more LOOP  -- a view once the views it reads are given
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
            name := v_names[i];
            body := v_bodies[i];
            RETURN NEXT;
            v_done := v_done || v_names[i];
            v_more := true;
        END LOOP;
    END LOOP;
END;
$$;

-- The statement of the union's `events`: this server's and every other server's
-- (their foreign tables, log_server_<index>.events), but those of servers p_without.
CREATE FUNCTION cairn_log_union_events_v1(p_without smallint[] DEFAULT '{}') RETURNS text
LANGUAGE sql STABLE AS $$
SELECT format('SELECT * FROM %I.events', n.nspname)
       || coalesce((SELECT string_agg(format(' UNION ALL SELECT * FROM %I.events', o.nspname),
                                      '' ORDER BY o.nspname)
                      FROM pg_namespace o JOIN pg_class c ON c.relnamespace = o.oid
                     WHERE o.nspname LIKE 'log\_server\_%' AND c.relname = 'events'
                       AND c.relkind = 'f'
                       AND NOT substr(o.nspname, length('log_server_') + 1)::smallint
                               = ANY (p_without)), '')
  FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
 WHERE t.oid = 'events'::regclass
$$;

-- 0030's, its events from cairn_log_union_events_v1, its views from cairn_log_views_v1
CREATE OR REPLACE FUNCTION cairn_make_log_union_v1() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_home    name := (SELECT n.nspname FROM pg_class c
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.oid = 'events'::regclass);
    v_view    record;
    v_made    integer := 0;
    v_grantee text;
BEGIN
    PERFORM pg_advisory_xact_lock(7165064707736470273);  -- one maker at a time
    DROP SCHEMA IF EXISTS log_union CASCADE;
    CREATE SCHEMA log_union;
    EXECUTE format('CREATE VIEW log_union.events AS %s', cairn_log_union_events_v1());
    PERFORM set_config('search_path', format('log_union, %I, pg_temp', v_home), true);
    FOR v_view IN SELECT * FROM cairn_log_views_v1() LOOP
        EXECUTE format('CREATE VIEW log_union.%I AS %s', v_view.name, v_view.body);
        v_made := v_made + 1;
    END LOOP;
    FOREACH v_grantee IN ARRAY ARRAY['cairn_runtime', 'cairn_audit'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_grantee);
        EXECUTE format('GRANT USAGE ON SCHEMA log_union TO %I', v_grantee);
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA log_union TO %I', v_grantee);
    END LOOP;
    RETURN v_made;
END;
$$;

-- The union of log_union without servers p_servers (each one of the log's servers but
-- server 0, the home, where this runs), as temporary views of the caller's session:
-- `events` and every view of the log's schema, which come first in its search path for
-- the rest of the session. Runs as its caller (the views are the caller's, who must
-- read the tables they read: cairn_audit does). Returns how many views it made.
CREATE FUNCTION cairn_log_union_without_v1(p_servers smallint[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_home    name := (SELECT n.nspname FROM pg_class c
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.oid = 'events'::regclass);
    v_servers smallint[];
    v_view    record;
    v_made    integer := 1;
BEGIN
    SELECT array_agg(server_index ORDER BY server_index) INTO v_servers
      FROM log_servers WHERE server_index > 0;
    IF p_servers IS NULL OR cardinality(p_servers) = 0
       OR NOT p_servers <@ coalesce(v_servers, '{}') THEN
        RAISE EXCEPTION 'cairn_log_union_without_v1: no server % to leave out: the log''s other servers are %',
              array_to_string(coalesce(p_servers, '{}'), ', '),
              coalesce(array_to_string(v_servers, ', '), 'none (it lies on one server)')
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('search_path', format('pg_temp, %I', v_home), true);
    EXECUTE format('CREATE OR REPLACE TEMPORARY VIEW events AS %s',
                   cairn_log_union_events_v1(p_servers));
    FOR v_view IN SELECT * FROM cairn_log_views_v1() LOOP
        EXECUTE format('CREATE OR REPLACE TEMPORARY VIEW %I AS %s', v_view.name, v_view.body);
        v_made := v_made + 1;
    END LOOP;
    RETURN v_made;
END;
$$;

DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
BEGIN
    -- (the definitions as the log's schema reads them: its names unqualified)
    EXECUTE format('ALTER FUNCTION cairn_log_views_v1() SET search_path = %s', v_path);
    -- (the log's `events`, never a session's temporary one of the same name: pg_temp last)
    EXECUTE format('ALTER FUNCTION cairn_log_union_events_v1(smallint[]) SET search_path = %s',
                   v_path);
    EXECUTE format('ALTER FUNCTION cairn_log_union_without_v1(smallint[]) SET search_path = %s',
                   v_path);
    REVOKE EXECUTE ON FUNCTION cairn_log_union_without_v1(smallint[]) FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_audit') THEN
        GRANT EXECUTE ON FUNCTION cairn_log_union_without_v1(smallint[]) TO cairn_audit;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_log_union_without_v1(smallint[]) TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'no grants on cairn_log_union_without_v1: %', SQLERRM;
END
$$;
