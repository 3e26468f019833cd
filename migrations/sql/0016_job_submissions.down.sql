-- PostgreSQL cannot drop a value from an enum: the kind stays, unused by older code.
DROP INDEX IF EXISTS events_submission_idx;
DROP FUNCTION IF EXISTS cairn_is_submission(entity_kind);
