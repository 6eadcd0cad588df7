//! Socket addresses as users write them: `127.0.0.1:8080`, `[::1]:8080`, or `localhost:8080`.
//! A host name is resolved once, at start, preferring IPv4: OpenSIPS sends event datagrams over
//! IPv4 only, and its MI socket in the usual configuration is an IPv4 address.

use std::net::{SocketAddr, ToSocketAddrs};

use serde::{Deserialize, Deserializer};

/// Parses `host:port` into an address (clap's value parser for address flags).
pub fn parse(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let all: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("{text:?} is not an address as host:port (e.g. 127.0.0.1:8080, localhost:8080): {e}"))?
        .collect();
    all.iter().find(|a| a.is_ipv4()).or(all.first()).copied().ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// Deserializes an address written as `host:port` (configuration file keys).
pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// Deserializes an optional address written as `host:port`.
pub fn de_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?.map(|s| parse(&s)).transpose().map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_ips_or_resolvable_host_names_with_a_port() {
        assert_eq!(parse("127.0.0.1:8080"), Ok(SocketAddr::from(([127, 0, 0, 1], 8080))));
        assert_eq!(parse("localhost:8080"), Ok(SocketAddr::from(([127, 0, 0, 1], 8080))));
        assert_eq!(parse("[::1]:9"), Ok("[::1]:9".parse().expect("v6")));
        for bad in ["localhost", "127.0.0.1", "127.0.0.1:port", "", "no.such.host.invalid:80"] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
