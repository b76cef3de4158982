-- The tamper-evident audit trail (services/auth/audit.py holds its rules, services/auth/audit_log.py its SQL).
--
-- One row per sealed record, one column per AuditEntry field, each stored exactly as its hash covers it: ids and
-- the IP address as text (a uuid or inet column would hand back another spelling, and the hash covers the
-- spelling), details as jsonb holding the canonical details, times as timestamptz (microseconds, like the
-- canonical form). Each zone's records form one chain, `sequence` 1, 2, ...; the store appends under a per-zone
-- transaction advisory lock, and UNIQUE (zone_id, sequence) stops a chain from forking should anything not take it.
-- The chain's head is not kept separately: it is the zone's highest sequence, one index probe away.

CREATE TABLE audit_records (
    id text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'),
    zone_id text NOT NULL,
    -- '' for zone-level records: an organisation's scope does not see them, its zone's does.
    org_id text NOT NULL,
    action text NOT NULL,
    event_time timestamptz NOT NULL,
    actor_id text NOT NULL,
    actor_role text NOT NULL,
    actor_service text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('', 'success', 'failure', 'denied')),
    resource_type text NOT NULL,
    resource_id text NOT NULL,
    ip_address text NOT NULL,
    user_agent text NOT NULL,
    request_id text NOT NULL,
    details jsonb NOT NULL CHECK (jsonb_typeof(details) = 'object'),
    sequence bigint NOT NULL CHECK (sequence >= 1),
    prev_hash text NOT NULL CHECK (prev_hash ~ '^[0-9a-f]{64}$'),
    record_time timestamptz NOT NULL,
    hash text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    -- Also the index for a zone's newest records, for reading a chain in order, and for finding its head.
    CONSTRAINT audit_records_chain UNIQUE (zone_id, sequence)
);

-- Listing newest first within a zone, filtered by actor or by action: the index delivers the order, so a page
-- stops after `limit` rows however long the zone's history is.
CREATE INDEX audit_records_actor ON audit_records (zone_id, actor_id, sequence);
CREATE INDEX audit_records_action ON audit_records (zone_id, action, sequence);
-- Listing a time range of a zone, however far back.
CREATE INDEX audit_records_event_time ON audit_records (zone_id, event_time);
-- Listing across zones (platform operators), newest stored first.
CREATE INDEX audit_records_recent ON audit_records (record_time, zone_id, sequence);

SELECT platform.enable_tenant_rls('audit_records');

-- History is not edited, not even by the service that writes it: the privileges refuse its role, and the
-- trigger refuses everyone else who could (the table's owner, a superuser) unless they first disable it, which
-- takes ownership. It works per statement, so it refuses even a statement that matches no row, and it covers
-- TRUNCATE, which skips row triggers and row-level security alike (the role was never granted TRUNCATE).
REVOKE UPDATE, DELETE ON audit_records FROM megacity_auth;

CREATE FUNCTION audit_records_append_only() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_records_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION audit_records_append_only();
