DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_audit') THEN
        ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM cairn_audit;
        REVOKE SELECT ON ALL TABLES IN SCHEMA public FROM cairn_audit;
        REVOKE USAGE ON SCHEMA public FROM cairn_audit;
    END IF;
END
$$;
