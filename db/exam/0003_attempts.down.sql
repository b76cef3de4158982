DROP TABLE attempt_responses;
DROP TABLE attempts;
