DROP TABLE organizations;
DROP TABLE zone_domains;
DROP TABLE zones;
