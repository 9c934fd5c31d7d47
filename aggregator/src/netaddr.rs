//! IP networks (`10.0.0.0/8`, `fd00::/8`, one address): the trusted proxies of the HTTP API,
//! the networks alert channels may reach. Depends on nothing else in the crate.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

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
