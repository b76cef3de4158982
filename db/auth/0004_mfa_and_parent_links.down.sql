DROP TABLE parent_links;
ALTER TABLE users DROP COLUMN mfa_pending_time;
