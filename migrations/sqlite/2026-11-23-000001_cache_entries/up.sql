-- Cached upstream responses (cache-core `SqliteStore`). Timestamps are Unix milliseconds.
CREATE TABLE cache_entries (
    key         TEXT    NOT NULL PRIMARY KEY, -- 32 lower-case hex chars of the MD5 CacheKey
    signature   TEXT    NOT NULL,             -- canonical request signature, compared on lookup
    upstream    TEXT    NOT NULL,
    route       TEXT    NOT NULL,
    status      INTEGER NOT NULL,
    headers     TEXT    NOT NULL,             -- JSON array of [name, value] pairs
    body        BLOB    NOT NULL,
    stored_at   BIGINT  NOT NULL,
    fresh_until BIGINT  NOT NULL,
    swr_until   BIGINT  NOT NULL,             -- stale-while-revalidate horizon
    sie_until   BIGINT  NOT NULL,             -- stale-if-error horizon
    expires_at  BIGINT  NOT NULL,             -- max of the three horizons; swept after it
    cost        REAL    NOT NULL
);

CREATE INDEX cache_entries_expires_at ON cache_entries (expires_at);
CREATE INDEX cache_entries_upstream_route ON cache_entries (upstream, route);
