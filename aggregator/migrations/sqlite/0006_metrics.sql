-- Traffic metrics (see src/analytics): rollups of line crossings and zone occupancy per camera,
-- line / zone, class and direction over 1 minute, 15 minutes and 1 hour.

-- Buckets of a camera whose rollups must be recomputed, one row per resolution: marked in the
-- same transaction as the events that changed them, so no committed event is ever left out of
-- the rollups. `gen` grows with every mark; the worker deletes a mark only if it is unchanged
-- since it read it. `since_ms`: when the bucket became dirty (coarse buckets are recomputed at
-- most every few seconds while traffic keeps marking them).
CREATE TABLE rollup_dirty (
    device_id    TEXT   NOT NULL,
    camera       TEXT   NOT NULL,
    resolution_s INTEGER NOT NULL,
    bucket_ms    INTEGER NOT NULL,
    gen          INTEGER NOT NULL,
    since_ms     INTEGER NOT NULL,
    PRIMARY KEY (device_id, camera, resolution_s, bucket_ms)
);

-- What a rollup recomputation reads: a camera's crossings and occupancy reports in a time range.
CREATE INDEX events_rollup_source ON events (camera, device_id, observed_at_ms)
    WHERE kind IN ('line_crossing', 'zone_occupancy');

-- One row per bucket and series. resolution_s: 60, 900 or 3600. A crossing series has line,
-- label (class) and direction, zone = ''; an occupancy series has zone, and line = label =
-- direction = ''. speed_* cover the crossings with a measured speed (speed_samples of them).
-- occupancy: time-weighted mean fraction of analysed frames with a road user in the zone.
CREATE TABLE metric_rollups (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    resolution_s   INTEGER NOT NULL,
    bucket_ms      INTEGER NOT NULL,
    device_id      TEXT   NOT NULL,
    camera         TEXT   NOT NULL,
    line           TEXT   NOT NULL,
    zone           TEXT   NOT NULL,
    label          TEXT   NOT NULL,
    direction      TEXT   NOT NULL,
    count          INTEGER NOT NULL,
    speed_samples  INTEGER NOT NULL,
    speed_mean_kmh REAL,
    speed_p85_kmh  REAL,
    occupancy      REAL,
    updated_at_ms  INTEGER NOT NULL,
    UNIQUE (resolution_s, device_id, camera, bucket_ms, line, zone, label, direction)
);
CREATE INDEX metric_rollups_time ON metric_rollups (resolution_s, bucket_ms);
CREATE INDEX metric_rollups_camera_time ON metric_rollups (resolution_s, device_id, camera, bucket_ms);

-- Unusual volumes and speed drops found by the anomaly detection; one per kind, series and bucket.
CREATE TABLE anomalies (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT   NOT NULL,
    device_id     TEXT   NOT NULL,
    camera        TEXT   NOT NULL,
    line          TEXT   NOT NULL,
    resolution_s  INTEGER NOT NULL,
    bucket_ms     INTEGER NOT NULL,
    value         REAL NOT NULL,
    baseline      REAL NOT NULL,
    spread        REAL NOT NULL,
    score         REAL NOT NULL,
    samples       INTEGER NOT NULL,
    detected_at_ms INTEGER NOT NULL,
    UNIQUE (kind, device_id, camera, line, bucket_ms)
);
CREATE INDEX anomalies_time ON anomalies (bucket_ms);

-- Progress of the analytics (key -> value), e.g. the last bucket checked for anomalies.
CREATE TABLE analytics_state (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
