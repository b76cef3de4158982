-- Zones (reference data every request needs: which zone a host belongs to) and organisations (tenant-owned).

CREATE TABLE zones (
    zone_id text PRIMARY KEY CHECK (zone_id ~ '^[a-z][a-z0-9-]{1,30}$'),
    display_name text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    description text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    public_org_id text NOT NULL,
    default_locale text NOT NULL DEFAULT 'en',
    supported_locales text[] NOT NULL DEFAULT '{en}',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE zones IS 'The platform''s zones. Not tenant-owned: every caller may read them.';

-- A domain serves its own host and every subdomain of it (api.<domain>, app.<domain>); lower case, no port.
CREATE TABLE zone_domains (
    domain text PRIMARY KEY CHECK (domain ~ '^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$'),
    zone_id text NOT NULL REFERENCES zones ON DELETE CASCADE
);
CREATE INDEX zone_domains_zone ON zone_domains (zone_id);

CREATE TABLE organizations (
    org_id text PRIMARY KEY,
    zone_id text NOT NULL REFERENCES zones,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    plan text NOT NULL DEFAULT 'free' CHECK (plan IN ('free', 'basic', 'pro', 'enterprise')),
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    is_public boolean NOT NULL DEFAULT false,
    contact_email text NOT NULL DEFAULT '',
    suspend_reason text NOT NULL DEFAULT '',
    suspend_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
-- Names are unique per zone, compared case-insensitively; one public organisation per zone.
CREATE UNIQUE INDEX organizations_zone_name ON organizations (zone_id, lower(name));
CREATE UNIQUE INDEX organizations_zone_public ON organizations (zone_id) WHERE is_public;
SELECT platform.enable_tenant_rls('organizations');

-- The eight zones of the design (section 1), each with the public organisation self-registered users join.
INSERT INTO zones (zone_id, display_name, description, public_org_id, default_locale, supported_locales) VALUES
    ('univ', 'UnivPrepAI', 'University entrance exams (CAT) and AI tutor', 'univ-public', 'ko', '{ko,en}'),
    ('college', 'CollegePrepAI', 'College and transfer exams', 'college-public', 'en', '{en,ko}'),
    ('skill', 'SkillPrepAI', 'Technical certifications', 'skill-public', 'en', '{en,ko}'),
    ('medi', 'MediPrepAI', 'Medical certifications', 'medi-public', 'en', '{en,ko}'),
    ('major', 'MajorPrepAI', 'Advanced study in a major', 'major-public', 'en', '{en,ko}'),
    ('kzone', 'My K-Tube', 'K-culture learning: voice, dance, drama analysis, creator studio', 'kzone-public',
        'en', '{en,ko,ja}'),
    ('mpc', 'MPC Study', 'Free practice problems', 'mpc-public', 'ko', '{ko,en}'),
    ('dreamseed', 'DreamSeedAI', 'Unified portal', 'dreamseed-public', 'en', '{en,ko}');

INSERT INTO zone_domains (domain, zone_id) VALUES
    ('univprepai.com', 'univ'),
    ('collegeprepai.com', 'college'),
    ('skillprepai.com', 'skill'),
    ('mediprepai.com', 'medi'),
    ('majorprepai.com', 'major'),
    ('my-ktube.com', 'kzone'),
    ('my-ktube.ai', 'kzone'),
    ('mpcstudy.com', 'mpc'),
    ('dreamseedai.com', 'dreamseed');

-- Row-level security: the seed writes as the platform.
SELECT set_config('megacity.scope', 'platform', true);
INSERT INTO organizations (org_id, zone_id, name, is_public)
SELECT public_org_id, zone_id, display_name || ' (public)', true FROM zones;
