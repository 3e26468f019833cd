-- Every event of one entity, fast: lineage reconstruction reads a lost object's task
-- (its `submitted` event, the spec and code) from the log, and audits ask for one
-- task's or actor's history. On the partitioned parent, so every partition has it.
CREATE INDEX events_entity_idx ON events (entity_id, event_type);
