-- MQTT credentials of integrators (third parties that subscribe to the its/v1/... topics).
-- The password is shown once at creation; kept are its SHA-256 (the embedded broker checks it; the
-- password is a long random secret) and a Mosquitto PBKDF2-SHA512 hash ($7$...) for
-- `its-aggregator mqtt mosquitto-config` (an external Mosquitto checks that one).
CREATE TABLE mqtt_credentials (
    username       TEXT    PRIMARY KEY NOT NULL,   -- [A-Za-z0-9._-]{1,64}
    secret_sha256  TEXT    NOT NULL,
    mosquitto_hash TEXT    NOT NULL,
    sites          TEXT    NOT NULL,               -- JSON array of site ids it may subscribe to
    alerts         INTEGER NOT NULL DEFAULT 0,     -- 0/1: may subscribe to its/v1/alerts/#
    created_at_ms  INTEGER NOT NULL,
    created_by     TEXT                            -- the principal that created it
);
