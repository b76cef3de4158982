-- The tenant service's schema and the role it works as. Tables come with the tenant service's own
-- migrations; this only sets up who may do what.

DO $$
BEGIN
    CREATE ROLE megacity_tenant NOLOGIN;
EXCEPTION
    -- Roles are cluster-wide: another database of this cluster (or a concurrent migrator) made it already.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;
COMMENT ON ROLE megacity_tenant IS 'The tenant service. LOGIN and its password come from ops/migrations.py provisioning.';

CREATE SCHEMA tenant;
GRANT USAGE ON SCHEMA tenant TO megacity_tenant;

-- Tables and sequences that later migrations create here (as the migrating role, which keeps DDL and
-- ownership) are the service's to read and write. No TRUNCATE: it bypasses row-level security.
ALTER DEFAULT PRIVILEGES IN SCHEMA tenant GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO megacity_tenant;
ALTER DEFAULT PRIVILEGES IN SCHEMA tenant GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO megacity_tenant;

-- Tenant policies call this with the querying role's privileges.
GRANT EXECUTE ON FUNCTION platform.tenant_visible(text, text) TO megacity_tenant;
