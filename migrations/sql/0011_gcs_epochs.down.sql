DROP FUNCTION cairn_epoch_v1();
DROP FUNCTION cairn_live_timeline_v1();
DROP TABLE gcs_epochs;
