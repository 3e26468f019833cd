DROP FUNCTION IF EXISTS cairn_identity_v1();
DROP TABLE IF EXISTS gcs_identity;
