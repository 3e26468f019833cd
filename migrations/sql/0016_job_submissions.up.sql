-- Job submissions (`cairn job submit`, the Jobs REST API): each submission is an entity
-- of its own kind, apart from the driver jobs (kind 'job') that its entrypoint starts,
-- because its life differs (pending, running, then succeeded, failed or stopped, and
-- deleted) and a driver job links to it (its submitted payload's submission_id).
-- The views of migration 0009 give this kind no state (cairn_state_code is NULL).
ALTER TYPE entity_kind ADD VALUE IF NOT EXISTS 'submission';

-- Listing the submissions reads only their events (partial, as events_node_idx: other
-- appends pay nothing). A new enum value cannot be used in the transaction that adds it,
-- and an enum's text is not immutable to PostgreSQL (labels can be renamed; this one
-- never is): the predicate is this function, which queries name as it is.
CREATE FUNCTION cairn_is_submission(p_kind entity_kind) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT p_kind::text = 'submission' $$;

CREATE INDEX events_submission_idx ON events (entity_id, position)
    WHERE cairn_is_submission(entity_kind);
