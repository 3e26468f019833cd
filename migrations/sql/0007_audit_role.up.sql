-- cairn_audit: may read every table of the log and its projections, and nothing else
-- (no login of its own: `cairn sql` switches to it inside a read-only transaction).
-- Roles are cluster-wide, grants per database. A server where the migrating user may
-- not create roles keeps working without it (cairn sql then relies on the read-only
-- transaction alone).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_audit') THEN
        CREATE ROLE cairn_audit NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
    EXECUTE format('GRANT cairn_audit TO %I', current_user);
    GRANT USAGE ON SCHEMA public TO cairn_audit;
    GRANT SELECT ON ALL TABLES IN SCHEMA public TO cairn_audit;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO cairn_audit;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'no cairn_audit role: % (cairn sql uses read-only transactions only)',
        SQLERRM;
END
$$;
