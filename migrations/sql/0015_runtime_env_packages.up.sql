-- Runtime environments' packages (issue 18): a working_dir or py_modules folder, packed
-- into a zip by the driver, stored once under the SHA-256 of its bytes; nodes fetch it
-- by that digest (a task's logged runtime_env names it: cairn://pkg/<digest>.zip), so a
-- replayed task runs on exactly the files it ran on. Content, not state: written once,
-- never changed, so there is no event per package (the tasks' submitted events name
-- them).
CREATE TABLE runtime_env_packages (
    digest      text        PRIMARY KEY CHECK (digest ~ '^[0-9a-f]{64}$'),
    size_bytes  bigint      NOT NULL CHECK (size_bytes = octet_length(data)),
    data        bytea       NOT NULL,
    stored_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT SELECT, INSERT ON runtime_env_packages TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on runtime_env_packages: %', SQLERRM;
END
$$;
