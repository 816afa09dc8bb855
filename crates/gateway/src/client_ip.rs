//! Who the client is, by address, for the keys that may only be used from some networks: the
//! socket's peer, or behind trusted proxies (`trustedProxies`) the address they name in
//! `X-Forwarded-For`, read right to left past the trusted hops, as nginx's `real_ip_recursive on`
//! does. The chain read is the one the backend receives (the client's fields and the peer appended),
//! so what is checked is what the backend reads.

use std::net::{IpAddr, SocketAddr};

use tollgate_core::IpNetworks;

/// Where a request came from, worked out only when a key's allowlist asks.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress<'a> {
    /// The socket's peer.
    pub(crate) peer: IpAddr,
    /// `X-Forwarded-For` as it goes upstream, the peer last.
    pub(crate) chain: &'a [u8],
    /// The proxies whose word on the client is taken.
    pub(crate) trusted: Option<&'a IpNetworks>,
    /// The peer is the proxy asking the decision endpoint: it is taken at its word, and the client
    /// is what its field names (nothing, when it names none).
    pub(crate) vouched: bool,
}

impl<'a> ClientAddress<'a> {
    /// A client reached directly, with no proxy in between (tests, benches).
    pub const fn peer(peer: IpAddr) -> Self {
        Self {
            peer,
            chain: b"",
            trusted: None,
            vouched: false,
        }
    }

    /// The client's address; `None` when a trusted hop names something that is not an address (or
    /// the proxy asking names nobody): a key with an allowlist is then refused, never let through.
    pub(crate) fn resolve(&self) -> Option<IpAddr> {
        if self.trusted.is_none() && !self.vouched {
            return Some(self.peer);
        }
        let chain = std::str::from_utf8(self.chain).ok()?;
        let mut hops = chain.rsplit(',').map(str::trim);
        if self.vouched {
            // The peer itself, appended last.
            hops.next();
        }
        let mut last = None;
        for hop in hops {
            let ip = address(hop)?;
            if !self.trusted.is_some_and(|t| t.allows(ip)) {
                return Some(ip);
            }
            last = Some(ip);
        }
        // Every hop trusted: the first of them.
        last
    }

    /// Whether the client is in `allowed`.
    pub(crate) fn within(&self, allowed: &IpNetworks) -> bool {
        self.resolve().is_some_and(|ip| allowed.allows(ip))
    }
}

/// One hop of `X-Forwarded-For`: an address, bare or with a port (`[2001:db8::1]:443`, which
/// some proxies write).
fn address(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn from(chain: &str, trusted: Option<&IpNetworks>, vouched: bool) -> Option<IpAddr> {
        let peer = chain
            .rsplit(',')
            .next()
            .map_or(ip("192.0.2.1"), |p| ip(p.trim()));
        ClientAddress {
            peer,
            chain: chain.as_bytes(),
            trusted,
            vouched,
        }
        .resolve()
    }

    #[test]
    fn trusted_hops_are_read_past_right_to_left() {
        let lb = IpNetworks::parse("10.0.0.0/8, fd00::/8").unwrap();
        let lb = Some(&lb);
        // No trusted proxy: the peer, whatever the client wrote.
        assert_eq!(
            from("203.0.113.9, 198.51.100.2", None, false),
            Some(ip("198.51.100.2"))
        );
        // An untrusted peer's chain is not read.
        assert_eq!(
            from("203.0.113.9, 198.51.100.2", lb, false),
            Some(ip("198.51.100.2"))
        );
        // Trusted peers (one, then two): the first untrusted hop from the right.
        assert_eq!(
            from("203.0.113.9, 10.1.1.1", lb, false),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            from("6.6.6.6, 203.0.113.9, 10.2.2.2, 10.1.1.1", lb, false),
            Some(ip("203.0.113.9")),
            "what the client wrote before the first untrusted hop is not believed"
        );
        assert_eq!(
            from("2001:db8::7, fd00::1", lb, false),
            Some(ip("2001:db8::7"))
        );
        assert_eq!(
            from("[2001:db8::7]:443, 10.1.1.1", lb, false),
            Some(ip("2001:db8::7"))
        );
        // Only trusted hops: the first.
        assert_eq!(from("10.3.3.3, 10.1.1.1", lb, false), Some(ip("10.3.3.3")));
        // A trusted hop naming no address: nobody.
        assert_eq!(from("unknown, 10.1.1.1", lb, false), None);
    }

    #[test]
    fn the_proxy_asking_names_the_client() {
        let lb = IpNetworks::parse("10.0.0.0/8").unwrap();
        // The decision endpoint: the peer (the proxy, last) vouches for the hop before it.
        assert_eq!(
            from("203.0.113.9, 127.0.0.1", None, true),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            from("203.0.113.9, 10.1.1.1, 127.0.0.1", Some(&lb), true),
            Some(ip("203.0.113.9"))
        );
        // A proxy that names nobody: nobody.
        assert_eq!(from("127.0.0.1", None, true), None);
    }
}
