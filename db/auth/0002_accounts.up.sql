-- Accounts, sessions with their rotating refresh tokens, signing keys and invite codes.

CREATE TABLE users (
    user_id text PRIMARY KEY,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    email text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    role text NOT NULL CHECK (role IN ('super_admin', 'zone_admin', 'org_admin', 'teacher', 'student', 'parent', 'guest')),
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'deactivated')),
    password_hash text NOT NULL,
    -- Personal data is stored encrypted (services/auth/pii.py); the token names the key that encrypted it.
    phone_number_encrypted text NOT NULL DEFAULT '',
    locale text NOT NULL DEFAULT '',
    mfa_enabled boolean NOT NULL DEFAULT false,
    mfa_secret_encrypted text NOT NULL DEFAULT '',
    mfa_pending_secret_encrypted text NOT NULL DEFAULT '',
    mfa_last_step bigint,
    recovery_code_hashes text[] NOT NULL DEFAULT '{}',
    failed_logins integer NOT NULL DEFAULT 0,
    locked_until timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    last_login_time timestamptz
);
-- Email is unique per zone, compared case-insensitively.
CREATE UNIQUE INDEX users_zone_email ON users (zone_id, lower(email));
CREATE INDEX users_org ON users (zone_id, org_id);
SELECT platform.enable_tenant_rls('users');

-- A session is one sign-in; its refresh tokens form one family (rotated on every use).
CREATE TABLE sessions (
    session_id text PRIMARY KEY,
    user_id text NOT NULL REFERENCES users ON DELETE CASCADE,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    ip_address text NOT NULL DEFAULT '',
    user_agent text NOT NULL DEFAULT '',
    mfa_verified boolean NOT NULL DEFAULT false,
    create_time timestamptz NOT NULL DEFAULT now(),
    last_refresh_time timestamptz,
    expire_time timestamptz NOT NULL,
    revoke_time timestamptz,
    revoke_reason text NOT NULL DEFAULT ''
);
CREATE INDEX sessions_user ON sessions (user_id, create_time DESC);
SELECT platform.enable_tenant_rls('sessions');

-- Refresh tokens are stored as their SHA-256 only; a token is single use (used_time set when rotated).
CREATE TABLE refresh_tokens (
    token_hash text PRIMARY KEY,
    session_id text NOT NULL REFERENCES sessions ON DELETE CASCADE,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    issue_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz NOT NULL,
    used_time timestamptz
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);
SELECT platform.enable_tenant_rls('refresh_tokens');

-- The keys that sign access tokens (platform-wide, not tenant-owned); private keys encrypted at rest.
CREATE TABLE signing_keys (
    kid text PRIMARY KEY,
    private_key_encrypted text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    retire_time timestamptz
);

CREATE TABLE invite_codes (
    invite_code_id text PRIMARY KEY,
    code_hash text NOT NULL UNIQUE,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    role text NOT NULL,
    max_uses integer NOT NULL DEFAULT 1 CHECK (max_uses > 0),
    use_count integer NOT NULL DEFAULT 0,
    expire_time timestamptz,
    note text NOT NULL DEFAULT '',
    creator_id text NOT NULL,
    revoke_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now()
);
SELECT platform.enable_tenant_rls('invite_codes');
