//! How sockets are made: the only thing that differs between ztunnel's modes.
//!
//! On loopback (the embedded default, no root) every workload has its own `127.x.y.z` address:
//! listeners bind there and outbound connections leave from there, so the next ztunnel sees the
//! caller's workload address exactly as it would see a pod IP. In a real node the sockets are
//! made inside the pod's network namespace with ztunnel's mark (see `inpod`).

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use hbone::Identity;
use mesh::model::Workload;

use crate::inpod::NetNs;
use crate::inpod::zds::proto::WorkloadInfo;
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

/// A connection being opened.
pub type Connecting = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// TCP keepalive as upstream sets it (`KEEPALIVE_TIME`, `KEEPALIVE_INTERVAL`,
/// `KEEPALIVE_RETRIES`): a connection ztunnel holds for an application, whose own keepalive
/// probes end at ztunnel, is still found dead when its far end vanishes, and its idle flow
/// keeps the NAT and load-balancer state on the way alive.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(std::time::Duration::from_secs(180))
    .with_interval(std::time::Duration::from_secs(180))
    .with_retries(9);

/// The options of every TCP connection ztunnel accepts or opens: no Nagle delay (each write is
/// a whole message the peer waits for), and [`KEEPALIVE`].
pub fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    socket2::SockRef::from(stream).set_tcp_keepalive(&KEEPALIVE)
}

/// Whom a proxy's sockets are made for: a workload as the configuration names it or, captured, a
/// pod the node agent announced before the configuration names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Its uid, by which in-pod sockets find the pod's network namespace.
    pub uid: Arc<str>,
    /// The identity its certificate names.
    pub identity: Identity,
    /// Its addresses, where loopback sockets are bound; none for a pod the configuration does
    /// not name yet, whose listeners take every address of its namespace.
    pub ips: Box<[IpAddr]>,
}

impl From<&Workload> for Owner {
    fn from(workload: &Workload) -> Self {
        Owner {
            uid: workload.uid.clone(),
            identity: workload.identity.clone(),
            ips: workload.ips.clone(),
        }
    }
}

/// Makes the sockets of one mode.
pub trait SocketFactory: Send + Sync + std::fmt::Debug + 'static {
    /// A listener for `owner` on `port` (on its own address, or on every address of its
    /// network namespace).
    fn listen(&self, owner: &Owner, port: u16) -> io::Result<TcpListener>;
    /// The DNS proxy's sockets for `owner` on `port`, UDP and TCP, on each address its
    /// queries come to: its own address, or in its network namespace the loopback of each
    /// family, where captured DNS is redirected.
    fn dns(&self, owner: &Owner, port: u16) -> io::Result<Vec<(UdpSocket, TcpListener)>>;
    /// An unconnected UDP socket on an ephemeral port for `workload`'s datagrams to `dst` (its
    /// DNS queries the proxy forwards), made where its own would leave from.
    fn udp_to(&self, workload: &Workload, dst: SocketAddr) -> io::Result<UdpSocket>;
    /// A connection from `workload` to `dst`: a plain-TCP destination, a resolver, or a
    /// sandwiched waypoint's tunnel port (whose PROXY header names the caller).
    fn connect(&self, workload: &Workload, dst: SocketAddr) -> Connecting;
    /// A connection to `workload`'s application at `dst` on behalf of a caller at `client`,
    /// made so that the application sees the caller's address as its peer where the mode can
    /// (upstream's original source: the application's logs, allowlists and rate limits see who
    /// called, not ztunnel). By default it is [`SocketFactory::connect`]: the application sees
    /// its own workload's address.
    fn connect_app(&self, workload: &Workload, _client: IpAddr, dst: SocketAddr) -> Connecting {
        self.connect(workload, dst)
    }
    /// The dialer of `owner`'s HBONE pool.
    fn dialer(&self, owner: &Owner) -> Arc<dyn hbone::Dial>;
    /// Where a sandwiched waypoint, reached on `local` (the address its tunnel came to), takes
    /// its tunnels on `port` (see `proxy::app_tunnel`).
    fn app_tunnel_addr(&self, local: IpAddr, port: u16) -> SocketAddr;
    /// Whether traffic is captured, so the transparent listeners (15001, 15006) receive any.
    fn captures(&self) -> bool;
    /// Whether sockets can be made for the workload `uid` yet (in-pod: its namespace has
    /// arrived).
    fn serves(&self, uid: &str) -> bool;
    /// The workloads whose sockets it was given, served or not, as the node agent named them
    /// (in-pod: the pods it announced); those not served are the proxies pending. None by
    /// default: the other modes serve every workload of the node the configuration names.
    fn announced(&self) -> Vec<(Arc<str>, WorkloadInfo)> {
        Vec::new()
    }
}

/// Sockets on the workloads' own loopback addresses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loopback;

impl SocketFactory for Loopback {
    fn listen(&self, owner: &Owner, port: u16) -> io::Result<TcpListener> {
        let ip = owner.ips.first().copied().ok_or_else(|| {
            io::Error::new(io::ErrorKind::AddrNotAvailable, "workload has no address")
        })?;
        let addr = SocketAddr::new(ip, port);
        let socket = socket_for(addr)?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    }

    fn dns(&self, owner: &Owner, port: u16) -> io::Result<Vec<(UdpSocket, TcpListener)>> {
        let ip = owner.ips.first().copied().ok_or_else(|| {
            io::Error::new(io::ErrorKind::AddrNotAvailable, "workload has no address")
        })?;
        let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, port))?;
        socket.set_nonblocking(true)?;
        Ok(vec![(
            UdpSocket::from_std(socket)?,
            self.listen(owner, port)?,
        )])
    }

    /// From the workload's address (see [`hbone::source_for`]).
    fn udp_to(&self, workload: &Workload, dst: SocketAddr) -> io::Result<UdpSocket> {
        let src = hbone::source_for(workload.ip_like(dst.ip()), dst).unwrap_or(match dst {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        });
        let socket = std::net::UdpSocket::bind(SocketAddr::new(src, 0))?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket)
    }

    fn connect(&self, workload: &Workload, dst: SocketAddr) -> Connecting {
        let src = workload.ip_like(dst.ip());
        Box::pin(connect_from(src, dst))
    }

    /// From the caller's own address when it is a loopback one (every one of 127/8 is this
    /// host's, so binding it needs no privilege), as in a pod; otherwise from the workload's.
    fn connect_app(&self, workload: &Workload, client: IpAddr, dst: SocketAddr) -> Connecting {
        if client.is_loopback() && dst.ip().is_loopback() && client.is_ipv4() == dst.is_ipv4() {
            return Box::pin(connect_from(Some(client), dst));
        }
        self.connect(workload, dst)
    }

    fn dialer(&self, owner: &Owner) -> Arc<dyn hbone::Dial> {
        Arc::new(FromAddress(owner.ips.first().copied()))
    }

    /// The workload's own address: on this host nothing but the address tells workloads apart.
    fn app_tunnel_addr(&self, local: IpAddr, port: u16) -> SocketAddr {
        SocketAddr::new(local, port)
    }

    fn captures(&self) -> bool {
        false
    }

    fn serves(&self, _: &str) -> bool {
        true
    }
}

/// Sockets inside each pod's network namespace, marked so the pod's capture rules let them
/// through; the namespaces arrive over ZDS from the node agent.
#[derive(Debug, Default)]
pub struct InPod {
    pods: std::sync::RwLock<std::collections::HashMap<Arc<str>, Pod>>,
}

/// A pod's namespace and how the node agent named it.
#[derive(Debug)]
struct Pod {
    netns: Arc<NetNs>,
    info: WorkloadInfo,
}

impl InPod {
    /// Records the network namespace of the workload `uid`, a pod the node agent announced
    /// as `info`.
    pub fn insert(&self, uid: Arc<str>, netns: impl Into<Arc<NetNs>>, info: WorkloadInfo) {
        let pod = Pod {
            netns: netns.into(),
            info,
        };
        self.pods
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(uid, pod);
    }

    /// Forgets the workload `uid`; returns whether it was known.
    pub fn remove(&self, uid: &str) -> bool {
        self.pods
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(uid)
            .is_some()
    }

    /// The inode of the network namespace recorded for `uid`, if any.
    pub fn inode(&self, uid: &str) -> Option<u64> {
        self.pods
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(uid)
            .map(|pod| pod.netns.inode())
    }

    fn netns(&self, uid: &str) -> io::Result<Arc<NetNs>> {
        self.pods
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(uid)
            .map(|pod| pod.netns.clone())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no network namespace for workload {uid} (not announced over ZDS)"),
                )
            })
    }
}

impl SocketFactory for InPod {
    fn listen(&self, owner: &Owner, port: u16) -> io::Result<TcpListener> {
        let netns = self.netns(&owner.uid)?;
        // TPROXY delivers to any address: the listeners it feeds need IP_TRANSPARENT; REDIRECT
        // (15001) and explicit SOCKS5 do not.
        let transparent = matches!(
            port,
            crate::proxy::ports::INBOUND | crate::proxy::ports::INBOUND_PLAINTEXT
        );
        // SOCKS5 opens connections as the pod: only the pod itself may reach it, as upstream
        // binds it; the DNS proxy's are the pod's loopbacks too (see `dns`). The others take
        // whatever capture sends them, of either family: on `[::]`, which takes IPv4 too, as
        // upstream binds them, or on IPv4's wildcard where the kernel has no IPv6 at all.
        let listener = match port {
            crate::proxy::ports::SOCKS5 | crate::proxy::ports::DNS => {
                let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
                crate::inpod::bind_listener(&netns, addr, transparent)?
            }
            _ => {
                let dual = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
                match crate::inpod::bind_listener(&netns, dual, transparent) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {
                        tracing::debug!(workload = %owner.uid, port, "no IPv6: listening on IPv4 only");
                        let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
                        crate::inpod::bind_listener(&netns, v4, transparent)?
                    }
                    bound => bound?,
                }
            }
        };
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    }

    /// On the pod's loopbacks only: UDP is not captured inbound, so a wildcard address would
    /// answer other pods too. IPv6's as well as IPv4's, where the capture rules send the pod's
    /// IPv6 queries; not in a pod without IPv6.
    fn dns(&self, owner: &Owner, port: u16) -> io::Result<Vec<(UdpSocket, TcpListener)>> {
        let netns = self.netns(&owner.uid)?;
        let pair = |ip: IpAddr| -> io::Result<(UdpSocket, TcpListener)> {
            let addr = SocketAddr::new(ip, port);
            let udp = UdpSocket::from_std(crate::inpod::bind_udp(&netns, addr)?)?;
            let tcp = crate::inpod::bind_listener(&netns, addr, false)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, TcpListener::from_std(tcp)?))
        };
        let mut sockets = vec![pair(Ipv4Addr::LOCALHOST.into())?];
        match pair(Ipv6Addr::LOCALHOST.into()) {
            Ok(v6) => sockets.push(v6),
            // No IPv6 in the pod (none in the kernel, or turned off: no `::1`), so none of its
            // DNS is redirected there either.
            Err(e)
                if e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT)
                    || e.kind() == io::ErrorKind::AddrNotAvailable =>
            {
                tracing::debug!(workload = %owner.uid, error = %e, "no IPv6 DNS proxy: the pod has no IPv6")
            }
            Err(e) => {
                tracing::warn!(workload = %owner.uid, error = %e, "no IPv6 DNS proxy: the pod's IPv6 DNS queries go unanswered")
            }
        }
        Ok(sockets)
    }

    /// In the pod's namespace, marked so that its capture rules let it out.
    fn udp_to(&self, workload: &Workload, dst: SocketAddr) -> io::Result<UdpSocket> {
        let netns = self.netns(&workload.uid)?;
        UdpSocket::from_std(crate::inpod::udp_to(&netns, dst)?)
    }

    fn connect(&self, workload: &Workload, dst: SocketAddr) -> Connecting {
        let netns = self.netns(&workload.uid);
        Box::pin(async move {
            let netns = netns?;
            connect_in(&netns, None, dst).await
        })
    }

    /// From the caller's address, which is not one of the pod's: `IP_TRANSPARENT` lets the
    /// socket bind it, and the pod's capture rules route the application's replies back to it
    /// (ztunnel's mark sets connmark 0x111 on the connection; its replies take that mark back,
    /// and marked packets are delivered locally by routing table 100).
    ///
    /// The kernel picks the source port. For a plaintext caller it may, about once in the
    /// ephemeral range's size (1 in 28,000 by default), pick the caller's own port, and then
    /// the connection is the captured one's twin and fails; upstream's has the same odds.
    /// Excluding that port needs `IP_LOCAL_PORT_RANGE`, which neither `nix` nor `socket2` sets.
    fn connect_app(&self, workload: &Workload, client: IpAddr, dst: SocketAddr) -> Connecting {
        let netns = self.netns(&workload.uid);
        let src = (client.is_ipv4() == dst.is_ipv4()).then_some(SocketAddr::new(client, 0));
        Box::pin(async move {
            let netns = netns?;
            connect_in(&netns, src, dst).await
        })
    }

    fn dialer(&self, owner: &Owner) -> Arc<dyn hbone::Dial> {
        Arc::new(InPodDial(self.netns(&owner.uid).ok()))
    }

    /// The pod's loopback, as upstream does: only something inside the pod's namespace (its
    /// ztunnel's sockets) reaches a waypoint listening there, so no caller can hand it a PROXY
    /// header with an identity of its choosing.
    fn app_tunnel_addr(&self, local: IpAddr, port: u16) -> SocketAddr {
        let loopback: IpAddr = match local {
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        SocketAddr::new(loopback, port)
    }

    fn captures(&self) -> bool {
        true
    }

    fn serves(&self, uid: &str) -> bool {
        self.netns(uid).is_ok()
    }

    fn announced(&self) -> Vec<(Arc<str>, WorkloadInfo)> {
        (self.pods.read())
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(uid, pod)| (uid.clone(), pod.info.clone()))
            .collect()
    }
}

async fn connect_in(
    netns: &NetNs,
    src: Option<SocketAddr>,
    dst: SocketAddr,
) -> io::Result<TcpStream> {
    let socket = crate::inpod::connect_socket(netns, dst, src)?;
    let stream = TcpSocket::from_std_stream(socket.into())
        .connect(dst)
        .await?;
    configure(&stream)?;
    Ok(stream)
}

/// Dials HBONE next hops from inside a pod's namespace.
#[derive(Debug)]
struct InPodDial(Option<Arc<NetNs>>);

impl hbone::Dial for InPodDial {
    fn dial(&self, addr: SocketAddr) -> Connecting {
        let netns = self.0.clone();
        Box::pin(async move {
            let netns = netns.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "workload has no network namespace")
            })?;
            connect_in(&netns, None, addr).await
        })
    }
}

fn socket_for(addr: SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Connects to `dst` from `src` where [`hbone::source_for`] allows it, configured as every
/// connection ztunnel opens.
async fn connect_from(src: Option<IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let stream = hbone::connect_from(src, dst).await?;
    configure(&stream)?;
    Ok(stream)
}

/// Dials HBONE next hops from a workload's address.
#[derive(Debug)]
struct FromAddress(Option<IpAddr>);

impl hbone::Dial for FromAddress {
    fn dial(&self, addr: SocketAddr) -> Connecting {
        Box::pin(connect_from(self.0, addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends ztunnel holds keep alive as upstream's do: the connection it opens, and one it
    /// accepts once configured.
    #[tokio::test]
    async fn connections_keep_alive_as_upstream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let opened = connect_from(None, listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        configure(&accepted).expect("configure");
        for stream in [&opened, &accepted] {
            let s = socket2::SockRef::from(stream);
            assert!(s.tcp_nodelay().expect("nodelay"));
            assert!(s.keepalive().expect("keepalive"));
            let secs = std::time::Duration::from_secs(180);
            assert_eq!(s.tcp_keepalive_time().expect("time"), secs);
            assert_eq!(s.tcp_keepalive_interval().expect("interval"), secs);
            assert_eq!(s.tcp_keepalive_retries().expect("retries"), 9);
        }
    }
}
