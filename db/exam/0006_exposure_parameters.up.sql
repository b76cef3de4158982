-- Sympson-Hetter exposure parameters per exam and parameter version: the probability that an item, once selected,
-- is administered. Computed by simulation (services/exam/exposure.py) for every published exam with Sympson-Hetter
-- exposure control, again whenever its organisation activates another parameter version. Until they exist, the
-- exam's attempts run without exposure control.
CREATE TABLE exposure_parameters (
    exam_id text NOT NULL REFERENCES exams ON DELETE CASCADE,
    version integer NOT NULL,
    item_id text NOT NULL REFERENCES items ON DELETE CASCADE,
    zone_id text NOT NULL,
    org_id text NOT NULL,
    k double precision NOT NULL CHECK (k > 0 AND k <= 1),
    compute_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (exam_id, version, item_id)
);
CREATE INDEX exposure_parameters_item ON exposure_parameters (item_id);
SELECT platform.enable_tenant_rls('exposure_parameters');
