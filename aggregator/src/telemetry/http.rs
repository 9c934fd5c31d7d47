//! The HTTP API: requests, connections, timeouts, and the live stream (`GET /api/v1/stream`).

use metrics::{Unit, counter, gauge};

use super::Metric;

/// Requests, labels `route` (the route template, `unmatched` for 404s) and `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "its_http_requests_total";
/// Request handling time, label `route`.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "its_http_request_duration_seconds";
pub const HTTP_CONNECTIONS_OPEN: &str = "its_http_connections_open";
pub const HTTP_CONNECTIONS_REFUSED: &str = "its_http_connections_refused_total";
pub const HTTP_TIMEOUTS: &str = "its_http_timeouts_total";
/// Open streams.
pub const STREAM_CLIENTS: &str = "its_stream_clients";
/// Messages sent to stream clients.
pub const STREAM_MESSAGES: &str = "its_stream_messages_total";
/// Clients dropped because they did not keep up.
pub const STREAM_DROPPED: &str = "its_stream_slow_clients_dropped_total";
/// Streams ended because their credential was revoked or expired.
pub const STREAM_CREDENTIAL_ENDED: &str = "its_stream_credential_ended_total";

pub(super) const METRICS: &[Metric] = &[
    Metric::counter(
        HTTP_REQUESTS_TOTAL,
        Unit::Count,
        "HTTP API requests answered, by route (the route template, unmatched for unknown paths) and status",
    ),
    Metric::histogram(
        HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time to handle one HTTP API request, by route template",
    ),
    Metric::gauge(HTTP_CONNECTIONS_OPEN, Unit::Count, "HTTP API connections open now (TLS handshakes included)"),
    Metric::counter(
        HTTP_CONNECTIONS_REFUSED,
        Unit::Count,
        "HTTP API connections closed as soon as accepted because [http] max_connections were open",
    ),
    Metric::counter(
        HTTP_TIMEOUTS,
        Unit::Count,
        "HTTP API connections and requests cut off by a timeout, by phase: handshake (TLS), header (a request head, \
         or the next one on an idle keep-alive connection, not within [http] header_timeout_s), body (a request body \
         not whole within [http] body_timeout_s)",
    ),
    Metric::gauge(STREAM_CLIENTS, Unit::Count, "Open GET /api/v1/stream connections"),
    Metric::counter(STREAM_MESSAGES, Unit::Count, "Messages sent on GET /api/v1/stream"),
    Metric::counter(STREAM_DROPPED, Unit::Count, "Stream clients dropped because they did not read fast enough"),
    Metric::counter(
        STREAM_CREDENTIAL_ENDED,
        Unit::Count,
        "Streams ended because their credential was revoked, disabled or expired",
    ),
];

/// An HTTP API connection closed as soon as accepted: `[http] max_connections` were open.
pub fn http_connection_refused() {
    counter!(HTTP_CONNECTIONS_REFUSED).increment(1);
}

/// An HTTP API connection or request cut off by a timeout. `phase`: `handshake`, `header` or
/// `body`.
pub fn http_timeout(phase: &'static str) {
    counter!(HTTP_TIMEOUTS, "phase" => phase).increment(1);
}

/// Counts an HTTP API connection while it is open.
pub struct HttpConnectionOpen;

impl HttpConnectionOpen {
    pub fn new() -> Self {
        gauge!(HTTP_CONNECTIONS_OPEN).increment(1.0);
        HttpConnectionOpen
    }
}

impl Default for HttpConnectionOpen {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HttpConnectionOpen {
    fn drop(&mut self) {
        gauge!(HTTP_CONNECTIONS_OPEN).decrement(1.0);
    }
}
