-- Retention: one row per retention run that deleted something (see store/retention.rs).
-- reason: 'age' (older than [retention] max_age_days) or 'size' (total above max_total_bytes).
-- freed_bytes: snapshot object bytes (exact) plus the estimated database bytes of the rows.
-- oldest_kept_ms: observed_at_ms of the oldest event left after the run (NULL: none left).
CREATE TABLE retention_runs (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at_ms     BIGINT NOT NULL,
    finished_at_ms    BIGINT NOT NULL,
    reason            TEXT   NOT NULL CHECK (reason IN ('age', 'size')),
    deleted_events    BIGINT NOT NULL,
    deleted_health    BIGINT NOT NULL,
    deleted_snapshots BIGINT NOT NULL,
    freed_bytes       BIGINT NOT NULL,
    oldest_kept_ms    BIGINT,
    detail            TEXT   NOT NULL DEFAULT ''
);
CREATE INDEX retention_runs_started ON retention_runs (started_at_ms);

-- Retention deletes the oldest rows first: health history by time across devices, snapshot rows
-- without an event by capture time.
CREATE INDEX device_health_time ON device_health (at_ms);
CREATE INDEX snapshots_taken ON snapshots (taken_at_ms);
