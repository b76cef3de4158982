-- Row-level security for tenant-owned tables: one predicate, one policy template.
--
-- The runtime sets three transaction-local settings from the verified caller before touching data
-- (services/runtime/database.py, tenant_transaction):
--   megacity.scope    'platform' (every row), 'zone' (rows of one zone) or 'org' (rows of one org)
--   megacity.zone_id  the caller's zone, for the 'zone' and 'org' scopes
--   megacity.org_id   the caller's organisation, for the 'org' scope
-- Anything else (unset, empty, unknown scope) sees no row and may write none: a code path that forgot
-- to set the tenant fails closed instead of leaking.

CREATE SCHEMA platform;
COMMENT ON SCHEMA platform IS 'Shared by every service schema: row-level security helpers.';

-- SQL-language and STABLE, so the planner inlines the expression into each query: no function call
-- per row, and the query's own conditions on indexed columns still choose the plan, with this as a
-- filter on top. current_setting(..., true) gives NULL for a setting never set, and nullif turns the
-- empty string (reset) into NULL too; coalesce makes every such case a plain FALSE, which both USING
-- and WITH CHECK treat as "no".
CREATE FUNCTION platform.tenant_visible(row_zone text, row_org text) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE current_setting('megacity.scope', true)
    WHEN 'platform' THEN true
    WHEN 'zone' THEN coalesce(row_zone = nullif(current_setting('megacity.zone_id', true), ''), false)
    WHEN 'org' THEN coalesce(
        row_zone = nullif(current_setting('megacity.zone_id', true), '')
        AND row_org = nullif(current_setting('megacity.org_id', true), ''),
        false)
    ELSE false
END;
COMMENT ON FUNCTION platform.tenant_visible(text, text) IS
    'Whether a row of (zone, org) is visible to the tenant scope set for this transaction; false when unset.';

-- Policy expressions run with the querying role's privileges, so each service role is granted EXECUTE
-- explicitly (in its schema's first migration) instead of every role through PUBLIC.
REVOKE EXECUTE ON FUNCTION platform.tenant_visible(text, text) FROM PUBLIC;

-- Makes `target` tenant-owned: its rows are visible and writable only through tenant_visible on its
-- zone_id and org_id columns. FORCE applies the policy to the table's owner as well; only superusers
-- and BYPASSRLS roles escape it, which is why services connect as their own unprivileged login role.
CREATE FUNCTION platform.enable_tenant_rls(target regclass) RETURNS void
    LANGUAGE plpgsql
AS $$
DECLARE
    missing text;
BEGIN
    SELECT string_agg(required.name, ' and ') INTO missing
    FROM (VALUES ('zone_id'), ('org_id')) AS required(name)
    WHERE NOT EXISTS (
        SELECT FROM pg_attribute
        WHERE attrelid = target AND attname = required.name AND attnum > 0 AND NOT attisdropped
            AND atttypid IN ('text'::regtype, 'varchar'::regtype)
    );
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'table % cannot be tenant-owned: it needs % column(s) of type text', target, missing
            USING ERRCODE = 'undefined_column';
    END IF;
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', target);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', target);
    EXECUTE format(
        'CREATE POLICY tenant_isolation ON %s '
        'USING (platform.tenant_visible(zone_id, org_id)) '
        'WITH CHECK (platform.tenant_visible(zone_id, org_id))',
        target);
END;
$$;
COMMENT ON FUNCTION platform.enable_tenant_rls(regclass) IS
    'Gives a table with zone_id and org_id columns the tenant isolation policy (row-level security, forced).';

-- The inverse, for down migrations.
CREATE FUNCTION platform.disable_tenant_rls(target regclass) RETURNS void
    LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %s', target);
    EXECUTE format('ALTER TABLE %s NO FORCE ROW LEVEL SECURITY', target);
    EXECUTE format('ALTER TABLE %s DISABLE ROW LEVEL SECURITY', target);
END;
$$;
COMMENT ON FUNCTION platform.disable_tenant_rls(regclass) IS 'Undoes platform.enable_tenant_rls.';

-- Schema changes are for the migrator, never for service roles.
REVOKE EXECUTE ON FUNCTION platform.enable_tenant_rls(regclass) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION platform.disable_tenant_rls(regclass) FROM PUBLIC;
