DROP FUNCTION IF EXISTS cairn_append_fenced_v1(text, uuid[], text[], entity_kind[], text[],
                                               text[], text[], jsonb[], bytea[]);
ALTER TABLE node_liveness DROP COLUMN IF EXISTS fenced_at;
