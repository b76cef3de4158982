-- The item bank (items and their IRT parameters per version), exams, attempts and their responses.
-- Everything is tenant-owned: zone_id and org_id on every row, row-level security on every table.

-- A version of an organisation's item parameters; attempts keep the version they started with.
CREATE TABLE parameter_versions (
    zone_id text NOT NULL,
    org_id text NOT NULL,
    version integer NOT NULL CHECK (version > 0),
    active boolean NOT NULL DEFAULT false,
    calibration_id text NOT NULL DEFAULT '',
    model text NOT NULL DEFAULT '3PL' CHECK (model IN ('1PL', '2PL', '3PL')),
    create_time timestamptz NOT NULL DEFAULT now(),
    activate_time timestamptz,
    PRIMARY KEY (org_id, version)
);
CREATE UNIQUE INDEX parameter_versions_one_active ON parameter_versions (org_id) WHERE active;
SELECT platform.enable_tenant_rls('parameter_versions');

CREATE TABLE items (
    item_id text PRIMARY KEY,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    external_id text NOT NULL DEFAULT '',
    content_area text NOT NULL CHECK (length(content_area) BETWEEN 1 AND 100),
    item_type text NOT NULL CHECK (item_type IN ('single_choice', 'multiple_choice', 'true_false', 'short_answer', 'numeric')),
    stem text NOT NULL CHECK (length(stem) BETWEEN 1 AND 20000),
    -- Choices and the answer key in their contract's JSON form (megacity.exam.v1.Choice, AnswerKey).
    choices jsonb NOT NULL DEFAULT '[]',
    answer_key jsonb NOT NULL,
    media_uri text NOT NULL DEFAULT '',
    explanation text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'active', 'retired')),
    tags text[] NOT NULL DEFAULT '{}',
    language text NOT NULL DEFAULT '',
    exposure_count integer NOT NULL DEFAULT 0,
    exposure_parameter double precision NOT NULL DEFAULT 1 CHECK (exposure_parameter > 0 AND exposure_parameter <= 1),
    creator_id text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
-- An import names items by the organisation's own ids; upserts find them here.
CREATE UNIQUE INDEX items_external_id ON items (org_id, external_id) WHERE external_id <> '';
CREATE INDEX items_bank ON items (org_id, status, content_area);
SELECT platform.enable_tenant_rls('items');

CREATE TABLE item_parameters (
    item_id text NOT NULL REFERENCES items ON DELETE CASCADE,
    version integer NOT NULL,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    model text NOT NULL CHECK (model IN ('1PL', '2PL', '3PL')),
    a double precision NOT NULL CHECK (a > 0 AND a <= 10),
    b double precision NOT NULL CHECK (b BETWEEN -10 AND 10),
    c double precision NOT NULL CHECK (c >= 0 AND c < 1),
    a_standard_error double precision NOT NULL DEFAULT 0,
    b_standard_error double precision NOT NULL DEFAULT 0,
    c_standard_error double precision NOT NULL DEFAULT 0,
    response_count integer NOT NULL DEFAULT 0,
    PRIMARY KEY (item_id, version),
    FOREIGN KEY (org_id, version) REFERENCES parameter_versions (org_id, version)
);
CREATE INDEX item_parameters_version ON item_parameters (org_id, version);
SELECT platform.enable_tenant_rls('item_parameters');

CREATE TABLE exams (
    exam_id text PRIMARY KEY,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    title text NOT NULL CHECK (length(title) BETWEEN 1 AND 300),
    description text NOT NULL DEFAULT '',
    exam_type text NOT NULL DEFAULT 'practice',
    status text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'published', 'archived')),
    is_public boolean NOT NULL DEFAULT false,
    -- The adaptive configuration or the fixed form, and the score scale, in their contract's JSON form.
    adaptive jsonb,
    fixed_form jsonb,
    score_scale jsonb NOT NULL DEFAULT '{}',
    time_limit_seconds integer NOT NULL DEFAULT 0 CHECK (time_limit_seconds >= 0),
    show_estimates boolean NOT NULL DEFAULT false,
    show_item_feedback boolean NOT NULL DEFAULT false,
    open_time timestamptz,
    close_time timestamptz,
    max_attempts_per_student integer NOT NULL DEFAULT 0 CHECK (max_attempts_per_student >= 0),
    creator_id text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    publish_time timestamptz,
    CHECK ((adaptive IS NULL) <> (fixed_form IS NULL))
);
CREATE INDEX exams_org ON exams (org_id, status);
SELECT platform.enable_tenant_rls('exams');
