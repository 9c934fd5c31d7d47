-- Snapshots: the JPEG pictures of an event, kept in object storage; this row says where.
-- (device_id, seq) names the event the pictures belong to and is the idempotency key of the
-- upload. A row may exist before its event (the pictures travel on their own stream) or without
-- one (the agent evicted the event but still sent its pictures).
CREATE TABLE snapshots (
    device_id    TEXT   NOT NULL,
    seq          BIGINT NOT NULL,
    camera       TEXT   NOT NULL,
    taken_at_ms  BIGINT NOT NULL,
    full_key     TEXT   NOT NULL,   -- object key of the full frame
    full_bytes   BIGINT NOT NULL,
    crop_key     TEXT,              -- object key of the crop, if the agent sent one
    crop_bytes   BIGINT,
    stored_at_ms BIGINT NOT NULL,
    CONSTRAINT snapshots_pkey PRIMARY KEY (device_id, seq)
);
