-- Reference content (songs and choreographies learners practise against) and stored analysis results.
-- Both tenant-owned: zone_id and org_id on every row, row-level security on both tables. Media live in object
-- storage (services/runtime/media.py); rows keep their keys.

CREATE TABLE kzone_contents (
    content_id text PRIMARY KEY,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('song', 'choreography')),
    title text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    artist text NOT NULL DEFAULT '' CHECK (length(artist) <= 200),
    description text NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    language text NOT NULL DEFAULT '' CHECK (length(language) <= 35),
    lyrics text NOT NULL DEFAULT '' CHECK (length(lyrics) <= 20000),
    is_public boolean NOT NULL DEFAULT false,
    status text NOT NULL DEFAULT 'awaiting_media'
        CHECK (status IN ('awaiting_media', 'processing', 'ready', 'failed')),
    processing_error text NOT NULL DEFAULT '' CHECK (status = 'failed' OR processing_error = ''),
    -- A new id per upload: the extraction of that upload. Finishing an extraction names it, so the result of an
    -- extraction whose media has been replaced since is not written over the newer upload's.
    processing_job_id text NOT NULL DEFAULT '',
    media_uri text NOT NULL DEFAULT '',
    media_content_type text NOT NULL DEFAULT '',
    -- Given by the creator (tempo 0, downbeat NULL: not given). Extraction writes the detected_* columns; a given
    -- value wins over a detected one, and replacing the media forgets only the detected ones.
    tempo_bpm double precision NOT NULL DEFAULT 0 CHECK (tempo_bpm = 0 OR tempo_bpm BETWEEN 20 AND 400),
    beats_per_bar integer NOT NULL DEFAULT 4 CHECK (beats_per_bar BETWEEN 1 AND 32),
    first_downbeat_seconds double precision CHECK (first_downbeat_seconds >= 0),
    duration_seconds double precision NOT NULL DEFAULT 0 CHECK (duration_seconds >= 0),
    detected_tempo_bpm double precision NOT NULL DEFAULT 0 CHECK (detected_tempo_bpm >= 0),
    detected_first_downbeat_seconds double precision CHECK (detected_first_downbeat_seconds >= 0),
    -- The extracted features (megacity.kzone.v1.ReferenceFeatures as JSON), once ready.
    features jsonb,
    -- The extraction of a 'processing' content is claimed by one kzone replica at a time; a claim whose heartbeat
    -- stops (the replica died) is taken over, and a content that has killed MAX claims fails instead.
    claim_id text,
    claims integer NOT NULL DEFAULT 0,
    heartbeat_time timestamptz,
    creator_id text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'ready') = (features IS NOT NULL)),
    CHECK ((status = 'awaiting_media') = (media_uri = '')),
    CHECK ((status = 'awaiting_media') = (processing_job_id = ''))
);
-- ListReferenceContents: an organisation's own and a zone's public references, newest first (and a zone's
-- everything, for its administrators).
CREATE INDEX kzone_contents_org ON kzone_contents (org_id, create_time DESC, content_id DESC);
CREATE INDEX kzone_contents_zone ON kzone_contents (zone_id, create_time DESC, content_id DESC);
-- The extraction workers' queue.
CREATE INDEX kzone_contents_processing ON kzone_contents (update_time) WHERE status = 'processing';
SELECT platform.enable_tenant_rls('kzone_contents');

CREATE TABLE kzone_ai_results (
    result_id text PRIMARY KEY,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    user_id text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('voice', 'dance')),
    source text NOT NULL CHECK (source IN ('live', 'upload', 'job')),
    -- No foreign key: a result keeps its report when its reference is deleted.
    reference_id text NOT NULL DEFAULT '',
    input_media_uri text NOT NULL DEFAULT '',
    job_id text NOT NULL DEFAULT '',
    overall_score real CHECK (overall_score BETWEEN 0 AND 100),
    -- The report (megacity.kzone.v1.VoiceReport or DanceReport as JSON).
    report jsonb NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);
-- ListAnalysisResults, newest first: a learner's own; an organisation's for its teachers; a zone's for its
-- administrators.
CREATE INDEX kzone_ai_results_user ON kzone_ai_results (user_id, create_time DESC, result_id DESC);
CREATE INDEX kzone_ai_results_org ON kzone_ai_results (org_id, create_time DESC, result_id DESC);
CREATE INDEX kzone_ai_results_zone ON kzone_ai_results (zone_id, create_time DESC, result_id DESC);
SELECT platform.enable_tenant_rls('kzone_ai_results');
