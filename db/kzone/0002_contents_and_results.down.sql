DROP TABLE kzone_ai_results;
DROP TABLE kzone_contents;
