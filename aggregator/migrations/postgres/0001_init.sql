-- Devices: one row per agent, keyed by the device id taken from its client certificate.
CREATE TABLE devices (
    device_id      TEXT   PRIMARY KEY,
    first_seen_ms  BIGINT NOT NULL,
    last_seen_ms   BIGINT NOT NULL,
    agent_version  TEXT   NOT NULL DEFAULT '',
    model          TEXT   NOT NULL DEFAULT '',
    cameras        JSONB  NOT NULL DEFAULT '[]'::jsonb,  -- array of camera ids
    last_health    JSONB,                                -- its_shared::DeviceHealth
    last_health_ms BIGINT
);

-- Events: (device_id, seq) is the identity and the idempotency key of the ingest.
-- `id` is the time-ordered tie-breaker for keyset pagination, never exposed.
CREATE TABLE events (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id      TEXT   NOT NULL,
    seq            BIGINT NOT NULL,
    camera         TEXT   NOT NULL,
    kind           TEXT   NOT NULL,
    observed_at_ms BIGINT NOT NULL,
    ingested_at_ms BIGINT NOT NULL,
    label          TEXT,
    payload        JSONB  NOT NULL,
    CONSTRAINT events_device_seq UNIQUE (device_id, seq)
);

-- Keyset pagination, newest first: ORDER BY observed_at_ms DESC, id DESC.
CREATE INDEX events_time        ON events (observed_at_ms, id);
CREATE INDEX events_device_time ON events (device_id, observed_at_ms, id);
CREATE INDEX events_camera_time ON events (camera, observed_at_ms, id);
CREATE INDEX events_kind_time   ON events (kind, observed_at_ms, id);
