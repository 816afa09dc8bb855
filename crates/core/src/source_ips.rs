//! Source-IP allowlists: the networks a key may be used from (a key's `allowedSourceIps` in the
//! config, or its tag [`SOURCE_IPS_TAG`], which AWS's own tools can set).

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// The reserved tag carrying a key's allowlist: CIDRs separated by commas.
pub const SOURCE_IPS_TAG: &str = "tollgate:allowedSourceIps";

/// A list of networks, IPv4 and IPv6: the ones a key may be used from, or the trusted proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpNetworks(Arc<[IpNet]>);

impl IpNetworks {
    /// Parses CIDRs separated by commas (`203.0.113.0/24, 2001:db8::/32`); a bare address stands
    /// for itself alone (/32, /128).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for written in text.split(',').map(str::trim) {
            let net = written
                .parse::<IpNet>()
                .or_else(|_| written.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!("'{written}' is not a CIDR (such as 203.0.113.0/24 or 2001:db8::/32)")
                })?;
            nets.push(net.trunc());
        }
        Ok(Self(nets.into()))
    }

    /// An allowlist read back from a store, where it was checked when written: should it no longer
    /// parse, no address is allowed (a key is never opened to everyone by a bad record).
    pub fn stored(text: &str) -> Self {
        Self::parse(text).unwrap_or_else(|_| Self(Arc::new([])))
    }

    /// Whether `ip` is in one of the networks. An IPv4 client on an IPv6 socket (`::ffff:a.b.c.d`)
    /// is its IPv4 address.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The networks as the tag writes them: CIDRs separated by commas.
    pub fn to_tag(&self) -> String {
        let nets: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        nets.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_of_both_families() {
        let list = IpNetworks::parse("203.0.113.0/24, 2001:db8::/32,198.51.100.7").unwrap();
        assert!(list.allows(ip("203.0.113.200")));
        assert!(!list.allows(ip("203.0.114.1")));
        assert!(list.allows(ip("2001:db8:1::5")));
        assert!(!list.allows(ip("2001:db9::1")));
        assert!(list.allows(ip("198.51.100.7")));
        assert!(!list.allows(ip("198.51.100.8")));
        // An IPv4 client seen on an IPv6 socket.
        assert!(list.allows(ip("::ffff:203.0.113.9")));
        assert_eq!(
            list.to_tag(),
            "203.0.113.0/24,2001:db8::/32,198.51.100.7/32"
        );
        // Host bits are dropped: the network is what is meant.
        assert_eq!(
            IpNetworks::parse("10.1.2.3/8").unwrap().to_tag(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn malformed_lists_are_named_and_stored_ones_fail_closed() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "example.com",
            "10.0.0.0/8,,",
            "::1/129",
        ] {
            let e = IpNetworks::parse(bad).unwrap_err();
            assert!(e.contains("is not a CIDR"), "{bad}: {e}");
        }
        let closed = IpNetworks::stored("not a list");
        assert!(!closed.allows(ip("127.0.0.1")));
        assert!(!closed.allows(ip("::1")));
    }
}
