-- The student's own organisation on each attempt: an attempt belongs to its exam's organisation (a public exam's
-- attempts are its organisation's data), but its results are the student's, which only the staff of the student's
-- organisation list (services/exam/access.py). Attempts from before this column have '' (no one's staff list them).
ALTER TABLE attempts ADD COLUMN student_org_id text NOT NULL DEFAULT '';
CREATE INDEX attempts_student_org ON attempts (student_org_id, start_time DESC);
