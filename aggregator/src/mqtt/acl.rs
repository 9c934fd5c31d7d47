//! Who may connect to the embedded broker, and what each client may subscribe to, receive and
//! publish.
//!
//! The broker's front ([`super::broker`]) asks its [`Authenticator`]s in turn about every
//! CONNECT; the first that recognises the client answers [`AuthOutcome::Granted`] with a
//! [`Grant`] (topic filters it may subscribe within and receive from, topics it may publish to,
//! and the generation of the credential it was made from) or [`AuthOutcome::Refused`]. While the
//! connection lasts the front asks [`Authenticator::is_current`] every few seconds whether the
//! grant still holds. The integrator credentials ([`super::credentials`]) are one
//! authenticator; another module (the agents' MQTT uplink) can add its own with
//! [`super::broker::Broker::add_authenticator`], e.g. granting a device publish and subscribe
//! rights on `its/uplink/{device}/#` only ([`Grant::device_uplink`]).

use std::net::SocketAddr;

use async_trait::async_trait;

use super::topics::{filter_within, topic_matches, valid_filter};

/// What a client's CONNECT says about it.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub peer: SocketAddr,
}

/// The rights of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who it is, for logs and revocation checks: `integrator:{username}`, `device:{id}`, ...
    pub principal: String,
    /// Which issue of the principal's credential this grant was made from: it changes whenever
    /// the credential is created again (hex, no `:`). The front puts it in the client id it gives
    /// rumqttd, so a persistent session made under an earlier issue is never resumed by a later
    /// one. Empty when the issuer has no such notion (e.g. a device's certificate).
    pub generation: String,
    /// A subscription is allowed when its filter stays within one of these filters, and a message
    /// is delivered to the client only when its topic matches one of them.
    pub subscribe: Vec<String>,
    /// A PUBLISH (and a last will) is allowed when its topic matches one of these filters.
    pub publish: Vec<String>,
}

impl Grant {
    /// The rights a device needs for an uplink under `its/uplink/{device}/#`.
    pub fn device_uplink(device: &str) -> Self {
        let filter = format!("its/uplink/{}/#", super::topics::segment(device));
        Self {
            principal: format!("device:{device}"),
            generation: String::new(),
            subscribe: vec![filter.clone()],
            publish: vec![filter],
        }
    }

    /// Whether a subscription to `filter` is allowed.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        valid_filter(filter) && self.subscribe.iter().any(|a| filter_within(filter, a))
    }

    /// Whether a message on `topic` may be delivered to the client (whatever its session
    /// subscribed to: a session can outlive the grant it was made under).
    pub fn may_receive(&self, topic: &str) -> bool {
        !topic.is_empty() && self.subscribe.iter().any(|a| topic_matches(topic, a))
    }

    /// Whether a PUBLISH to `topic` is allowed.
    pub fn may_publish(&self, topic: &str) -> bool {
        !topic.is_empty() && self.publish.iter().any(|a| topic_matches(topic, a))
    }
}

/// The answer of one authenticator about one CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Not a client of this authenticator: ask the next one.
    NotMine,
    /// Recognised and refused (wrong password, revoked).
    Refused,
    /// Recognised and accepted, with these rights.
    Granted(Grant),
}

/// Decides about CONNECTs. Implementations must be cheap on [`Authenticator::is_current`]: the
/// front asks it every few seconds for every connection it granted.
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, req: &ConnectRequest) -> AuthOutcome;

    /// Whether a grant this authenticator gave still holds (false: the front closes the
    /// connection, e.g. after the credential was revoked, created again, or its scope changed).
    /// Default: always.
    async fn is_current(&self, _grant: &Grant) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants() {
        let g = Grant {
            principal: "integrator:acme".into(),
            generation: "0123456789abcdef".into(),
            subscribe: vec!["its/v1/north/#".into(), "its/v1/alerts/#".into()],
            publish: vec![],
        };
        assert!(g.may_subscribe("its/v1/north/+/counts"));
        assert!(g.may_subscribe("its/v1/alerts/critical"));
        assert!(!g.may_subscribe("its/v1/south/#"));
        assert!(!g.may_subscribe("#"));
        assert!(!g.may_subscribe("its/v1/north/a#"));
        assert!(!g.may_publish("its/v1/north/x"));
        assert!(g.may_receive("its/v1/north/cam-1/counts"));
        assert!(g.may_receive("its/v1/alerts/critical"));
        assert!(!g.may_receive("its/v1/south/cam-2/counts"));
        assert!(!g.may_receive("its/v1/northeast/cam-3/counts"));
        assert!(!g.may_receive("its/v1/north/+"), "not a topic");
        assert!(!g.may_receive(""));
        let d = Grant::device_uplink("dev-1");
        assert!(d.may_publish("its/uplink/dev-1/events"));
        assert!(!d.may_publish("its/uplink/dev-2/events"));
        assert!(!d.may_publish("its/uplink/dev-1/+"));
        assert!(d.may_subscribe("its/uplink/dev-1/ack"));
        assert!(!d.may_subscribe("its/uplink/+/ack"));
    }
}
