DROP TABLE IF EXISTS cache_entries;
