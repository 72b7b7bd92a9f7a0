-- API keys (keystore `PostgresKeyStore`). Only SHA-256 digests of keys are stored, never keys.
-- Timestamps are Unix milliseconds; money is integer micro-units of currency.
-- Names are unqualified: the schema comes from the connection's search_path.
CREATE TABLE api_keys (
    id                    TEXT   NOT NULL PRIMARY KEY, -- public id, e.g. key_0123456789abcdef
    name                  TEXT   NOT NULL,
    digest                TEXT   NOT NULL,             -- 64 lower-case hex digits of SHA-256(key)
    created_at            BIGINT NOT NULL,
    expires_at            BIGINT,                      -- refused from this instant on
    revoked_at            BIGINT,                      -- set once, never cleared
    allowed_upstreams     TEXT,                        -- JSON array of names; NULL allows all
    rate_limit_count      BIGINT,                      -- requests ...
    rate_limit_per_secs   BIGINT,                      -- ... per this many seconds
    daily_quota           BIGINT,                      -- requests per UTC day
    monthly_quota         BIGINT,                      -- requests per UTC month
    daily_budget_micros   BIGINT,                      -- upstream cost per UTC day
    monthly_budget_micros BIGINT,                      -- upstream cost per UTC month
    CHECK (length(digest) = 64),
    CHECK ((rate_limit_count IS NULL) = (rate_limit_per_secs IS NULL))
);

CREATE UNIQUE INDEX api_keys_digest ON api_keys (digest);
-- Revocation sync (`revoked_since`) reads recent revocations on every node every few seconds.
CREATE INDEX api_keys_revoked_at ON api_keys (revoked_at) WHERE revoked_at IS NOT NULL;
