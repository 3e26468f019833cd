DROP FUNCTION IF EXISTS lineage(text);
DROP FUNCTION IF EXISTS cairn_creating_task(text);
