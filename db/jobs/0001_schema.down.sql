-- The role stays: roles are cluster-wide and other databases of this cluster may still use it.
REVOKE EXECUTE ON FUNCTION platform.tenant_visible(text, text) FROM megacity_jobs;
ALTER DEFAULT PRIVILEGES IN SCHEMA jobs REVOKE ALL ON SEQUENCES FROM megacity_jobs;
ALTER DEFAULT PRIVILEGES IN SCHEMA jobs REVOKE ALL ON TABLES FROM megacity_jobs;
-- Without CASCADE: the jobs service's later migrations have removed their objects by now, and anything
-- left over is a reason to stop, not to delete silently.
DROP SCHEMA jobs;
