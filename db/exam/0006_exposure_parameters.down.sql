DROP TABLE exposure_parameters;
