ALTER TABLE attempts DROP COLUMN student_org_id;
