//! Alerts: firings and notification deliveries.

use metrics::Unit;

use super::Metric;

/// Alerts opened, label `severity`.
pub const ALERTS_OPENED_TOTAL: &str = "its_alerts_opened_total";
/// Firings folded into an alert that was already open.
pub const ALERTS_DEDUPED_TOTAL: &str = "its_alerts_deduplicated_total";
/// Firings that suppression kept from opening an alert.
pub const ALERTS_SUPPRESSED_TOTAL: &str = "its_alerts_suppressed_total";
/// Alerts escalated.
pub const ALERTS_ESCALATED_TOTAL: &str = "its_alerts_escalated_total";
/// Delivery attempts, labels `kind` (webhook, mqtt, email) and `outcome` (delivered, retry, dead).
pub const DELIVERY_ATTEMPTS_TOTAL: &str = "its_alert_delivery_attempts_total";
/// Seconds from an alert delivery being queued to its successful attempt, label `kind`.
pub const DELIVERY_LATENCY_SECONDS: &str = "its_alert_delivery_latency_seconds";

pub(super) const METRICS: &[Metric] = &[
    Metric::counter(ALERTS_OPENED_TOTAL, Unit::Count, "Alerts opened by the rules, by severity"),
    Metric::counter(
        ALERTS_DEDUPED_TOTAL,
        Unit::Count,
        "Rule firings folded into an alert already open for the same rule and subject (dedupe window)",
    ),
    Metric::counter(
        ALERTS_SUPPRESSED_TOTAL,
        Unit::Count,
        "Rule firings that a suppression window kept from opening an alert",
    ),
    Metric::counter(
        ALERTS_ESCALATED_TOTAL,
        Unit::Count,
        "Critical alerts escalated to further channels because nobody acknowledged them in time",
    ),
    Metric::counter(
        DELIVERY_ATTEMPTS_TOTAL,
        Unit::Count,
        "Alert notification attempts, by kind (webhook, mqtt, email) and outcome (delivered, retry, dead)",
    ),
    Metric::histogram(
        DELIVERY_LATENCY_SECONDS,
        Unit::Seconds,
        "Time from an alert notification being queued to its successful delivery, by kind",
    ),
];
