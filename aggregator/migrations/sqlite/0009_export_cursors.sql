-- Export cursors (see src/export/kafka.rs): how far an exporter has handed the events table on.
-- last_id: every events.id up to it was acknowledged by the destination (or is known never to
-- commit). owner / lease_until_ms: the replica exporting now (one at a time per cursor), until when.
CREATE TABLE export_cursors (
    name           TEXT    PRIMARY KEY NOT NULL,
    last_id        INTEGER NOT NULL,
    owner          TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    updated_at_ms  INTEGER NOT NULL
);
