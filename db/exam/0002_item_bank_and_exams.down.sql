DROP TABLE exams;
DROP TABLE item_parameters;
DROP TABLE items;
DROP TABLE parameter_versions;
