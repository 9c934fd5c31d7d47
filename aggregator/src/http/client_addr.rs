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

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;
use axum::http::header::FORWARDED;

/// The de-facto standard header (not in `http::header`).
const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// An IP network: an address and a prefix length (`10.0.0.0/8`, `fd00::/8`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a string is not an [`IpNet`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    #[error("{0:?} is not an IP address or CIDR (e.g. 10.0.0.0/8, 192.0.2.7, fd00::/8)")]
    Syntax(String),
    #[error("{0:?}: the prefix length must be at most {1}")]
    Prefix(String, u8),
    #[error("{0:?} has host bits set; the network is {1}")]
    HostBits(String, IpNet),
}

impl IpNet {
    /// The network `addr/prefix`; `None` if the prefix is too long or `addr` has host bits set.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let net = Self::unchecked(addr, prefix)?;
        (net.network() == net.addr).then_some(net)
    }

    /// The network holding exactly `addr`.
    pub fn host(addr: IpAddr) -> Self {
        let addr = addr.to_canonical();
        Self { addr, prefix: max_prefix(addr) }
    }

    /// `addr/prefix` with a prefix that fits, host bits not checked. `::ffff:10.0.0.0/104` is the
    /// IPv4 network 10.0.0.0/8 (see [`IpNet::contains`]); a shorter prefix stays IPv6.
    fn unchecked(addr: IpAddr, prefix: u8) -> Option<Self> {
        if prefix > max_prefix(addr) {
            return None;
        }
        Some(match addr.to_canonical() {
            v4 @ IpAddr::V4(_) if addr.is_ipv6() && prefix >= 96 => Self { addr: v4, prefix: prefix - 96 },
            _ => Self { addr, prefix },
        })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network. IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a
    /// dual-stack socket reports for an IPv4 client) count as the IPv4 address, so an IPv6
    /// network never contains them.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(ip)), 32, self.prefix) == u128::from(u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => masked(u128::from(ip), 128, self.prefix) == u128::from(net),
            _ => false,
        }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let bits = masked(u128::from(u32::from(a)), 32, self.prefix);
                IpAddr::V4(u32::try_from(bits).unwrap_or_default().into())
            }
            IpAddr::V6(a) => IpAddr::V6(masked(u128::from(a), 128, self.prefix).into()),
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// The top `prefix` bits of a `width`-bit number (kept in a u128).
fn masked(bits: u128, width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let host_bits = u32::from(width.saturating_sub(prefix));
    let all = if width >= 128 { u128::MAX } else { (1u128 << width) - 1 };
    bits & (all >> host_bits << host_bits)
}

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || IpNetError::Syntax(s.to_owned());
        let t = s.trim();
        let Some((addr, prefix)) = t.split_once('/') else {
            return t.parse::<IpAddr>().map(Self::host).map_err(|_| syntax());
        };
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let max = max_prefix(addr);
        let too_long = || IpNetError::Prefix(s.to_owned(), max);
        let net = Self::unchecked(addr, prefix.parse().map_err(|_| too_long())?).ok_or_else(too_long)?;
        let network = net.network();
        if network == net.addr {
            Ok(net)
        } else {
            Err(IpNetError::HostBits(s.to_owned(), Self { addr: network, ..net }))
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

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
