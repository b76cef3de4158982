-- Calibration runs (ExamService.StartCalibration). The RPC queues a run; the calibration worker of any exam
-- replica (services/exam/calibration_worker.py) claims it, estimates item parameters from the organisation's
-- stored responses and writes them as a new parameter version.

CREATE TABLE calibrations (
    calibration_id text PRIMARY KEY,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    model text NOT NULL CHECK (model IN ('2PL', '3PL')),
    -- Empty arrays mean every item and every content area.
    item_ids text[] NOT NULL DEFAULT '{}',
    content_areas text[] NOT NULL DEFAULT '{}',
    min_responses_per_item integer NOT NULL CHECK (min_responses_per_item BETWEEN 1 AND 1000000),
    max_iterations integer NOT NULL CHECK (max_iterations BETWEEN 1 AND 10000),
    activate_on_success boolean NOT NULL DEFAULT false,
    state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    progress double precision NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 1),
    response_count integer NOT NULL DEFAULT 0,
    item_count integer NOT NULL DEFAULT 0,
    iterations integer NOT NULL DEFAULT 0,
    converged boolean NOT NULL DEFAULT false,
    log_likelihood double precision NOT NULL DEFAULT 0,
    result_version integer,
    error_message text NOT NULL DEFAULT '',
    creator_id text NOT NULL,
    -- The worker holding a running run: it renews heartbeat_time while it works, and only the holder of claim_id
    -- may finish the run. A run whose heartbeat stops (its replica died) is claimed again by another worker;
    -- claims counts how often, so a run that kills every worker that takes it fails instead of going round forever.
    claim_id text,
    claims integer NOT NULL DEFAULT 0,
    heartbeat_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    start_time timestamptz,
    finish_time timestamptz,
    FOREIGN KEY (org_id, result_version) REFERENCES parameter_versions (org_id, version),
    CHECK ((state = 'succeeded') = (result_version IS NOT NULL))
);
-- ListCalibrations: an organisation's runs newest first.
CREATE INDEX calibrations_org ON calibrations (org_id, create_time DESC, calibration_id DESC);
-- Workers claim the oldest waiting run (and running ones whose worker went silent) across all organisations.
CREATE INDEX calibrations_unfinished ON calibrations (create_time, calibration_id) WHERE state IN ('queued', 'running');
SELECT platform.enable_tenant_rls('calibrations');
