"""Item bank, computerized adaptive testing, attempts, scoring, reports and calibration."""
