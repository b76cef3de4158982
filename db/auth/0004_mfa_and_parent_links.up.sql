-- When an MFA enrolment was started: an unconfirmed secret expires (services/auth/server.py, EnrollMfa).
ALTER TABLE users ADD COLUMN mfa_pending_time timestamptz;

-- A parent's request to follow a student of the same zone, and the student's answer. The row belongs to the
-- student's organisation, so its teachers and org_admins see it; parent and student act in their zone's scope.
CREATE TABLE parent_links (
    link_id text PRIMARY KEY,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    parent_id text NOT NULL REFERENCES users ON DELETE CASCADE,
    student_id text NOT NULL REFERENCES users ON DELETE CASCADE,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected', 'unlinked')),
    request_time timestamptz NOT NULL DEFAULT now(),
    decide_time timestamptz,
    unlink_time timestamptz,
    CHECK (parent_id <> student_id)
);
-- At most one live (pending or approved) link per pair; ended ones stay as history.
CREATE UNIQUE INDEX parent_links_live_pair ON parent_links (parent_id, student_id) WHERE status IN ('pending', 'approved');
CREATE INDEX parent_links_student ON parent_links (student_id);
SELECT platform.enable_tenant_rls('parent_links');
