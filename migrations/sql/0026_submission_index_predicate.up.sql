-- The job submissions' partial index without a function in its predicate (issue 20:
-- a one-event append paid ~40 us for it).
--
-- Migration 0016 wrote the predicate as cairn_is_submission(entity_kind), a SQL function,
-- because the enum label it tests could not be named in the transaction that added it.
-- PostgreSQL cannot inline that function (its body casts an enum to text, which it does
-- not hold immutable), so every statement that inserted into `events` set the function
-- up to test each row it stored, whatever its kind: measured on a 2-vCPU VM, an insert
-- of one event 153 -> 107 us without it.
--
-- The label can be named now, unless this migration runs in the same transaction as
-- 0016 on a log whose entity_kind type was committed before it (a log made before 0016
-- brought up in one step: `cairn migrate --revision 0016_job_submissions` first avoids
-- it). Such a log keeps the function's predicate, and a notice says so. The queries that
-- read submissions name both predicates, so either index serves them (queries.sql,
-- job_submission_events).
DO $$
BEGIN
    BEGIN
        PERFORM 'submission'::entity_kind;
    EXCEPTION WHEN unsafe_new_enum_value_usage THEN
        RAISE NOTICE 'events_submission_idx keeps its predicate cairn_is_submission(): '
                     'the label ''submission'' was added in this transaction';
        RETURN;
    END;
    DROP INDEX events_submission_idx;
    CREATE INDEX events_submission_idx ON events (entity_id, position)
        WHERE entity_kind = 'submission';
END
$$;
