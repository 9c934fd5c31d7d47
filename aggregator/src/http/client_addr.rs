//! The client's address behind reverse proxies.
//!
//! A request's TCP peer is the client unless the peer is one of the configured trusted proxies
//! (`[http] trusted_proxies`). Only then are the forwarding headers believed: `X-Forwarded-For`
//! (all its lines, in order) or, when there is none, the `for=` parameters of `Forwarded`
//! (RFC 7239). They are walked from the right, the hop nearest to us, and the first address that
//! is not a trusted proxy is the client. A client can put anything in these headers, but only on
//! the left of what the proxies append, so it cannot choose its own address this way.
//!
//! If every hop is a trusted proxy the leftmost one is the answer. A value that is not an
//! address (`unknown`, an obfuscated `_node`, garbage) ends the walk: the answer is the trusted
//! hop that handed it over.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use axum::http::header::FORWARDED;

/// The de-facto standard header (not in `http::header`).
const X_FORWARDED_FOR: &str = "x-forwarded-for";

pub use crate::netaddr::{IpNet, IpNetError};

/// Whether `ip` is in one of `nets`.
pub fn is_trusted(ip: IpAddr, nets: &[IpNet]) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

/// The client's address: `peer` itself, unless `peer` is a trusted proxy; then the rightmost
/// forwarded address that is not a trusted proxy (see the module documentation).
pub fn client_addr(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let mut client = peer.ip().to_canonical();
    if !is_trusted(client, trusted) {
        return client;
    }
    for hop in forwarded_chain(headers).into_iter().rev() {
        let Some(ip) = hop else {
            break;
        };
        client = ip;
        if !is_trusted(ip, trusted) {
            break;
        }
    }
    client
}

/// The forwarded hops, leftmost (the original client) first; `None` for a value that is not an
/// address.
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let xff: Vec<_> = headers.get_all(X_FORWARDED_FOR).iter().collect();
    if !xff.is_empty() {
        return xff
            .into_iter()
            .flat_map(|v| match v.to_str() {
                Ok(s) => s.split(',').map(|part| parse_node(part.trim())).collect::<Vec<_>>(),
                Err(_) => vec![None],
            })
            .collect();
    }
    headers
        .get_all(FORWARDED)
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(s) => s.split(',').map(forwarded_for).collect::<Vec<_>>(),
            Err(_) => vec![None],
        })
        .collect()
}

/// The `for=` node of one `Forwarded` element (`for=192.0.2.60;proto=https;by=...`).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim().eq_ignore_ascii_case("for").then_some(value.trim())
    })?;
    let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
    parse_node(value)
}

/// `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    let inner = node.strip_prefix('[')?;
    let (addr, rest) = inner.split_once(']')?;
    let port_ok = rest.is_empty() || rest.strip_prefix(':').is_some_and(|p| !p.is_empty());
    if !port_ok {
        return None;
    }
    addr.parse::<std::net::Ipv6Addr>().ok().map(|a| IpAddr::V6(a).to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 40000)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(net(" 192.0.2.7/32 ").to_string(), "192.0.2.7/32");
        assert_eq!(net("::1").to_string(), "::1/128");
        assert_eq!(net("fd00::/8").to_string(), "fd00::/8");
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(net("::/0").to_string(), "::/0");
        assert_eq!(net("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert_eq!(net("::ffff:192.0.2.7").to_string(), "192.0.2.7/32");
        for bad in ["", "/", "10.0.0.0/", "/8", "10.0.0/8", "10.0.0.0/8/8", "10.0.0.0/+8", "10.0.0.0/ 8", "host", "::g"]
        {
            assert_eq!(bad.parse::<IpNet>(), Err(IpNetError::Syntax(bad.to_owned())), "{bad:?}");
        }
        assert!(matches!("10.0.0.0/33".parse::<IpNet>(), Err(IpNetError::Prefix(_, 32))));
        assert!(matches!("fd00::/129".parse::<IpNet>(), Err(IpNetError::Prefix(_, 128))));
        assert!(matches!("10.0.0.0/999".parse::<IpNet>(), Err(IpNetError::Prefix(_, 32))));
        match "10.1.2.3/8".parse::<IpNet>() {
            Err(IpNetError::HostBits(_, n)) => assert_eq!(n, net("10.0.0.0/8")),
            other => panic!("{other:?}"),
        }
        match "fd00::1/8".parse::<IpNet>() {
            Err(IpNetError::HostBits(_, n)) => assert_eq!(n, net("fd00::/8")),
            other => panic!("{other:?}"),
        }
        assert_eq!(IpNet::new(ip("10.0.0.1"), 8), None);
        assert_eq!(IpNet::new(ip("10.0.0.0"), 33), None);
        assert_eq!(IpNet::new(ip("10.0.0.0"), 8), Some(net("10.0.0.0/8")));
        assert_eq!(IpNet::new(ip("::ffff:10.0.0.0"), 104), Some(net("10.0.0.0/8")));
        assert_eq!(IpNet::new(ip("::ffff:0.0.0.0"), 96), Some(net("0.0.0.0/0")));
        assert_eq!(IpNet::new(ip("::ffff:0.0.0.0"), 64), None, "an IPv6 network with host bits");
    }

    #[test]
    fn cidr_matching() {
        let n = net("10.0.0.0/8");
        assert!(n.contains(ip("10.0.0.0")));
        assert!(n.contains(ip("10.255.255.255")));
        assert!(!n.contains(ip("11.0.0.0")));
        assert!(!n.contains(ip("9.255.255.255")));
        assert!(n.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped counts as IPv4");
        assert!(!n.contains(ip("::a01:203")), "IPv4-compatible is IPv6");
        let n = net("192.168.4.0/22");
        assert!(n.contains(ip("192.168.7.255")));
        assert!(!n.contains(ip("192.168.8.0")));
        assert!(!n.contains(ip("192.168.3.255")));
        let n = net("192.0.2.7");
        assert!(n.contains(ip("192.0.2.7")));
        assert!(!n.contains(ip("192.0.2.8")));
        assert!(net("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(net("::/0").contains(ip("2001:db8::1")));
        let n = net("2001:db8:abcd::/48");
        assert!(n.contains(ip("2001:db8:abcd:ffff::1")));
        assert!(!n.contains(ip("2001:db8:abce::1")));
        assert!(!n.contains(ip("10.0.0.1")));
        let n = net("fe80::/10");
        assert!(n.contains(ip("febf::1")));
        assert!(!n.contains(ip("fec0::1")));
        assert!(net("::1").contains(ip("::1")));
        assert!(!net("::1").contains(ip("::2")));
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let h = headers(&[("x-forwarded-for", "198.51.100.1"), ("forwarded", "for=198.51.100.2")]);
        assert_eq!(client_addr(peer("203.0.113.9"), &h, &[]), ip("203.0.113.9"));
        assert_eq!(client_addr(peer("203.0.113.9"), &h, &[net("127.0.0.1")]), ip("203.0.113.9"));
        assert_eq!(client_addr(peer("::ffff:203.0.113.9"), &h, &[]), ip("203.0.113.9"));
    }

    #[test]
    fn trusted_peer_passes_the_rightmost_untrusted_hop() {
        let trusted = [net("127.0.0.1"), net("10.0.0.0/8")];
        let p = peer("127.0.0.1");
        // A client cannot choose its address: what it sent is on the left.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.7")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("198.51.100.7"));
        // Trusted hops on the right are skipped.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.7, 10.1.1.1,10.2.2.2")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("198.51.100.7"));
        // Several header lines are one list, in order.
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "198.51.100.7, 10.1.1.1")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("198.51.100.7"));
        // Every hop trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.1.1.1")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("10.9.9.9"));
        // No header: the proxy itself.
        assert_eq!(client_addr(p, &HeaderMap::new(), &trusted), ip("127.0.0.1"));
        // Ports and brackets.
        let h = headers(&[("x-forwarded-for", "[2001:db8::7]:4711")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("2001:db8::7"));
        let h = headers(&[("x-forwarded-for", "198.51.100.7:4711")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("198.51.100.7"));
        let h = headers(&[("x-forwarded-for", "::ffff:198.51.100.7")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("198.51.100.7"));
        // A dual-stack socket's view of the proxy.
        let h = headers(&[("x-forwarded-for", "198.51.100.7")]);
        assert_eq!(client_addr(peer("::ffff:127.0.0.1"), &h, &trusted), ip("198.51.100.7"));
    }

    #[test]
    fn garbage_ends_the_walk_at_the_hop_that_sent_it() {
        let trusted = [net("127.0.0.1"), net("10.0.0.0/8")];
        let p = peer("127.0.0.1");
        let h = headers(&[("x-forwarded-for", "198.51.100.7, nonsense, 10.1.1.1")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("10.1.1.1"));
        let h = headers(&[("x-forwarded-for", "198.51.100.7, unknown")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("127.0.0.1"));
        let h = headers(&[("x-forwarded-for", "")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("127.0.0.1"));
        let h = headers(&[("x-forwarded-for", "[::1]x")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("127.0.0.1"));
    }

    #[test]
    fn forwarded_header_when_there_is_no_x_forwarded_for() {
        let trusted = [net("127.0.0.1"), net("10.0.0.0/8")];
        let p = peer("127.0.0.1");
        let h = headers(&[("forwarded", "for=1.2.3.4, for=198.51.100.7;proto=https;by=10.0.0.1, For=\"10.3.3.3\"")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("198.51.100.7"));
        let h = headers(&[("forwarded", "proto=https;for=\"[2001:db8:cafe::17]:4711\"")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", "for=198.51.100.7, for=_hidden")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("127.0.0.1"));
        let h = headers(&[("forwarded", "proto=https")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("127.0.0.1"));
        // X-Forwarded-For wins when both are present.
        let h = headers(&[("forwarded", "for=198.51.100.1"), ("x-forwarded-for", "198.51.100.2")]);
        assert_eq!(client_addr(p, &h, &trusted), ip("198.51.100.2"));
    }
}
