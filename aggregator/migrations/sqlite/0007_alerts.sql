-- Alerts: rules and notification channels as data, alerts with their life cycle, and the durable
-- delivery queue with every attempt (see aggregator/src/alerts).

-- A notification channel: webhook, MQTT or e-mail. `spec` is the JSON of its settings, secrets
-- included (they never leave through the API).
CREATE TABLE alert_channels (
    channel_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL,
    kind          TEXT    NOT NULL,   -- webhook, mqtt, email
    spec          TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

-- An alert rule. `spec` is the JSON of the rule (condition, filter, severity, dedupe window,
-- suppression, channels, escalation).
CREATE TABLE alert_rules (
    rule_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL,
    enabled          INTEGER NOT NULL,   -- 0/1
    spec             TEXT    NOT NULL,
    suppressed_total INTEGER NOT NULL DEFAULT 0,   -- firings not opened because of suppression
    created_by       TEXT,
    created_at_ms    INTEGER NOT NULL,
    updated_at_ms    INTEGER NOT NULL
);

-- Alerts: open -> acknowledged -> resolved. `subject` is what the alert is about
-- (`camera:<device>/<camera>` or `device:<device>`): the dedupe key with the rule. A deleted
-- rule's alerts stay (no foreign key).
CREATE TABLE alerts (
    alert_id           INTEGER PRIMARY KEY AUTOINCREMENT,
    rule_id            INTEGER NOT NULL,
    rule_name          TEXT    NOT NULL,
    severity           TEXT    NOT NULL,   -- info, warning, critical
    state              TEXT    NOT NULL,   -- open, acknowledged, resolved
    subject            TEXT    NOT NULL,
    device_id          TEXT,
    camera             TEXT,
    title              TEXT    NOT NULL,
    details            TEXT    NOT NULL,   -- JSON: what fired it the first time
    count              INTEGER NOT NULL,   -- firings folded into it (1 when opened)
    opened_at_ms       INTEGER NOT NULL,
    last_seen_ms       INTEGER NOT NULL,
    acknowledged_at_ms INTEGER,
    acknowledged_by    TEXT,
    resolved_at_ms     INTEGER,
    resolved_by        TEXT,
    escalated_at_ms    INTEGER
);
CREATE INDEX alerts_unresolved ON alerts (rule_id, subject) WHERE state <> 'resolved';
CREATE INDEX alerts_opened ON alerts (opened_at_ms, alert_id);

-- The delivery queue: one row per (alert, channel, reason). Pending rows are picked up by the
-- delivery worker when `next_attempt_ms` is due (a worker that takes one pushes it forward as a
-- lease, so a crash mid-attempt retries it later); delivered and dead (dead-lettered) rows stay.
CREATE TABLE alert_deliveries (
    delivery_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id        INTEGER NOT NULL,
    channel_id      INTEGER NOT NULL,
    reason          TEXT    NOT NULL,   -- opened, escalated
    state           TEXT    NOT NULL,   -- pending, delivered, dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    round_start     INTEGER NOT NULL DEFAULT 0,   -- attempts before the latest manual retry
    next_attempt_ms INTEGER NOT NULL,
    payload         TEXT    NOT NULL,   -- the JSON body, fixed when enqueued
    last_error      TEXT,
    created_at_ms   INTEGER NOT NULL,
    updated_at_ms   INTEGER NOT NULL
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (state, next_attempt_ms);
CREATE INDEX alert_deliveries_alert ON alert_deliveries (alert_id);

-- Every delivery attempt.
CREATE TABLE alert_delivery_attempts (
    attempt_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id INTEGER NOT NULL,
    alert_id    INTEGER NOT NULL,
    channel_id  INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,   -- 1, 2, ...
    at_ms       INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,   -- delivered, retry, dead
    http_status INTEGER,
    error       TEXT,
    latency_ms  INTEGER NOT NULL
);
CREATE INDEX alert_delivery_attempts_delivery ON alert_delivery_attempts (delivery_id, attempt);
CREATE INDEX alert_delivery_attempts_alert ON alert_delivery_attempts (alert_id);
