DROP TABLE IF EXISTS quota_counters;
