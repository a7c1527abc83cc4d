//! SOCKS5 (RFC 1928), the explicit way into the mesh when traffic is not captured: the
//! embedded default on loopback, or any client that can be pointed at a proxy
//! (`curl --socks5-hostname`). Only CONNECT with no authentication is offered, as upstream
//! ztunnel does; a domain name is resolved from the mesh model, never from DNS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An IP address and port.
    Addr(SocketAddr),
    /// A hostname and port.
    Host(String, u16),
}

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    /// The socket failed.
    #[error("SOCKS5 handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The client does not speak SOCKS5 as we do.
    #[error("SOCKS5 handshake: {0}")]
    Protocol(&'static str),
}

/// Reply codes (RFC 1928 section 6) we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Succeeded.
    Succeeded = 0,
    /// General failure.
    GeneralFailure = 1,
    /// Connection not allowed by ruleset (policy denied).
    NotAllowed = 2,
    /// Host unreachable (no endpoint).
    HostUnreachable = 4,
    /// Connection refused.
    ConnectionRefused = 5,
    /// Command not supported.
    CommandNotSupported = 7,
    /// Address type not supported.
    AddressTypeNotSupported = 8,
}

/// Reads the greeting and the CONNECT request; answers the greeting. The caller connects and
/// then calls [`reply`].
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<Target, Socks5Error> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(Socks5Error::Protocol("not SOCKS version 5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xff]).await?;
        return Err(Socks5Error::Protocol(
            "client does not offer \"no authentication\"",
        ));
    }
    s.write_all(&[5, 0]).await?;

    let mut request = [0u8; 4];
    s.read_exact(&mut request).await?;
    if request[0] != 5 {
        return Err(Socks5Error::Protocol("request is not SOCKS version 5"));
    }
    if request[1] != 1 {
        reply(s, Reply::CommandNotSupported, None).await?;
        return Err(Socks5Error::Protocol("only CONNECT is supported"));
    }
    let target = match request[3] {
        1 => {
            let mut b = [0u8; 6];
            s.read_exact(&mut b).await?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Target::Addr(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([b[4], b[5]]),
            ))
        }
        4 => {
            let mut b = [0u8; 18];
            s.read_exact(&mut b).await?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[16], b[17]]);
            Target::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0]) + 2];
            s.read_exact(&mut name).await?;
            let port = u16::from_be_bytes([name[name.len() - 2], name[name.len() - 1]]);
            name.truncate(name.len() - 2);
            let host = String::from_utf8(name)
                .map_err(|_| Socks5Error::Protocol("hostname is not UTF-8"))?;
            // Clients may send an IP literal as a "domain".
            match host.parse::<IpAddr>() {
                Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
                Err(_) => Target::Host(host, port),
            }
        }
        _ => {
            reply(s, Reply::AddressTypeNotSupported, None).await?;
            return Err(Socks5Error::Protocol("unknown address type"));
        }
    };
    Ok(target)
}

/// Sends the reply to the CONNECT request.
pub async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    code: Reply,
    bound: Option<SocketAddr>,
) -> std::io::Result<()> {
    let bound = bound.unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    let mut out = vec![5, code as u8, 0];
    match bound.ip() {
        IpAddr::V4(ip) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    s.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn handshake(bytes: &[u8]) -> (Result<Target, Socks5Error>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(bytes).await.expect("write");
        // Nothing more will come: a truncated request must end in an error, not a wait.
        client.shutdown().await.expect("shutdown");
        let result = accept(&mut server).await;
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read");
        (result, answer)
    }

    #[tokio::test]
    async fn parses_each_address_type() {
        let (t, answer) = handshake(&[5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0x1f, 0x90]).await;
        assert_eq!(
            t.expect("ok"),
            Target::Addr("10.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(answer, [5, 0]);

        let mut v6 = vec![5, 1, 0, 5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().expect("v6").octets());
        v6.extend_from_slice(&[0, 80]);
        let (t, _) = handshake(&v6).await;
        assert_eq!(
            t.expect("ok"),
            Target::Addr("[fd00::1]:80".parse().expect("addr"))
        );

        let host = b"reviews.default.svc.cluster.local";
        let mut domain = vec![5, 2, 2, 0, 5, 1, 0, 3, host.len() as u8];
        domain.extend_from_slice(host);
        domain.extend_from_slice(&9080u16.to_be_bytes());
        let (t, _) = handshake(&domain).await;
        assert_eq!(
            t.expect("ok"),
            Target::Host("reviews.default.svc.cluster.local".into(), 9080)
        );

        let mut literal = vec![5, 1, 0, 5, 1, 0, 3, 8];
        literal.extend_from_slice(b"10.1.2.3");
        literal.extend_from_slice(&[0, 80]);
        let (t, _) = handshake(&literal).await;
        assert_eq!(
            t.expect("ok"),
            Target::Addr("10.1.2.3:80".parse().expect("addr"))
        );
    }

    #[tokio::test]
    async fn refuses_what_we_do_not_support() {
        let (t, answer) = handshake(&[4, 1, 0]).await;
        assert!(t.is_err());
        assert!(answer.is_empty());
        let (t, answer) = handshake(&[5, 1, 2]).await;
        assert!(t.is_err());
        assert_eq!(
            answer,
            [5, 0xff],
            "username/password only: no acceptable method"
        );
        let (t, answer) = handshake(&[5, 1, 0, 5, 2, 0, 1, 10, 0, 0, 1, 0, 80]).await;
        assert!(t.is_err(), "BIND is not supported");
        assert_eq!(answer[2..4], [5, 7]);
        let (t, answer) = handshake(&[5, 1, 0, 5, 1, 0, 9]).await;
        assert!(t.is_err());
        assert_eq!(answer[3], 8);
        let (t, _) = handshake(&[5, 1, 0, 5, 1, 0, 1, 10]).await;
        assert!(matches!(t, Err(Socks5Error::Io(_))), "truncated request");
    }
}
