-- Every service schema's first migration grants on these functions, so rollbacks reach this one last;
-- it fails (rather than cascading) if a policy still uses them.
DROP FUNCTION platform.disable_tenant_rls(regclass);
DROP FUNCTION platform.enable_tenant_rls(regclass);
DROP FUNCTION platform.tenant_visible(text, text);
DROP SCHEMA platform;
