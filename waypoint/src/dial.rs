//! Where the waypoint's tunnels to endpoints leave from.
//!
//! In a pod, the kernel's choice: the pod's address, which the endpoint's ztunnel knows as the
//! waypoint's. On loopback (the local mesh, tests) every workload has an address of its own in
//! 127/8 and the kernel's choice would be 127.0.0.1, which is nobody's: the endpoint's ztunnel
//! could not tell the waypoint by its address, nor the application its caller. There the
//! waypoint dials from its own address, as a pod's connections come from the pod's.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use hbone::Dial;
use tokio::net::{TcpSocket, TcpStream};

/// The dialer for a waypoint at `address`: from that address when it is a loopback one,
/// else none (the pool's default, the kernel's choice).
pub(crate) fn from(address: IpAddr) -> Option<Arc<dyn Dial>> {
    address
        .is_loopback()
        .then(|| Arc::new(FromLoopback(address)) as Arc<dyn Dial>)
}

#[derive(Debug)]
struct FromLoopback(IpAddr);

impl Dial for FromLoopback {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> {
        let src = self.0;
        Box::pin(async move {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            // Only towards this host: a loopback source cannot reach anywhere else.
            if src.is_ipv4() == addr.is_ipv4() && addr.ip().is_loopback() {
                // The port is chosen at connect time, by the whole 4-tuple: a waypoint opens
                // connections all the time, and ports bound at bind time would have to be
                // free of every socket on its address, TIME_WAIT ones included.
                nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::IpBindAddressNoPort,
                    &true,
                )?;
                socket.bind(SocketAddr::new(src, 0))?;
            }
            socket.connect(addr).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loopback_waypoint_dials_from_its_own_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dial = from("127.61.3.1".parse().expect("ip")).expect("a loopback address");
        let _stream = dial
            .dial(listener.local_addr().expect("addr"))
            .await
            .expect("dial");
        let (_, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer.ip().to_string(), "127.61.3.1");
        assert!(
            from("10.0.3.1".parse().expect("ip")).is_none(),
            "a pod's address is the kernel's choice already"
        );
    }
}
