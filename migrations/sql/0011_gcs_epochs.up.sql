-- GCS epochs (issue 15, failover): the fencing token that keeps an old primary from
-- taking appends once its replica has been promoted.
--
-- A promotion puts the promoted server on a new PostgreSQL timeline, higher than the
-- one it followed, at the very moment it starts taking writes. cairn_epoch_v1() reads
-- the server's live timeline and, when it is higher than the one last recorded here,
-- records a new epoch (under a lock: once per promotion, whoever calls first -- the
-- watchdog that promoted, or the first process to connect). Every connection of the
-- runtime calls it first (controlplane/eventlog/fencing.py) and refuses a server whose
-- epoch is lower than the highest its process has seen for this log, or equal with
-- another epoch_id (a second server promoted from the same past: a fork). An old
-- primary that comes back is still at the epoch it had, so a process that moved on
-- refuses it.
--
-- epoch_id tells forks apart: drawn at random for each promotion; the first epoch's is
-- all zeros, so that every database made from one migration agrees on it.
CREATE TABLE gcs_epochs (
    epoch        bigint      PRIMARY KEY CHECK (epoch >= 1),
    epoch_id     uuid        NOT NULL DEFAULT gen_random_uuid(),
    timeline     integer     NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The timeline WAL is being written on now (the first 8 hex digits of the current WAL
-- file's name): it changes the moment a promotion completes, unlike the timeline of
-- the last checkpoint, which lags until the next one.
CREATE FUNCTION cairn_live_timeline_v1() RETURNS integer
LANGUAGE sql VOLATILE AS $$
    SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::integer
$$;

INSERT INTO gcs_epochs (epoch, epoch_id, timeline)
VALUES (1, '00000000-0000-0000-0000-000000000000', cairn_live_timeline_v1());

-- The server's current epoch, recording a new one first if the server was promoted
-- since the last (its live timeline is higher than the recorded one). A standby (in
-- recovery) reports what it has replayed and records nothing. system_id tells logs
-- apart: a replica and its primary (and any physical copy) share it.
CREATE FUNCTION cairn_epoch_v1(OUT system_id bigint, OUT epoch bigint, OUT epoch_id uuid,
                               OUT timeline integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_live integer;
BEGIN
    system_id := (SELECT s.system_identifier FROM pg_control_system() s);
    SELECT e.epoch, e.epoch_id, e.timeline INTO epoch, epoch_id, timeline
      FROM gcs_epochs e ORDER BY e.epoch DESC LIMIT 1;
    IF pg_is_in_recovery() THEN
        RETURN;
    END IF;
    v_live := cairn_live_timeline_v1();
    IF epoch IS NULL OR v_live > timeline THEN
        -- two callers may both get here: the second waits for the first's row and
        -- inserts nothing, then both read the same epoch
        INSERT INTO gcs_epochs (epoch, timeline) VALUES (coalesce(epoch, 0) + 1, v_live)
        ON CONFLICT ON CONSTRAINT gcs_epochs_pkey DO NOTHING;
        SELECT e.epoch, e.epoch_id, e.timeline INTO epoch, epoch_id, timeline
          FROM gcs_epochs e ORDER BY e.epoch DESC LIMIT 1;
    END IF;
END;
$$;

-- As the append functions (0010): run as the owner with the log's schema first, and
-- callable by the runtime, not by PUBLIC (so not by cairn_audit, which only reads).
DO $$
DECLARE
    v_path text := format('%I, pg_temp',
        (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = 'events'::regclass));
BEGIN
    EXECUTE format('ALTER FUNCTION cairn_epoch_v1() SECURITY DEFINER SET search_path = %s',
                   v_path);
    REVOKE EXECUTE ON FUNCTION cairn_epoch_v1() FROM PUBLIC;
    REVOKE EXECUTE ON FUNCTION cairn_live_timeline_v1() FROM PUBLIC;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cairn_runtime') THEN
        GRANT EXECUTE ON FUNCTION cairn_epoch_v1() TO cairn_runtime;
        GRANT SELECT ON gcs_epochs TO cairn_runtime;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cairn_runtime gets no grant on gcs_epochs: %', SQLERRM;
END
$$;
