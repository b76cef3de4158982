-- The role stays: roles are cluster-wide and other databases of this cluster may still use it.
REVOKE EXECUTE ON FUNCTION platform.tenant_visible(text, text) FROM megacity_tutor;
ALTER DEFAULT PRIVILEGES IN SCHEMA tutor REVOKE ALL ON SEQUENCES FROM megacity_tutor;
ALTER DEFAULT PRIVILEGES IN SCHEMA tutor REVOKE ALL ON TABLES FROM megacity_tutor;
-- Without CASCADE: the tutor service's later migrations have removed their objects by now, and anything
-- left over is a reason to stop, not to delete silently.
DROP SCHEMA tutor;
