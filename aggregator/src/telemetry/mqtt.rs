//! MQTT: the front of the embedded broker (logins and ACLs of third parties), publishing for third
//! parties, and the bridge of the MQTT uplink.

use metrics::Unit;

use super::Metric;

/// CONNECTs refused by the authenticators.
pub const CONNECT_REFUSED: &str = "its_mqtt_connect_refused_total";
/// CONNECTs refused because a connection limit was reached.
pub const CONNECT_OVER_LIMIT: &str = "its_mqtt_connect_over_limit_total";
/// CONNECTs with clean session 0 forwarded with clean session 1.
pub const PERSISTENT_SESSION_REFUSED: &str = "its_mqtt_persistent_session_refused_total";
/// Connections closed because their grant no longer held.
pub const GRANT_WITHDRAWN: &str = "its_mqtt_grant_withdrawn_total";
/// Subscription filters refused.
pub const SUBSCRIBE_REFUSED: &str = "its_mqtt_subscribe_refused_total";
/// Client PUBLISHes (and last wills) refused.
pub const PUBLISH_REFUSED: &str = "its_mqtt_publish_refused_total";
/// Messages rumqttd sent towards a client that its grant does not cover, dropped.
pub const DELIVERY_REFUSED: &str = "its_mqtt_delivery_refused_total";
/// Client connections open now.
pub const CONNECTIONS_ACTIVE: &str = "its_mqtt_connections_active";
/// Messages published for third parties.
pub const PUBLISHED: &str = "its_mqtt_published_total";
/// Messages for third parties dropped (the client's queue was full).
pub const DROPPED: &str = "its_mqtt_dropped_total";
/// Connection errors of the publisher.
pub const CONNECTION_ERRORS: &str = "its_mqtt_connection_errors_total";
/// Messages of the MQTT uplink dropped by the bridge (label `reason`).
pub const UPLINK_DROPPED: &str = "its_mqtt_uplink_dropped_total";

pub(super) const METRICS: &[Metric] = &[
    Metric::counter(CONNECT_REFUSED, Unit::Count, "MQTT CONNECTs refused: unknown user, wrong password, revoked"),
    Metric::counter(
        CONNECT_OVER_LIMIT,
        Unit::Count,
        "MQTT CONNECTs answered CONNACK 3 because a connection limit was reached, by limit: total, per_client",
    ),
    Metric::counter(
        PERSISTENT_SESSION_REFUSED,
        Unit::Count,
        "MQTT CONNECTs with clean session 0 given a clean session: the credential already holds the most persistent client ids",
    ),
    Metric::counter(
        GRANT_WITHDRAWN,
        Unit::Count,
        "MQTT connections closed because their credential was deleted, created again or its sites changed",
    ),
    Metric::counter(SUBSCRIBE_REFUSED, Unit::Count, "MQTT subscription filters refused (outside the client's grant)"),
    Metric::counter(
        PUBLISH_REFUSED,
        Unit::Count,
        "MQTT PUBLISHes and last wills of clients dropped (topics outside the client's grant)",
    ),
    Metric::counter(
        DELIVERY_REFUSED,
        Unit::Count,
        "MQTT messages dropped on their way to a client because its grant does not cover their topic",
    ),
    Metric::gauge(CONNECTIONS_ACTIVE, Unit::Count, "MQTT client connections open on the embedded broker"),
    Metric::counter(
        PUBLISHED,
        Unit::Count,
        "Messages published to the MQTT broker for third parties (events, counts, status, alerts)",
    ),
    Metric::counter(
        DROPPED,
        Unit::Count,
        "Messages for third parties not published because the MQTT client's queue was full or the broker unreachable",
    ),
    Metric::counter(
        CONNECTION_ERRORS,
        Unit::Count,
        "Connection errors of the aggregator's MQTT publisher (it reconnects)",
    ),
    Metric::counter(
        UPLINK_DROPPED,
        Unit::Count,
        "MQTT uplink messages dropped by the bridge, by reason: malformed, topic, protocol, no_session, stale, busy",
    ),
];
