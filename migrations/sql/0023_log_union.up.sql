-- A log on several servers (0021), for the processes that use it and the people who read
-- it (issue 20; controlplane/README.md, "A log on several servers").
--
-- log_servers: on server 0 (the home: membership, projections, jobs), the address of
-- each server of the log, so that a process given server 0's URL finds the others. An
-- address is a URL without a password (every server takes the runtime's login of server
-- 0's URL); one without a host lies on server 0's machine, reached at the host(s) and
-- with the connection options the process uses for server 0 (controlplane/log_servers.py).
CREATE TABLE log_servers (
    server_index smallint PRIMARY KEY CHECK (server_index >= 0),
    address      text NOT NULL
);

-- log_union: the whole log as one server sees it. Its `events` is this server's events
-- and those of every other server (each a postgres_fdw foreign table, in a schema
-- log_server_<index> made by controlplane/log_servers.py); every view of the log's schema
-- is made again here over it. Audit readers (cairn sql, state, timeline, replay, the
-- dashboard) read with log_union first in their search_path; runtime queries that need
-- every server's events (lineage, actor replay, what a dead node's store held) name
-- log_union.events. On a log of one server the union is the log itself.
CREATE SCHEMA log_union;

-- Makes log_union anew from the log's schema and the foreign `events` tables found:
-- called when a log is placed on servers, and at the end of every run of migrations,
-- this one's included (a view may have changed; migrations/env.py). Returns how many
-- views it made.
CREATE FUNCTION cairn_make_log_union_v1() RETURNS integer LANGUAGE plpgsql AS $$
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
      FROM pg_class c WHERE c.relnamespace = v_home::regnamespace AND c.relkind = 'v';
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

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION cairn_make_log_union_v1() SET search_path = %I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
    REVOKE EXECUTE ON FUNCTION cairn_make_log_union_v1() FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT SELECT ON log_servers TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on the log''s servers: %', SQLERRM;
END
$$;

