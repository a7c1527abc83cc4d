//! The `:authority` of an HBONE CONNECT: where the tunnelled bytes should go.
//!
//! Normally `ip:port` of the final target (`[v6]:port` for IPv6). When a client sends to a waypoint it
//! is the original service `VIP:port`, and a `hostname:port` form (service FQDN and service port) is
//! also accepted, as upstream ztunnel does for double HBONE.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// A parsed CONNECT target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Authority {
    /// An address: a pod IP and target port, or a service VIP and service port.
    Addr(SocketAddr),
    /// A DNS name (a service hostname) and a port.
    Host {
        /// The lowercase hostname.
        host: Box<str>,
        /// The port, never 0.
        port: u16,
    },
}

/// Why an authority was refused (the server answers 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed CONNECT authority {input:?}: {reason}")]
pub struct AuthorityError {
    input: String,
    reason: &'static str,
}

impl Authority {
    /// The port of the target.
    pub fn port(&self) -> u16 {
        match self {
            Authority::Addr(a) => a.port(),
            Authority::Host { port, .. } => *port,
        }
    }

    /// The address, if the authority is one.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Authority::Addr(a) => Some(*a),
            Authority::Host { .. } => None,
        }
    }
}

impl From<SocketAddr> for Authority {
    fn from(addr: SocketAddr) -> Self {
        Authority::Addr(addr)
    }
}

impl FromStr for Authority {
    type Err = AuthorityError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| AuthorityError {
            input: input.chars().take(300).collect(),
            reason,
        };
        if let Some(rest) = input.strip_prefix('[') {
            let (ip, port) = rest
                .split_once("]:")
                .ok_or_else(|| err("an IPv6 authority must be [address]:port"))?;
            let ip: Ipv6Addr = ip.parse().map_err(|_| err("invalid IPv6 address"))?;
            let port = parse_port(port).map_err(err)?;
            return Ok(Authority::Addr(SocketAddr::new(IpAddr::V6(ip), port)));
        }
        let (host, port) = input.rsplit_once(':').ok_or_else(|| err("missing :port"))?;
        let port = parse_port(port).map_err(err)?;
        if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
            return Ok(Authority::Addr(SocketAddr::new(IpAddr::V4(ip), port)));
        }
        if host.contains(':') {
            return Err(err("an IPv6 address must be in brackets"));
        }
        check_hostname(host).map_err(err)?;
        Ok(Authority::Host {
            host: host.to_ascii_lowercase().into(),
            port,
        })
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // SocketAddr already brackets IPv6.
            Authority::Addr(a) => write!(f, "{a}"),
            Authority::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

fn parse_port(s: &str) -> Result<u16, &'static str> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("port must be a decimal number");
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err("port must be between 1 and 65535"),
        Ok(p) => Ok(p),
    }
}

/// RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
fn check_hostname(host: &str) -> Result<(), &'static str> {
    if host.is_empty() || host.len() > 253 {
        return Err("hostname must be 1 to 253 characters");
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err("hostname labels are 1-63 letters, digits or inner hyphens");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let ok = [
            ("10.0.0.1:8080", "10.0.0.1:8080"),
            ("[fd00::1]:15008", "[fd00::1]:15008"),
            ("[::1]:1", "[::1]:1"),
            (
                "reviews.default.svc.cluster.local:9080",
                "reviews.default.svc.cluster.local:9080",
            ),
            ("Reviews.Default:80", "reviews.default:80"),
            ("localhost:65535", "localhost:65535"),
        ];
        for (input, printed) in ok {
            let a: Authority = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(a.to_string(), printed);
            assert_eq!(a.to_string().parse::<Authority>().unwrap(), a);
        }
        assert_eq!(
            "10.0.0.1:80".parse::<Authority>().unwrap().addr(),
            Some("10.0.0.1:80".parse().unwrap())
        );
    }

    #[test]
    fn rejects() {
        let bad = [
            "",
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1:+80",
            "10.0.0.1:80 ",
            "fd00::1:80",
            "[fd00::1]",
            "[fd00::1]80",
            "[10.0.0.1]:80",
            "[nope]:80",
            ":80",
            "a..b:80",
            "-a.b:80",
            "a-.b:80",
            "under_score:80",
            "/path:80",
            "host name:80",
            "h\u{e9}:80",
        ];
        for input in bad {
            assert!(input.parse::<Authority>().is_err(), "{input:?} parsed");
        }
        let long = format!("{}:80", "a".repeat(64));
        assert!(long.parse::<Authority>().is_err());
    }
}
