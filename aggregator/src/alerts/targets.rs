//! Where notifications may go: a channel's webhook URL, MQTT broker or SMTP server is chosen by
//! whoever may write channels, and the aggregator connects to it from inside the traffic
//! centre's network. So that a channel cannot be pointed at the aggregator itself or at what is
//! only reachable from its host (a local admin port, a cloud metadata service at
//! 169.254.169.254), connections to these addresses are refused:
//!
//! - loopback (`127.0.0.0/8`, `::1`) and the name `localhost`;
//! - link-local (`169.254.0.0/16`, `fe80::/10`);
//! - unspecified, broadcast and multicast addresses, and `0.0.0.0/8`;
//!
//! each also in its IPv4-mapped IPv6 form. Private networks (`10.0.0.0/8`, `fd00::/8`, ...) are
//! allowed: a centre's own receivers live there. `[alerts] allowed_target_networks` lists
//! networks allowed even so (e.g. `["127.0.0.1"]` for a relay on the same host).
//!
//! The check is made twice: when a channel is saved (an address literal in the URL or host; 400
//! naming the field), and when a delivery connects — a host name is resolved, and only allowed
//! addresses are used, so a name that resolves (or later re-resolves) to a refused address
//! cannot get through.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::model::{ChannelSpec, ChannelTarget, FieldError};
use crate::netaddr::IpNet;

/// Which addresses notifications may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Allowed even though in a refused class.
    pub allowed: Vec<IpNet>,
}

impl TargetPolicy {
    /// Whether a connection to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allowed.iter().any(|n| n.contains(ip)) || !refused_class(ip)
    }

    /// Why `host` (a name or an address literal, IPv6 possibly in brackets) is refused before
    /// any lookup, if it is.
    pub fn check_host(&self, host: &str) -> Result<(), String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            if !self.allows(ip) {
                return Err(format!(
                    "{ip} is a loopback, link-local, multicast or unspecified address: not allowed as a target \
                     (see [alerts] allowed_target_networks)"
                ));
            }
        } else if is_localhost(bare) && !self.allows(IpAddr::from([127, 0, 0, 1])) {
            return Err(format!(
                "{bare:?} names this host: not allowed as a target (see [alerts] allowed_target_networks)"
            ));
        }
        Ok(())
    }

    /// The allowed addresses of `host:port`: an address literal as it is, a name resolved (an
    /// error when it resolves to no allowed address).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        self.check_host(host)?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                tokio::net::lookup_host((bare, port)).await.map_err(|e| format!("resolving {bare}: {e}"))?.collect()
            }
        };
        let allowed: Vec<SocketAddr> = addrs.iter().copied().filter(|a| self.allows(a.ip())).collect();
        if allowed.is_empty() {
            return Err(format!(
                "{bare} resolves only to addresses that are not allowed as targets ({}); see [alerts] allowed_target_networks",
                addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(allowed)
    }

    /// A resolver for the webhook client that hands out only allowed addresses.
    pub fn resolver(&self) -> Arc<PolicyResolver> {
        Arc::new(PolicyResolver { policy: self.clone() })
    }
}

/// The host part of `mqtt://host[:port]`.
pub fn broker_host(broker: &str) -> Option<&str> {
    let rest = broker.strip_prefix("mqtt://")?;
    Some(match rest.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => rest,
    })
}

/// The fields of a channel whose host the policy refuses (address literals and `localhost`;
/// names are checked when a delivery connects).
pub fn channel_target_errors(policy: &TargetPolicy, spec: &ChannelSpec) -> Vec<FieldError> {
    let refused = |path: &str, host: &str| {
        policy.check_host(host).err().map(|message| FieldError { path: path.to_owned(), message })
    };
    match &spec.target {
        ChannelTarget::Webhook { url, .. } => url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .and_then(|h| refused("target.url", &h))
            .into_iter()
            .collect(),
        ChannelTarget::Mqtt { broker, .. } => {
            broker_host(broker).and_then(|h| refused("target.broker", h)).into_iter().collect()
        }
        ChannelTarget::Email { smtp, .. } => {
            smtp.as_ref().and_then(|s| refused("target.smtp.host", &s.host)).into_iter().collect()
        }
    }
}

fn is_localhost(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h == "localhost" || h.ends_with(".localhost")
}

/// Loopback, link-local, unspecified, broadcast, multicast, or `0.0.0.0/8` (canonical form).
fn refused_class(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// [`reqwest::dns::Resolve`] over [`TargetPolicy::resolve`].
#[derive(Debug)]
pub struct PolicyResolver {
    policy: TargetPolicy,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = policy.resolve(&host, 0).await.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> {
                Box::new(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))
            })?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn refused_classes_and_exceptions() {
        let p = TargetPolicy::default();
        for bad in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "0.1.2.3",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!p.allows(ip(bad)), "{bad}");
        }
        for good in ["10.1.2.3", "192.168.0.10", "192.0.2.7", "8.8.8.8", "fd00::1", "2001:db8::1"] {
            assert!(p.allows(ip(good)), "{good}");
        }
        let relay = TargetPolicy { allowed: vec!["127.0.0.1".parse().expect("net")] };
        assert!(relay.allows(ip("127.0.0.1")) && !relay.allows(ip("127.0.0.2")));
        assert!(relay.check_host("localhost").is_ok());
        assert!(p.check_host("localhost").is_err() && p.check_host("api.localhost.").is_err());
        assert!(p.check_host("[::1]").is_err() && p.check_host("hooks.example.net").is_ok());
        let everything =
            TargetPolicy { allowed: vec!["0.0.0.0/0".parse().expect("net"), "::/0".parse().expect("net")] };
        assert!(everything.allows(ip("::1")) && everything.allows(ip("169.254.169.254")));
    }

    #[tokio::test]
    async fn names_resolving_to_refused_addresses_are_refused() {
        let p = TargetPolicy::default();
        let err = p.resolve("localhost", 80).await.expect_err("localhost");
        assert!(err.contains("not allowed"), "{err}");
        assert!(p.resolve("169.254.169.254", 80).await.is_err());
        assert_eq!(
            p.resolve("192.0.2.7", 8080).await.expect("literal"),
            vec![SocketAddr::from(([192, 0, 2, 7], 8080))]
        );
    }
}
