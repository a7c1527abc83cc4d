//! Request mirroring: a fire-and-forget copy of the request to another service, as Envoy's
//! shadowing does (the `Host` gets a `-shadow` suffix; the response is read and dropped).
//!
//! The copy streams alongside the original: body chunks are handed over as they pass
//! `request_body_filter`. A mirror that falls behind is abandoned rather than buffering the
//! original request or slowing it down, and its body is failed, not ended, so the mirror's
//! upstream never takes a truncated body for a whole one. It speaks HTTP/2 to a service port
//! declared `HTTP2` or `GRPC` (a gRPC mirror reaches a server that speaks nothing else) and
//! HTTP/1.1 otherwise, as the request itself goes upstream. A mirror to an endpoint out of
//! the mesh whose DestinationRule originates TLS is not sent: it would go in the clear.

use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hbone::{Authority, ConnectHeaders, ConnectRequest, HBONE_PORT};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh::Snapshot;
use mesh::model::{AppProtocol, Protocol};
use mesh::route::Backend;
use pingora_http::RequestHeader;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{DEFAULT_TRAFFIC, traffic_policy};
use crate::state::{Hop, Shared, View};
use crate::tunnel::Tunnel;

/// Chunks queued for one mirror before it is abandoned.
const QUEUE: usize = 32;
/// How long a mirror may take in all.
const DEADLINE: Duration = Duration::from_secs(10);

/// Feeds the body of the original request to its mirror.
#[derive(Debug)]
pub(super) struct Sender(Option<mpsc::Sender<Bytes>>);

impl Sender {
    /// Passes a body chunk on; `end` closes the mirror's body.
    pub(super) fn body(&mut self, chunk: Option<&Bytes>, end: bool) {
        let Some(tx) = &self.0 else { return };
        if let Some(chunk) = chunk.filter(|c| !c.is_empty())
            && tx.try_send(chunk.clone()).is_err()
        {
            tracing::debug!("mirror fell behind; abandoning it");
            self.0 = None;
        }
        if end {
            // An empty chunk marks the end; a channel closed without it means "abandon".
            if let Some(tx) = self.0.take() {
                let _ = tx.try_send(Bytes::new());
            }
        }
    }
}

/// Starts mirroring the request `tunnel` carries to `backend`; `None` if it has nowhere to go.
/// `has_body` says whether a body follows the head (an HTTP/2 request may have one without
/// saying how long it is).
///
/// The mirror's service picks its upstream as a request to it would: an endpoint chosen by its
/// DestinationRule's load balancing, reached over HBONE when it is in the mesh and in plain TCP
/// when not (an endpoint known by name resolved first), or, for a service that picks none (a
/// ServiceEntry resolved `NONE`), the address the caller dialled, which is only ever one of its
/// own when the mirror is of the service the request was sent to.
pub(super) fn start(
    shared: Arc<Shared>,
    view: &View,
    backend: &Backend,
    request_port: u16,
    req: &RequestHeader,
    has_body: bool,
    tunnel: &Tunnel,
) -> Option<Sender> {
    let snapshot = &view.snapshot;
    let (id, service) = snapshot.service_by_host(&backend.service)?;
    let port = backend.port.unwrap_or(request_port);
    let (port_index, _) = service.port(port)?;
    let subset = view.subset(id, backend.subset.as_deref())?;
    let policy =
        traffic_policy(view, id, port_index, backend.subset.as_deref()).unwrap_or(&DEFAULT_TRAFFIC);
    let choose = || {
        let now = Instant::now();
        view.balancer
            .choose(snapshot, id, port_index, subset, policy, None, &[], now)
    };
    let (hop, chosen) = match Hop::to_service(service, tunnel.destination, choose) {
        Ok(found) => found,
        Err(error) => {
            tracing::debug!(mirror = %service.hostname, %error, "not mirrored");
            return None;
        }
    };
    let plain = match hop {
        Hop::Endpoint(id, _) => snapshot.workload(id).protocol != Protocol::Hbone,
        Hop::Address(_) => true,
    };
    if plain && policy.tls.is_some() {
        // A request there originates the DestinationRule's TLS; its mirror is never sent in
        // the clear, headers and all.
        tracing::debug!(mirror = %service.hostname, "not mirrored: the DestinationRule originates TLS, which mirrors do not");
        return None;
    }
    let (tx, rx) = if has_body {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let http2 = matches!(
        service.ports[port_index].protocol,
        AppProtocol::Http2 | AppProtocol::Grpc
    );
    let request = match shadow(req, http2, Relayed(rx)) {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(mirror = %service.hostname, %error, "not mirrored");
            return None;
        }
    };
    let mirror = Mirror {
        shared,
        snapshot: snapshot.clone(),
        service: service.hostname.clone(),
        hop,
        connect_timeout: policy.connection_pool.connect_timeout,
        headers: tunnel.onward(Some(service.hostname.to_string())),
        http2,
    };
    tokio::spawn(async move {
        // Counted as in flight to the endpoint until the mirror is over.
        let _chosen = chosen;
        let service = mirror.service.clone();
        if tokio::time::timeout(DEADLINE, mirror.send(request))
            .await
            .is_err()
        {
            tracing::debug!(mirror = %service, "mirror timed out");
        }
    });
    Some(Sender(tx))
}

/// One mirrored request, once its upstream is picked.
struct Mirror {
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    service: Arc<str>,
    hop: Hop,
    connect_timeout: Duration,
    /// The CONNECT's headers, for an endpoint in the mesh.
    headers: ConnectHeaders,
    http2: bool,
}

impl Mirror {
    /// Connects to the upstream and sends the request, then logs how it went.
    async fn send(self, request: http::Request<Relayed>) {
        let (workload, upstream) = match self.hop {
            Hop::Endpoint(id, port) => {
                let workload = self.snapshot.workload(id);
                let limit = self.connect_timeout;
                match self.shared.names.address_of(workload, limit).await {
                    Ok(ip) => (Some(workload), SocketAddr::new(ip, port)),
                    Err(error) => {
                        tracing::debug!(mirror = %self.service, %error, "mirror failed");
                        return;
                    }
                }
            }
            Hop::Address(addr) => (None, addr),
        };
        let sent = match workload.filter(|w| w.protocol == Protocol::Hbone) {
            Some(w) => {
                let tunnel = ConnectRequest {
                    src: self.shared.identity.clone(),
                    dst_identities: vec![w.identity.clone()],
                    next_hop: SocketAddr::new(upstream.ip(), HBONE_PORT),
                    authority: Authority::Addr(upstream),
                    headers: self.headers,
                };
                let connect = self.shared.pool.connect(tunnel);
                match tokio::time::timeout(self.connect_timeout, connect).await {
                    Ok(Ok(stream)) => exchange(stream, self.http2, request).await,
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("connect timeout".to_owned()),
                }
            }
            None => {
                let connect = TcpStream::connect(upstream);
                match tokio::time::timeout(self.connect_timeout, connect).await {
                    Ok(Ok(stream)) => exchange(stream, self.http2, request).await,
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("connect timeout".to_owned()),
                }
            }
        };
        match sent {
            Ok(status) => {
                tracing::debug!(mirror = %self.service, %upstream, status, "mirrored")
            }
            Err(error) => {
                tracing::debug!(mirror = %self.service, %upstream, %error, "mirror failed")
            }
        }
    }
}

/// The mirror of `req`: the same method, path and headers, for the shadow host (in the URI's
/// authority for HTTP/2, which sends it as `:authority`, and in `Host` for HTTP/1.1), without
/// the headers that describe the original connection or its framing. A body is framed anew,
/// chunked over HTTP/1.1: what passes the body filter (a plugin may rewrite it) is not known
/// to match the original's length, and a declared length would let a short one pass whole.
fn shadow(
    req: &RequestHeader,
    http2: bool,
    body: Relayed,
) -> Result<http::Request<Relayed>, http::Error> {
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let host = (req.uri.authority().map(|a| a.as_str()))
        .or_else(|| req.headers.get(http::header::HOST)?.to_str().ok())
        .unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{name}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    };
    let mut builder = http::Request::builder().method(req.method.clone());
    builder = if http2 {
        builder
            .version(http::Version::HTTP_2)
            .uri(format!("http://{host}{path}"))
    } else if body.is_end_stream() {
        builder.uri(path).header(http::header::HOST, &host)
    } else {
        (builder.uri(path).header(http::header::HOST, &host))
            .header(http::header::TRANSFER_ENCODING, "chunked")
    };
    for (name, value) in &req.headers {
        if !matches!(
            name.as_str(),
            "host"
                | "content-length"
                | "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "upgrade"
        ) {
            builder = builder.header(name, value);
        }
    }
    builder.body(body)
}

/// The original request's body as the mirror's, each chunk as it passes.
struct Relayed(Option<mpsc::Receiver<Bytes>>);

impl Body for Relayed {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let Some(rx) = &mut self.0 else {
            return Poll::Ready(None);
        };
        match ready!(rx.poll_recv(cx)) {
            Some(chunk) if !chunk.is_empty() => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            Some(_) => {
                self.0 = None;
                Poll::Ready(None)
            }
            // Closed without the end: the original ended early, or the mirror fell behind.
            None => Poll::Ready(Some(Err(io::Error::other(
                "the original request ended early or the mirror fell behind",
            )))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// Sends `request` over `stream` and reads the response to its end, which is dropped; its
/// status, or what failed, is what the mirror logs. The connection is driven here, not in a
/// task of its own, so it ends with the exchange, at the latest with the mirror's deadline.
async fn exchange<S>(stream: S, http2: bool, request: http::Request<Relayed>) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    if http2 {
        let (mut sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        driving(conn, answer(sender.send_request(request))).await
    } else {
        let (mut sender, conn) = http1::handshake(io).await.map_err(|e| e.to_string())?;
        driving(conn, answer(sender.send_request(request))).await
    }
}

/// Runs `exchange` while driving `conn`, the connection it goes over.
async fn driving(
    conn: impl Future,
    exchange: impl Future<Output = Result<u16, String>>,
) -> Result<u16, String> {
    let mut exchange = pin!(exchange);
    tokio::select! {
        result = &mut exchange => result,
        // The connection ended (or failed): the exchange ends with it.
        _ = conn => exchange.await,
    }
}

/// The response's status, once its body is read to the end and dropped.
async fn answer(
    response: impl Future<Output = hyper::Result<http::Response<Incoming>>>,
) -> Result<u16, String> {
    let response = response.await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame.map_err(|e| e.to_string())?;
    }
    Ok(status)
}
