//! The application tunnel of a sandwiched waypoint.
//!
//! A waypoint whose Gateway says `ambient.istio.io/waypoint-inbound-binding: PROXY/<port>` is
//! captured like any workload: its ztunnel terminates the HBONE tunnels addressed to it and, for
//! each one, opens a connection to `<port>` on the waypoint's pod that starts with a PROXY
//! protocol v2 header. The waypoint never sees the mTLS handshake, so the header carries what it
//! needs from it: the original client's address, the tunnel's target (the service `VIP:port`
//! the waypoint routes) and, in TLV `0xD0`, the client's SPIFFE identity, as upstream ztunnel
//! writes it for Envoy-based waypoints.

use std::io;
use std::net::{IpAddr, SocketAddr};

use hbone::Identity;
use mesh::model::Workload;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::socket::SocketFactory;

/// The v2 signature every header starts with.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (a relayed connection; LOCAL would mean a health check).
const V2_PROXY: u8 = 0x21;
/// Address family and transport: TCP over IPv4, TCP over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// The TLV upstream ztunnel puts the client's SPIFFE identity in.
pub(super) const TLV_PEER_IDENTITY: u8 = 0xD0;

/// Connects `workload`'s application tunnel at `at` and sends the header for a tunnel from
/// `src` to `dst` opened by `client`.
pub(super) async fn open(
    sockets: &dyn SocketFactory,
    workload: &Workload,
    at: SocketAddr,
    (src, dst): (SocketAddr, SocketAddr),
    client: &Identity,
) -> io::Result<TcpStream> {
    let header = proxy_header(src, dst, client)?;
    let mut stream = sockets.connect(workload, at).await?;
    stream.write_all(&header).await?;
    Ok(stream)
}

/// The header for a connection from `src` to `dst` made by `client`. Mixed families are written
/// as IPv6, with the IPv4 address mapped. An identity too long for the header's 16-bit lengths
/// is an error.
pub(super) fn proxy_header(
    src: SocketAddr,
    dst: SocketAddr,
    client: &Identity,
) -> io::Result<Vec<u8>> {
    let mut addresses = Vec::with_capacity(36);
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addresses.extend_from_slice(&s.octets());
            addresses.extend_from_slice(&d.octets());
            TCP4
        }
        (s, d) => {
            addresses.extend_from_slice(&v6(s).octets());
            addresses.extend_from_slice(&v6(d).octets());
            TCP6
        }
    };
    addresses.extend_from_slice(&src.port().to_be_bytes());
    addresses.extend_from_slice(&dst.port().to_be_bytes());
    let identity = client.to_string();
    let too_long = |_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "client identity of {} bytes does not fit a PROXY header",
                identity.len()
            ),
        )
    };
    let identity_len = u16::try_from(identity.len()).map_err(too_long)?;
    let len = u16::try_from(addresses.len() + 3 + identity.len()).map_err(too_long)?;

    let mut header = Vec::with_capacity(16 + usize::from(len));
    header.extend_from_slice(&SIGNATURE);
    header.push(V2_PROXY);
    header.push(family);
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&addresses);
    header.push(TLV_PEER_IDENTITY);
    header.extend_from_slice(&identity_len.to_be_bytes());
    header.extend_from_slice(identity.as_bytes());
    Ok(header)
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Identity {
        Identity::new("cluster.local", "app", "client").unwrap()
    }

    #[test]
    fn ipv4_header_is_byte_exact() {
        let id = "spiffe://cluster.local/ns/app/sa/client";
        let header = proxy_header(
            "10.0.0.7:40000".parse().unwrap(),
            "10.96.0.10:9080".parse().unwrap(),
            &client(),
        )
        .unwrap();
        let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
        want.extend_from_slice(&((12 + 3 + id.len()) as u16).to_be_bytes());
        want.extend_from_slice(&[10, 0, 0, 7, 10, 96, 0, 10]);
        want.extend_from_slice(&40000u16.to_be_bytes());
        want.extend_from_slice(&9080u16.to_be_bytes());
        want.push(0xD0);
        want.extend_from_slice(&(id.len() as u16).to_be_bytes());
        want.extend_from_slice(id.as_bytes());
        assert_eq!(header, want);
    }

    #[test]
    fn ipv6_and_mixed_families_are_written_as_ipv6() {
        let header = proxy_header(
            "[fd00::7]:40000".parse().unwrap(),
            "[fd00:96::10]:9080".parse().unwrap(),
            &client(),
        )
        .unwrap();
        assert_eq!(header[13], TCP6);
        let len = u16::from_be_bytes([header[14], header[15]]) as usize;
        assert_eq!(header.len(), 16 + len);
        assert_eq!(
            &header[16..32],
            &"fd00::7".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&header[48..50], &40000u16.to_be_bytes());

        let mixed = proxy_header(
            "10.0.0.7:1".parse().unwrap(),
            "[fd00:96::10]:2".parse().unwrap(),
            &client(),
        )
        .unwrap();
        assert_eq!(mixed[13], TCP6);
        assert_eq!(
            &mixed[16..32],
            &"::ffff:10.0.0.7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn an_identity_too_long_for_the_header_is_an_error() {
        let long = Identity::new("cluster.local", "app", &"a".repeat(65_500)).unwrap();
        let error = proxy_header(
            "10.0.0.7:1".parse().unwrap(),
            "10.96.0.10:2".parse().unwrap(),
            &long,
        )
        .expect_err("the header's length field is 16 bits");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("65533 bytes"), "{error}");
    }
}
