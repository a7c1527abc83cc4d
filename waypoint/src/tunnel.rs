//! One HBONE tunnel as a Pingora downstream: the stream is wrapped as a virtual socket and the
//! tunnel's facts ride in `ProxyDigest.user_data`, where every `ProxyHttp` phase can read them,
//! for HTTP/1.1 and for every stream of an h2c connection alike.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hbone::headers::{Baggage, Forwarded, TraceId, TraceParent};
use hbone::{ConnectHeaders, H2Stream, Identity};
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::l4::virt::VirtualSocketStream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{GetProxyDigest, GetSocketDigest, SocketDigest, Stream};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::stream::TunnelStream;

/// What the tunnel told us, fixed for its lifetime.
#[derive(Debug, Clone)]
pub(crate) struct Tunnel {
    /// The caller's identity, as its ztunnel proved it.
    pub(crate) source: Identity,
    /// The caller's identity as text, for logs, metrics and `source.principal`.
    pub(crate) principal: Arc<str>,
    /// The original client's address.
    pub(crate) client_ip: IpAddr,
    /// The tunnel peer (the client's ztunnel).
    pub(crate) peer: SocketAddr,
    /// The original destination: a service `VIP:port` or a workload `IP:port`.
    pub(crate) destination: SocketAddr,
    /// Unique among this process's tunnels (a downstream connection, to plugins and logs).
    pub(crate) id: u64,
    /// The trace the caller's ztunnel started (`traceparent`), or one of our own; every tunnel
    /// this one leads to carries it on, so one trace id follows a request through the logs of
    /// the client's ztunnel, the waypoint and the server's ztunnel.
    pub(crate) trace: TraceParent,
    /// What the caller's ztunnel said of it (`baggage`): telemetry's source labels when the
    /// configuration does not know the client's address.
    pub(crate) baggage: Option<Box<Baggage>>,
}

impl Tunnel {
    /// The facts of the tunnel `request` opens for `destination`. The client is the one
    /// `forwarded: for=` names (set by its ztunnel; an IPv4-mapped address read as the IPv4
    /// one, which policies and workloads are written with), else the tunnel's peer.
    pub(crate) fn new(
        request: &hbone::InboundRequest,
        principal: Arc<str>,
        destination: SocketAddr,
    ) -> Tunnel {
        let headers = request.headers();
        Tunnel {
            source: request.peer_identity().clone(),
            principal,
            client_ip: headers
                .forwarded
                .as_ref()
                .and_then(|f| f.client)
                .map_or(request.peer_addr().ip(), |c| c.ip().to_canonical()),
            peer: request.peer_addr(),
            destination,
            id: next_id(),
            trace: headers.traceparent.unwrap_or_else(TraceParent::random),
            baggage: headers.baggage.clone().map(Box::new),
        }
    }

    /// The metadata of a tunnel this one leads to: the original client (`forwarded`), the
    /// service it addressed (`host=`), and the same trace with a span of its own.
    pub(crate) fn onward(&self, service: Option<String>) -> ConnectHeaders {
        ConnectHeaders {
            forwarded: Some(Forwarded {
                client: Some(SocketAddr::new(self.client_ip, 0)),
                host: service,
            }),
            baggage: None,
            traceparent: Some(TraceParent {
                span_id: TraceParent::random().span_id,
                ..self.trace
            }),
        }
    }

    /// The trace id, as the access log shows it.
    pub(crate) fn trace_id(&self) -> TraceId {
        self.trace.trace_id()
    }
}

/// The next tunnel id.
pub(crate) fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Wraps a tunnel stream for Pingora's HTTP server.
pub(crate) fn downstream(stream: H2Stream, tunnel: Tunnel) -> Stream {
    let stream = TunnelStream::new(stream, None);
    let mut s = L4Stream::from(VirtualSocketStream::new(Box::new(stream)));
    // Pingora reads the client address from the socket digest (`session.client_addr()`).
    let digest = SocketDigest::from_raw_fd(-1);
    let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(SocketAddr::new(
        tunnel.client_ip,
        0,
    ))));
    let _ = digest
        .original_dst
        .set(Some(PingoraAddr::Inet(tunnel.destination)));
    s.set_socket_digest(digest);
    // The digest's response is the CONNECT answer; HBONE is a CONNECT proxy, so it fits.
    let connected = ResponseHeader::build(200, None).expect("200 is a valid status");
    s.set_proxy_digest(ProxyDigest::new(
        Box::new(connected),
        Some(Box::new(Arc::new(tunnel))),
    ));
    Box::new(s)
}

/// The tunnel a request arrived on.
pub(crate) fn of(session: &Session) -> Option<&Arc<Tunnel>> {
    session
        .as_downstream()
        .digest()?
        .proxy_digest
        .as_ref()?
        .user_data
        .as_ref()?
        .downcast_ref::<Arc<Tunnel>>()
}
