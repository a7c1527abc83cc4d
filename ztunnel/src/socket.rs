//! How sockets are made: the only thing that differs between ztunnel's modes.
//!
//! On loopback (the embedded default, no root) every workload has its own `127.x.y.z` address:
//! listeners bind there and outbound connections leave from there, so the next ztunnel sees the
//! caller's workload address exactly as it would see a pod IP. In a real node the sockets are
//! made inside the pod's network namespace with ztunnel's mark (see `inpod`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use mesh::model::Workload;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A connection being opened.
pub type Connecting = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Makes the sockets of one mode.
pub trait SocketFactory: Send + Sync + std::fmt::Debug + 'static {
    /// A listener for `workload` on `addr`.
    fn listen(&self, workload: &Workload, addr: SocketAddr) -> io::Result<TcpListener>;
    /// A connection from `workload` to `dst` (the application, or a plain-TCP destination).
    fn connect(&self, workload: &Workload, dst: SocketAddr) -> Connecting;
    /// The dialer of `workload`'s HBONE pool.
    fn dialer(&self, workload: &Workload) -> Arc<dyn hbone::Dial>;
    /// Whether traffic is captured, so the transparent listeners (15001, 15006) receive any.
    fn captures(&self) -> bool;
}

/// Sockets on the workloads' own loopback addresses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loopback;

impl SocketFactory for Loopback {
    fn listen(&self, _: &Workload, addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = socket_for(addr)?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    }

    fn connect(&self, workload: &Workload, dst: SocketAddr) -> Connecting {
        let src = workload.ip_like(dst.ip());
        Box::pin(connect_from(src, dst))
    }

    fn dialer(&self, workload: &Workload) -> Arc<dyn hbone::Dial> {
        Arc::new(FromAddress(workload.ips.first().copied()))
    }

    fn captures(&self) -> bool {
        false
    }
}

fn socket_for(addr: SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Connects from `src` (port chosen by the kernel) when given and of the same family.
async fn connect_from(src: Option<std::net::IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket_for(dst)?;
    if let Some(src) = src.filter(|s| s.is_ipv4() == dst.is_ipv4()) {
        socket.bind(SocketAddr::new(src, 0))?;
    }
    let stream = socket.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Dials HBONE next hops from a workload's address.
#[derive(Debug)]
struct FromAddress(Option<std::net::IpAddr>);

impl hbone::Dial for FromAddress {
    fn dial(&self, addr: SocketAddr) -> Connecting {
        Box::pin(connect_from(self.0, addr))
    }
}
