-- Devices: one row per agent, keyed by the device id taken from its client certificate.
CREATE TABLE devices (
    device_id      TEXT    PRIMARY KEY NOT NULL,
    first_seen_ms  INTEGER NOT NULL,
    last_seen_ms   INTEGER NOT NULL,
    agent_version  TEXT    NOT NULL DEFAULT '',
    model          TEXT    NOT NULL DEFAULT '',
    cameras        TEXT    NOT NULL DEFAULT '[]',   -- JSON array of camera ids
    last_health    TEXT,                            -- JSON of its_shared::DeviceHealth
    last_health_ms INTEGER
);

-- Events: (device_id, seq) is the identity and the idempotency key of the ingest.
-- `id` is the rowid (time-ordered tie-breaker for keyset pagination, never exposed).
CREATE TABLE events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id      TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    camera         TEXT    NOT NULL,
    kind           TEXT    NOT NULL,
    observed_at_ms INTEGER NOT NULL,
    ingested_at_ms INTEGER NOT NULL,
    label          TEXT,
    payload        TEXT    NOT NULL,                -- JSON object
    UNIQUE (device_id, seq)
);

-- Keyset pagination, newest first: ORDER BY observed_at_ms DESC, id DESC.
-- In a rowid table every index ends with the rowid (= id), so these serve (observed_at_ms, id).
CREATE INDEX events_time        ON events (observed_at_ms);
CREATE INDEX events_device_time ON events (device_id, observed_at_ms);
CREATE INDEX events_camera_time ON events (camera, observed_at_ms);
CREATE INDEX events_kind_time   ON events (kind, observed_at_ms);
