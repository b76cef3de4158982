-- A finished attempt's report, written by the scoring worker (services/exam/worker.py) from the exam_scoring stream.
CREATE TABLE reports (
    attempt_id text PRIMARY KEY REFERENCES attempts ON DELETE CASCADE,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    exam_id text NOT NULL,
    student_id text NOT NULL,
    theta double precision NOT NULL,
    standard_error double precision NOT NULL,
    scaled_score double precision NOT NULL,
    percentile double precision NOT NULL CHECK (percentile BETWEEN 0 AND 100),
    items_answered integer NOT NULL,
    items_correct integer NOT NULL,
    -- Per content area: {"area": {"answered": n, "correct": n}}.
    content_areas jsonb NOT NULL DEFAULT '{}',
    report_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reports_student ON reports (student_id, report_time DESC);
CREATE INDEX reports_exam ON reports (exam_id, theta);
SELECT platform.enable_tenant_rls('reports');
