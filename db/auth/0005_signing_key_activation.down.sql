ALTER TABLE signing_keys DROP COLUMN activate_time;
