//! Sockets created inside a pod's network namespace, the way the pod's capture rules expect them.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::NetNs;

/// The packet mark (1337) on every socket ztunnel opens in a pod.
///
/// istio-cni's rules skip packets carrying it (`! --mark 0x539/0xfff`), which is what stops
/// ztunnel's own upstream connections from being captured again by the pod's REDIRECT and TPROXY
/// rules. Shared with istio-cni; changing it breaks capture.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// Listen backlog for capture listeners: one pod's burst of new connections must not be dropped
/// while the accept loop is busy (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 1024;

/// Opens a nonblocking TCP listener on `addr` inside `netns`, ready for
/// `tokio::net::TcpListener::from_std`.
///
/// - `SO_REUSEADDR`: a restarted ztunnel rebinds while old connections sit in `TIME_WAIT`;
/// - `SO_REUSEPORT`: the old and new ztunnel both hold the pod's ports during a rolling upgrade,
///   so the pod never sees a refused connection;
/// - `SO_MARK` [`ZTUNNEL_MARK`]: replies and anything sent from accepted sockets skip capture;
/// - `IP_TRANSPARENT` when `transparent`: required to accept `TPROXY`ed connections (15006, 15008),
///   whose destination is not an address the listener is bound to. The REDIRECT target (15001)
///   does not need it.
///
/// An IPv6 wildcard (`[::]`) also accepts IPv4, independent of the `net.ipv6.bindv6only` sysctl.
pub fn bind_listener(
    netns: &NetNs,
    addr: SocketAddr,
    transparent: bool,
) -> io::Result<TcpListener> {
    netns.run_in(|| {
        let socket = new_tcp_socket(addr)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if transparent {
            set_transparent(&socket, addr)?;
        }
        socket.bind(&SockAddr::from(addr)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("bind {addr} in netns {}: {e}", netns.inode()),
            )
        })?;
        socket.listen(LISTEN_BACKLOG)?;
        Ok(TcpListener::from(socket))
    })?
}

/// Opens a nonblocking UDP socket on `addr` inside `netns` (the DNS proxy's), with the
/// listeners' `SO_REUSEADDR` and `SO_REUSEPORT`, so an upgraded ztunnel binds it while the old
/// one still holds it, and [`ZTUNNEL_MARK`].
pub fn bind_udp(netns: &NetNs, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    netns.run_in(|| {
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::DGRAM.nonblocking(),
            Some(Protocol::UDP),
        )?;
        socket.set_mark(ZTUNNEL_MARK)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&SockAddr::from(addr)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("bind udp {addr} in netns {}: {e}", netns.inode()),
            )
        })?;
        Ok(std::net::UdpSocket::from(socket))
    })?
}

/// Opens a nonblocking UDP socket inside `netns` on an ephemeral port of `dst`'s family, marked
/// with [`ZTUNNEL_MARK`] so the pod's rules let what it sends to `dst` out uncaptured (the DNS
/// proxy's forwarded queries: captured, they would come back to the proxy). Without the
/// listeners' port sharing, so that no other socket can receive its answers.
pub fn udp_to(netns: &NetNs, dst: SocketAddr) -> io::Result<std::net::UdpSocket> {
    netns.run_in(|| {
        let socket = Socket::new(
            Domain::for_address(dst),
            Type::DGRAM.nonblocking(),
            Some(Protocol::UDP),
        )?;
        socket.set_mark(ZTUNNEL_MARK)?;
        let any: std::net::IpAddr = match dst {
            SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        socket.bind(&SockAddr::from(SocketAddr::new(any, 0)))?;
        Ok(std::net::UdpSocket::from(socket))
    })?
}

/// Creates an unconnected, nonblocking TCP socket inside `netns` for a connection to `dst`.
///
/// The socket is marked with [`ZTUNNEL_MARK`] so the pod's rules let it out uncaptured. With
/// `bind_src`, it is bound to that address first; the address is usually *not* ztunnel's but the
/// original client's (keeping the pod's or peer's source IP), so `IP_TRANSPARENT` is set to allow
/// binding a non-local address. Use port 0 in `bind_src` to let the kernel pick the port.
///
/// The caller connects it, e.g. with
/// `tokio::net::TcpSocket::from_std_stream(socket.into()).connect(dst)`; the connect may happen
/// on any thread, the namespace was fixed at creation. `dst` is only used to pick the address
/// family, and must have the same family as `bind_src`.
pub fn connect_socket(
    netns: &NetNs,
    dst: SocketAddr,
    bind_src: Option<SocketAddr>,
) -> io::Result<Socket> {
    if let Some(src) = bind_src
        && src.is_ipv4() != dst.is_ipv4()
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source {src} and destination {dst} are of different address families"),
        ));
    }
    netns.run_in(|| {
        let socket = new_tcp_socket(dst)?;
        if let Some(src) = bind_src {
            set_transparent(&socket, src)?;
            if src.port() == 0 {
                // The port is chosen at connect time, by the whole 4-tuple: one caller (a
                // waypoint, say) opening many connections to the pod would otherwise need a
                // port of its address free of every socket, TIME_WAIT ones included.
                nix::sys::socket::setsockopt(
                    &socket,
                    nix::sys::socket::sockopt::IpBindAddressNoPort,
                    &true,
                )?;
            }
            socket.bind(&SockAddr::from(src)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("bind source {src} in netns {}: {e}", netns.inode()),
                )
            })?;
        }
        Ok(socket)
    })?
}

/// A nonblocking, close-on-exec, marked TCP socket of `addr`'s family.
fn new_tcp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_mark(ZTUNNEL_MARK)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

fn set_transparent(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true),
        SocketAddr::V6(_) => socket.set_ip_transparent_v6(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // These run in the test's own namespace: what matters here is the options, the namespace
    // switching is covered by `tests/inpod.rs`.

    #[test]
    fn listener_options() {
        let ns = NetNs::current().expect("netns");
        let listener =
            bind_listener(&ns, "127.0.0.1:0".parse().expect("addr"), true).expect("bind");
        let sock = socket2::SockRef::from(&listener);
        assert_eq!(sock.mark().expect("mark"), ZTUNNEL_MARK);
        assert!(sock.reuse_port().expect("reuseport"));
        assert!(sock.reuse_address().expect("reuseaddr"));
        assert!(sock.ip_transparent_v4().expect("transparent"));
        assert!(sock.nonblocking().expect("nonblocking"));
    }

    #[test]
    fn ipv6_wildcard_accepts_ipv4() {
        let ns = NetNs::current().expect("netns");
        let listener = bind_listener(&ns, "[::]:0".parse().expect("addr"), false).expect("bind");
        let sock = socket2::SockRef::from(&listener);
        assert!(!sock.only_v6().expect("only_v6"));
        assert!(!sock.ip_transparent_v6().expect("transparent"));
        let port = listener.local_addr().expect("addr").port();
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("v4 connect to [::] listener");
    }

    #[test]
    fn connect_socket_is_marked_and_bound() {
        let ns = NetNs::current().expect("netns");
        let dst: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let plain = connect_socket(&ns, dst, None).expect("socket");
        assert_eq!(plain.mark().expect("mark"), ZTUNNEL_MARK);
        assert!(!plain.ip_transparent_v4().expect("transparent"));

        // A source that is not local to this host: only IP_TRANSPARENT makes the bind succeed.
        let spoofed: SocketAddr = "198.18.255.77:0".parse().expect("addr");
        let bound = connect_socket(&ns, dst, Some(spoofed)).expect("spoofed bind");
        assert!(bound.ip_transparent_v4().expect("transparent"));
        assert!(
            nix::sys::socket::getsockopt(&bound, nix::sys::socket::sockopt::IpBindAddressNoPort)
                .expect("getsockopt"),
            "the port is left to connect"
        );
        let local = bound
            .local_addr()
            .expect("local")
            .as_socket()
            .expect("inet");
        assert_eq!(local.ip(), spoofed.ip());
    }

    #[test]
    fn connect_socket_rejects_mixed_families() {
        let ns = NetNs::current().expect("netns");
        let err = connect_socket(
            &ns,
            "[::1]:80".parse().expect("addr"),
            Some("127.0.0.1:0".parse().expect("addr")),
        )
        .expect_err("mixed families");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
