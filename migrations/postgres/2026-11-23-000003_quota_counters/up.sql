-- Quota counters (ratelimit `SqlQuotaStore` / `RedisQuotaStore` sync): the amount a subject
-- (an API key id) used in one UTC window. `used` only grows, by deltas (`used = used + delta`).
CREATE TABLE quota_counters (
    subject      TEXT   NOT NULL,  -- an identifier, never a secret
    window_kind  TEXT   NOT NULL,  -- 'day' or 'month'
    window_start BIGINT NOT NULL,  -- Unix ms of the window's first instant (UTC midnight)
    used         BIGINT NOT NULL,  -- requests, or micro-units of currency
    PRIMARY KEY (subject, window_kind, window_start)
);
