-- Attempts and their answered items. PostgreSQL is the record: an answer is stored before the reply leaves,
-- and the live CAT state in Redis (cat:{attempt_id}:state) can always be rebuilt from these rows.

CREATE TABLE attempts (
    attempt_id text PRIMARY KEY,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    exam_id text NOT NULL REFERENCES exams,
    student_id text NOT NULL,
    status text NOT NULL DEFAULT 'in_progress' CHECK (status IN ('in_progress', 'finished', 'expired', 'abandoned')),
    parameter_version integer NOT NULL,
    -- The item served and awaiting an answer (NULL once finished), and its 1-based position.
    current_item_id text,
    current_position integer NOT NULL DEFAULT 1,
    current_serve_time timestamptz,
    theta double precision,
    standard_error double precision,
    stop_reason text NOT NULL DEFAULT '',
    -- Seeds the attempt's random choices (randomesque, exposure control), so a rebuilt state chooses alike.
    seed bigint NOT NULL,
    -- Items Sympson-Hetter exposure control turned down: never offered again in this attempt.
    set_aside text[] NOT NULL DEFAULT '{}',
    start_time timestamptz NOT NULL DEFAULT now(),
    deadline_time timestamptz,
    finish_time timestamptz
);
CREATE INDEX attempts_student ON attempts (student_id, start_time DESC);
CREATE INDEX attempts_exam ON attempts (exam_id, status);
SELECT platform.enable_tenant_rls('attempts');

CREATE TABLE attempt_responses (
    attempt_id text NOT NULL REFERENCES attempts ON DELETE CASCADE,
    position integer NOT NULL CHECK (position > 0),
    item_id text NOT NULL,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    content_area text NOT NULL,
    response text NOT NULL,
    correct boolean NOT NULL,
    theta double precision NOT NULL,
    standard_error double precision NOT NULL,
    response_time_ms integer NOT NULL DEFAULT 0,
    answer_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (attempt_id, position),
    UNIQUE (attempt_id, item_id)
);
SELECT platform.enable_tenant_rls('attempt_responses');
