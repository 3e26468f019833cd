DROP FUNCTION cairn_append_fenced_after_v1(text, bigint, uuid[], text[], entity_kind[], text[],
                                           text[], text[], jsonb[], bytea[]);
DROP FUNCTION cairn_fence_node_v1(text);
DROP TABLE node_fences;
