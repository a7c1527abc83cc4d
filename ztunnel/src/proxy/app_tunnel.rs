//! The application tunnel of a sandwiched waypoint.
//!
//! A waypoint whose Gateway (or GatewayClass) says `ambient.istio.io/waypoint-inbound-binding:
//! PROXY/<port>` (or a bare `PROXY`: each tunnel's own target port) is captured like any
//! workload: its ztunnel terminates the HBONE tunnels addressed to it and, for each one, opens a
//! connection to that port on the waypoint's pod that starts with a PROXY protocol v2 header.
//! The waypoint never sees the mTLS handshake, so the header carries what it needs from it, as
//! upstream ztunnel writes it for Envoy-based waypoints: the original client's address, the
//! tunnel's target (the service `VIP:port` the waypoint routes), the client's SPIFFE identity in
//! TLV `0xD0` and, when the tunnel named its service by hostname, that hostname in TLV `0xD1`.

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
/// The TLV upstream ztunnel puts the service hostname in, when the tunnel named one.
const TLV_SERVICE_HOSTNAME: u8 = 0xD1;

/// What one tunnel's header says.
#[derive(Debug)]
pub(super) struct Header<'a> {
    /// The original client.
    pub(super) src: SocketAddr,
    /// The tunnel's target: the service VIP and port the waypoint routes.
    pub(super) dst: SocketAddr,
    /// The client's identity, from its certificate.
    pub(super) client: &'a Identity,
    /// The service hostname, when the tunnel's authority named one (the header's addresses
    /// cannot carry a name, so `dst` then holds the service's VIP).
    pub(super) service_host: Option<&'a str>,
}

/// Connects `workload`'s application tunnel at `at` and sends `header`.
pub(super) async fn open(
    sockets: &dyn SocketFactory,
    workload: &Workload,
    at: SocketAddr,
    header: &Header<'_>,
) -> io::Result<TcpStream> {
    let header = header.encode()?;
    let mut stream = sockets.connect(workload, at).await?;
    stream.write_all(&header).await?;
    Ok(stream)
}

impl Header<'_> {
    /// The header's bytes. Mixed families are written as IPv6, with the IPv4 address mapped.
    /// An identity or hostname too long for the header's 16-bit lengths is an error.
    pub(super) fn encode(&self) -> io::Result<Vec<u8>> {
        let (src, dst) = (self.src, self.dst);
        let mut body = Vec::with_capacity(128);
        let family = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                body.extend_from_slice(&s.octets());
                body.extend_from_slice(&d.octets());
                TCP4
            }
            (s, d) => {
                body.extend_from_slice(&v6(s).octets());
                body.extend_from_slice(&v6(d).octets());
                TCP6
            }
        };
        body.extend_from_slice(&src.port().to_be_bytes());
        body.extend_from_slice(&dst.port().to_be_bytes());
        tlv(
            &mut body,
            TLV_PEER_IDENTITY,
            "client identity",
            &self.client.to_string(),
        )?;
        if let Some(host) = self.service_host {
            tlv(&mut body, TLV_SERVICE_HOSTNAME, "service hostname", host)?;
        }
        let len = u16::try_from(body.len()).map_err(|_| too_long("header", body.len()))?;

        let mut header = Vec::with_capacity(16 + body.len());
        header.extend_from_slice(&SIGNATURE);
        header.push(V2_PROXY);
        header.push(family);
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(&body);
        Ok(header)
    }
}

/// Appends a TLV of `kind` holding `value` (the `what` of errors).
fn tlv(body: &mut Vec<u8>, kind: u8, what: &str, value: &str) -> io::Result<()> {
    let len = u16::try_from(value.len()).map_err(|_| too_long(what, value.len()))?;
    body.push(kind);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(value.as_bytes());
    Ok(())
}

fn too_long(what: &str, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} of {len} bytes does not fit a PROXY header"),
    )
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

    const ID: &str = "spiffe://cluster.local/ns/app/sa/client";

    fn encode(src: &str, dst: &str, host: Option<&str>) -> io::Result<Vec<u8>> {
        let client = Identity::new("cluster.local", "app", "client").unwrap();
        Header {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            client: &client,
            service_host: host,
        }
        .encode()
    }

    #[test]
    fn ipv4_header_is_byte_exact() {
        let header = encode("10.0.0.7:40000", "10.96.0.10:9080", None).unwrap();
        let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
        want.extend_from_slice(&((12 + 3 + ID.len()) as u16).to_be_bytes());
        want.extend_from_slice(&[10, 0, 0, 7, 10, 96, 0, 10]);
        want.extend_from_slice(&40000u16.to_be_bytes());
        want.extend_from_slice(&9080u16.to_be_bytes());
        want.push(0xD0);
        want.extend_from_slice(&(ID.len() as u16).to_be_bytes());
        want.extend_from_slice(ID.as_bytes());
        assert_eq!(header, want);
    }

    #[test]
    fn a_service_named_by_hostname_follows_the_identity_in_its_own_tlv() {
        let host = "reviews.app.svc.cluster.local";
        let header = encode("10.0.0.7:40000", "10.96.0.10:9080", Some(host)).unwrap();
        let len = u16::from_be_bytes([header[14], header[15]]) as usize;
        assert_eq!(len, 12 + 3 + ID.len() + 3 + host.len());
        assert_eq!(header.len(), 16 + len);
        let tail = &header[16 + 12 + 3 + ID.len()..];
        assert_eq!(tail[0], 0xD1);
        assert_eq!(u16::from_be_bytes([tail[1], tail[2]]) as usize, host.len());
        assert_eq!(&tail[3..], host.as_bytes());
    }

    #[test]
    fn ipv6_and_mixed_families_are_written_as_ipv6() {
        let header = encode("[fd00::7]:40000", "[fd00:96::10]:9080", None).unwrap();
        assert_eq!(header[13], TCP6);
        let len = u16::from_be_bytes([header[14], header[15]]) as usize;
        assert_eq!(header.len(), 16 + len);
        assert_eq!(
            &header[16..32],
            &"fd00::7".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&header[48..50], &40000u16.to_be_bytes());

        let mixed = encode("10.0.0.7:1", "[fd00:96::10]:2", None).unwrap();
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
    fn what_does_not_fit_the_headers_16_bit_lengths_is_an_error() {
        let refused = |header: Header<'_>| match header.encode() {
            Ok(bytes) => panic!("encoded {} bytes", bytes.len()),
            Err(e) => e,
        };
        let (src, dst) = (
            "10.0.0.7:1".parse().unwrap(),
            "10.96.0.10:2".parse().unwrap(),
        );

        let client = Identity::new("cluster.local", "app", &"a".repeat(65_510)).unwrap();
        let error = refused(Header {
            src,
            dst,
            client: &client,
            service_host: None,
        });
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(
            error.to_string().contains("client identity of 65543 bytes"),
            "{error}"
        );

        // Each TLV fits; together with the addresses they do not.
        let client = Identity::new("cluster.local", "app", &"a".repeat(65_480)).unwrap();
        let fits = Header {
            src,
            dst,
            client: &client,
            service_host: None,
        };
        assert_eq!(fits.encode().unwrap().len(), 16 + 12 + 3 + 65_513);
        let error = refused(Header {
            service_host: Some("reviews.app.svc.cluster.local"),
            ..fits
        });
        assert!(
            error.to_string().contains("header of 65560 bytes"),
            "{error}"
        );
    }
}
