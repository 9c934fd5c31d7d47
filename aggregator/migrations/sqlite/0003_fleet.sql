-- Fleet: sites, device names/sites/disablement, cameras as resources, health history, and the
-- event columns the API filters on.

-- Sites: a place (junction, depot, motorway section) that devices and cameras belong to.
CREATE TABLE sites (
    site_id       TEXT    PRIMARY KEY NOT NULL,   -- [A-Za-z0-9._-]{1,64}
    name          TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL
);

-- Devices gain an operator-given name, a site, and a disablement time (NULL: enabled). A
-- disabled device's certificate is refused by the ingest.
ALTER TABLE devices ADD COLUMN name TEXT;
ALTER TABLE devices ADD COLUMN site_id TEXT REFERENCES sites (site_id);
ALTER TABLE devices ADD COLUMN disabled_at_ms INTEGER;
CREATE INDEX devices_site ON devices (site_id);

-- Cameras: one row per camera a device ever announced in its hello. A camera no longer announced
-- stays (its events are history), with announced = 0.
-- site_id is the effective site: site_override when set, else the device's site (kept up to date
-- by the fleet code in the same transaction as either change).
CREATE TABLE cameras (
    device_id         TEXT    NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    camera            TEXT    NOT NULL,
    name              TEXT,
    site_override     TEXT    REFERENCES sites (site_id),
    site_id           TEXT    REFERENCES sites (site_id),
    first_seen_ms     INTEGER NOT NULL,
    last_announced_ms INTEGER NOT NULL,
    announced         INTEGER NOT NULL DEFAULT 1,   -- 0/1: in the device's latest hello
    PRIMARY KEY (device_id, camera)
);
CREATE INDEX cameras_site ON cameras (site_id);
CREATE INDEX cameras_site_override ON cameras (site_override);

INSERT INTO cameras (device_id, camera, first_seen_ms, last_announced_ms)
SELECT d.device_id, j.value, d.first_seen_ms, d.last_seen_ms
FROM devices d, json_each(d.cameras) j
WHERE j.type = 'text'
ON CONFLICT (device_id, camera) DO NOTHING;

-- Health history: every heartbeat's report (the latest is also on the device row).
CREATE TABLE device_health (
    device_id TEXT    NOT NULL,
    at_ms     INTEGER NOT NULL,
    report    TEXT    NOT NULL   -- JSON of its_shared::DeviceHealth
);
CREATE INDEX device_health_device_time ON device_health (device_id, at_ms);

-- Events gain the filter columns, taken from the kind at insert time:
-- zone, line, direction ('in'/'out', line crossings), and the event's speed (speed_kmh of a line
-- crossing, speed measurement or wrong way; mean_speed_kmh of congestion).
ALTER TABLE events ADD COLUMN zone TEXT;
ALTER TABLE events ADD COLUMN line TEXT;
ALTER TABLE events ADD COLUMN direction TEXT;
ALTER TABLE events ADD COLUMN speed_kmh REAL;

UPDATE events SET zone = json_extract(payload, '$.zone')
WHERE kind IN ('speed_measurement', 'zone_enter', 'zone_exit', 'zone_dwell', 'stopped_vehicle', 'wrong_way',
               'congestion', 'zone_occupancy');
UPDATE events SET line = json_extract(payload, '$.line') WHERE kind IN ('line_crossing', 'counts');
UPDATE events SET direction = json_extract(payload, '$.direction') WHERE kind = 'line_crossing';
UPDATE events SET speed_kmh = json_extract(payload, '$.speed_kmh')
WHERE kind IN ('line_crossing', 'speed_measurement', 'wrong_way');
UPDATE events SET speed_kmh = json_extract(payload, '$.mean_speed_kmh') WHERE kind = 'congestion';

-- Newest first within a zone or line (rowid = id ends every index). Partial: most events have
-- neither, and those cost the ingest nothing here.
CREATE INDEX events_zone_time ON events (zone, observed_at_ms) WHERE zone IS NOT NULL;
CREATE INDEX events_line_time ON events (line, observed_at_ms) WHERE line IS NOT NULL;
