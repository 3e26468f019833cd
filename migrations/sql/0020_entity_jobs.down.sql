DROP FUNCTION cairn_jobs_of_v1(text[], entity_kind[], text[]);
