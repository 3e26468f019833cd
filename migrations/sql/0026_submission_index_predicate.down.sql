DROP INDEX events_submission_idx;
CREATE INDEX events_submission_idx ON events (entity_id, position)
    WHERE cairn_is_submission(entity_kind);
