//! TLS the waypoint originates to endpoints out of the mesh (a DestinationRule's `tls`), in
//! Pingora's form: the CAs and client certificate a rule names are parsed once per snapshot,
//! not per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use mesh::route::UpstreamTls;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{CertKey, WrappedX509, parse_x509};

/// Pingora's form of each rule's settings seen in one snapshot, by digest.
#[derive(Debug, Default)]
pub(crate) struct TlsPeers(Mutex<HashMap<u64, Arc<Parsed>>>);

/// One rule's certificates, parsed.
#[derive(Debug)]
struct Parsed {
    ca: Option<Arc<[WrappedX509]>>,
    client: Option<Arc<CertKey>>,
}

impl TlsPeers {
    fn parsed(&self, tls: &UpstreamTls) -> Arc<Parsed> {
        let mut parsed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = parsed.entry(tls.digest).or_insert_with(|| {
            // The mesh checked these with the parser Pingora uses, so its parsing holds.
            let ca = (tls.ca.as_ref()).map(|ca| {
                let ca: Vec<WrappedX509> = (ca.iter())
                    .map(|der| WrappedX509::new(der.clone(), parse_x509))
                    .collect();
                Arc::from(ca)
            });
            let client = (tls.client.as_ref())
                .map(|c| Arc::new(CertKey::new(c.chain.clone(), c.key.clone())));
            Arc::new(Parsed { ca, client })
        });
        entry.clone()
    }
}

/// A peer at `addr` that originates `tls`, with the rule's SNI or else `host` (the authority
/// the request goes upstream with), which the server's certificate must name.
pub(crate) fn peer(addr: SocketAddr, tls: &UpstreamTls, host: &str, peers: &TlsPeers) -> HttpPeer {
    let sni = match &tls.sni {
        Some(sni) => sni.to_string(),
        None => host_name(host).to_owned(),
    };
    let mut peer = HttpPeer::new(addr, true, sni);
    // Pingora pools by a hash that leaves the CA out.
    peer.group_key = tls.digest;
    peer.options.verify_cert = tls.verify;
    peer.options.verify_hostname = tls.verify;
    let parsed = peers.parsed(tls);
    peer.options.ca = parsed.ca.clone();
    peer.client_cert_key = parsed.client.clone();
    peer
}

/// The host of an authority (`host[:port]`, `[v6]:port`, `[v6]`), without the port.
fn host_name(authority: &str) -> &str {
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split_once(']').map_or(v6, |(host, _)| host);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_drop_the_port_and_brackets() {
        for (authority, host) in [
            ("api.example.com", "api.example.com"),
            ("api.example.com:8443", "api.example.com"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("", ""),
        ] {
            assert_eq!(host_name(authority), host, "{authority}");
        }
    }
}
