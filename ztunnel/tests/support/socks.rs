//! A SOCKS5 client, as an application that uses its workload's SOCKS5 port (15080) is.

#![allow(dead_code)] // each test binary uses part of it

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where a CONNECT goes: an address, or a name and port for ztunnel to resolve.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dst<'a> {
    Addr(SocketAddr),
    Name(&'a str, u16),
}

impl From<SocketAddr> for Dst<'_> {
    fn from(addr: SocketAddr) -> Self {
        Dst::Addr(addr)
    }
}

/// A CONNECT through the SOCKS5 port of the workload at `from` to `dst`: the reply code, and
/// the stream, which carries the connection once the code is 0 (succeeded).
pub(crate) async fn connect<'a>(from: IpAddr, dst: impl Into<Dst<'a>>) -> (u8, TcpStream) {
    let mut s = TcpStream::connect((from, 15080))
        .await
        .expect("the SOCKS5 port");
    // The method offer (no authentication), then the request.
    let mut req = vec![5, 1, 0, 5, 1, 0];
    match dst.into() {
        Dst::Addr(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Dst::Addr(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Dst::Name(name, port) => {
            req.push(3);
            req.push(u8::try_from(name.len()).expect("a short name"));
            req.extend_from_slice(name.as_bytes());
            req.extend_from_slice(&port.to_be_bytes());
        }
    }
    s.write_all(&req).await.expect("write");
    // The method chosen, then the reply, whose bound address is IPv4 here.
    let mut reply = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut reply))
        .await
        .expect("a reply in time")
        .expect("reply");
    (reply[3], s)
}
