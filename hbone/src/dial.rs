//! Opening the TCP connection under an HBONE connection.
//!
//! Where a socket is made is the one thing that differs between the proxies' modes: in a pod,
//! the kernel's choice (the pod's address), or inside the pod's network namespace with
//! ztunnel's mark so the pod's capture rules let it through; on loopback (the local mesh,
//! tests), where every workload has an address of its own in 127/8 and the kernel's choice
//! would be 127.0.0.1, nobody's, from the workload's own address, so the peer's ztunnel and
//! application know the caller by its address as they would a pod's.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use tokio::net::{TcpSocket, TcpStream};

/// Opens the TCP connection under an HBONE connection.
pub trait Dial: Send + Sync + 'static {
    /// Connects to `addr`.
    fn dial(&self, addr: SocketAddr)
    -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;
}

/// Dials from wherever the process runs, with the kernel's choice of source address.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectDial;

impl Dial for DirectDial {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> {
        Box::pin(TcpStream::connect(addr))
    }
}

/// Dials from an address of this host (a workload's own), where [`source_for`] allows it.
#[derive(Debug, Clone, Copy)]
pub struct SourceDial(pub IpAddr);

impl Dial for SourceDial {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> {
        Box::pin(connect_from(Some(self.0), addr))
    }
}

/// `addr` as the mesh knows it: an IPv4 peer of a dual-stack (`[::]`) socket shows as an
/// IPv4-mapped IPv6 address (`::ffff:10.0.0.1`), which no workload has.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The address a socket to `dst` binds: `src`, when of `dst`'s family, except a loopback one
/// towards a destination that is not a loopback address, which the kernel refuses to route
/// from it (a resolver or a plain-TCP destination elsewhere): that socket takes the kernel's
/// choice.
pub fn source_for(src: Option<IpAddr>, dst: SocketAddr) -> Option<IpAddr> {
    src.filter(|s| s.is_ipv4() == dst.is_ipv4())
        .filter(|s| !s.is_loopback() || dst.ip().is_loopback())
}

/// Connects to `dst` from `src` where [`source_for`] allows it, else from the kernel's choice.
pub async fn connect_from(src: Option<IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(src) = source_for(src, dst) {
        // The port is chosen at connect time, by the whole 4-tuple: a port bound at bind time
        // must be unused by every socket on `src`, TIME_WAIT ones included, and a busy workload
        // (a waypoint opening a connection per request) exhausts the range and pays
        // milliseconds per connect searching it. Without the option, bind's choice still works.
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        socket.bind(SocketAddr::new(src, 0))?;
    }
    socket.connect(dst).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_binds_its_own_address_unless_the_kernel_would_refuse_the_route() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let cases = [
            (Some("127.0.1.1"), "127.0.0.53:53", Some("127.0.1.1")),
            (Some("127.0.1.1"), "10.96.0.10:53", None),
            (Some("10.1.0.5"), "10.96.0.10:53", Some("10.1.0.5")),
            (Some("10.1.0.5"), "127.0.0.1:53", Some("10.1.0.5")),
            (Some("10.1.0.5"), "[fd00::a]:53", None),
            (None, "10.96.0.10:53", None),
        ];
        for (src, dst, want) in cases {
            assert_eq!(
                source_for(src.map(ip), addr(dst)),
                want.map(ip),
                "{src:?} -> {dst}"
            );
        }
    }

    #[tokio::test]
    async fn a_loopback_address_dials_from_itself() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dial = SourceDial("127.61.3.1".parse().expect("ip"));
        let _stream = dial
            .dial(listener.local_addr().expect("addr"))
            .await
            .expect("dial");
        let (_, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer.ip().to_string(), "127.61.3.1");
    }
}
