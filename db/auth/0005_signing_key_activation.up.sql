-- A signing key is published when it is created and signs from activate_time on: verifiers that cache the
-- JWKS learn a new key before its first token reaches them.
ALTER TABLE signing_keys ADD COLUMN activate_time timestamptz;
UPDATE signing_keys SET activate_time = create_time;
ALTER TABLE signing_keys ALTER COLUMN activate_time SET NOT NULL;
