ALTER TABLE nodes DROP COLUMN available, DROP COLUMN load;
DROP TABLE node_liveness;
