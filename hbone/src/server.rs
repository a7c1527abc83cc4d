//! The HBONE server: mTLS, HTTP/2, and one [`Handler`] call per CONNECT stream.
//!
//! Every connection runs in its own task, so a bad peer (plaintext, random bytes, a stalled
//! handshake, a wrong certificate) costs only that task. Every accepted stream runs in its own task
//! too; the connection task only drives HTTP/2 and answers requests that are not valid CONNECTs.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info_span, warn};

use crate::authority::Authority;
use crate::config::{Config, keepalive};
use crate::drain::DrainWatch;
use crate::error::Error;
use crate::headers::ConnectHeaders;
use crate::identity::Identity;
use crate::manager::CertHandle;
use crate::stats::{GaugeGuard, Stats};
use crate::stream::H2Stream;
use crate::tls;

/// Decides what to do with each inbound CONNECT.
pub trait Handler: Send + Sync + 'static {
    /// Called once per CONNECT stream, in its own task. Must answer with
    /// [`InboundRequest::accept`] or [`InboundRequest::refuse`]; dropping the request resets it.
    fn handle(&self, request: InboundRequest) -> impl Future<Output = ()> + Send;
}

/// An HBONE listener serving one workload identity.
pub struct Server<H> {
    config: Config,
    acceptor: TlsAcceptor,
    trust_domain: Arc<str>,
    handler: Arc<H>,
    stats: Arc<Stats>,
}

impl<H: Handler> Server<H> {
    /// A server presenting `cert` (renewals apply to new connections) and calling `handler`.
    pub fn new(cert: CertHandle, handler: H, config: Config) -> Result<Self, Error> {
        let trust_domain = cert.identity().trust_domain().into();
        Ok(Server {
            acceptor: TlsAcceptor::from(tls::server_config(cert)?),
            config,
            trust_domain,
            handler: Arc::new(handler),
            stats: Arc::default(),
        })
    }

    /// Live connections and streams of this server.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Accepts connections until `drain` fires. Each connection then gets a graceful GOAWAY and
    /// keeps serving its in-flight streams; it holds a clone of `drain` until it is done, so the
    /// drain trigger's `drain()` resolves when the last stream has finished.
    pub async fn serve(self, listener: TcpListener, mut drain: DrainWatch) {
        let this = Arc::new(self);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = drain.signaled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(%error, "HBONE accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let peer = crate::canonical(peer);
            let this = this.clone();
            let drain = drain.clone();
            let span = info_span!("hbone_inbound", peer.addr = %peer);
            tokio::spawn(this.serve_connection(tcp, peer, drain).instrument(span));
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        mut drain: DrainWatch,
    ) {
        let _live = self.stats.connections.track();
        let _ = tcp.set_nodelay(true);
        let Ok(local) = tcp.local_addr().map(crate::canonical) else {
            return;
        };
        let handshake =
            tokio::time::timeout(self.config.connect_timeout, self.acceptor.accept(tcp));
        let tls = match handshake.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                self.stats.handshake_failed();
                warn!(%error, "HBONE TLS handshake refused");
                return;
            }
            Err(_) => {
                self.stats.handshake_failed();
                warn!("HBONE TLS handshake timed out");
                return;
            }
        };
        let Some(peer_identity) = tls::peer_identity(tls.get_ref().1, &self.trust_domain) else {
            // The verifier demands one; reaching here means a verifier bug, so refuse loudly.
            warn!("HBONE peer passed verification without an identity; closing");
            return;
        };
        let mut conn = match self.config.server_builder().handshake(tls).await {
            Ok(conn) => conn,
            Err(error) => {
                warn!(%error, src.identity = %peer_identity, "HTTP/2 handshake failed");
                return;
            }
        };
        debug!(src.identity = %peer_identity, "HBONE connection established");
        let mut pings = conn
            .ping_pong()
            .expect("ping_pong is taken once per connection");
        let dead = keepalive(
            &mut pings,
            self.config.ping_interval,
            self.config.ping_timeout,
        );
        tokio::pin!(dead);
        let mut draining = false;
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((request, respond))) => {
                        self.dispatch(request, respond, &peer_identity, peer, local);
                    }
                    Some(Err(error)) => {
                        debug!(%error, "HBONE connection ended with an error");
                        break;
                    }
                    None => break,
                },
                _ = drain.signaled(), if !draining => {
                    draining = true;
                    debug!("draining HBONE connection");
                    conn.graceful_shutdown();
                }
                reason = &mut dead => {
                    warn!(src.identity = %peer_identity, reason, "closing HBONE connection");
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    break;
                }
            }
        }
    }

    fn dispatch(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer_identity: &Identity,
        peer_addr: SocketAddr,
        local_addr: SocketAddr,
    ) {
        if request.method() != Method::CONNECT {
            debug!(method = %request.method(), "refusing non-CONNECT request");
            reply(&mut respond, StatusCode::BAD_REQUEST);
            return;
        }
        let target = match request
            .uri()
            .authority()
            .map(|a| a.as_str().parse::<Authority>())
        {
            Some(Ok(target)) => target,
            Some(Err(error)) => {
                debug!(%error, "refusing CONNECT");
                reply(&mut respond, StatusCode::BAD_REQUEST);
                return;
            }
            None => {
                debug!("refusing CONNECT without an authority");
                reply(&mut respond, StatusCode::BAD_REQUEST);
                return;
            }
        };
        let (parts, recv) = request.into_parts();
        let inbound = InboundRequest {
            peer_identity: peer_identity.clone(),
            peer_addr,
            local_addr,
            target,
            headers: ConnectHeaders::from_map(&parts.headers),
            response_headers: HeaderMap::new(),
            respond,
            recv,
            live: self.stats.streams.track(),
        };
        let handler = self.handler.clone();
        tokio::spawn(async move { handler.handle(inbound).await });
    }
}

impl<H> fmt::Debug for Server<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("trust_domain", &self.trust_domain)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // Fails only if the client already reset the stream: nothing left to tell it.
    let _ = respond.send_response(response, true);
}

/// One CONNECT awaiting its answer.
pub struct InboundRequest {
    peer_identity: Identity,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
    target: Authority,
    headers: ConnectHeaders,
    response_headers: HeaderMap,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
    live: GaugeGuard,
}

impl InboundRequest {
    /// The caller's verified SPIFFE identity.
    pub fn peer_identity(&self) -> &Identity {
        &self.peer_identity
    }

    /// The caller's TCP address (the next hop that dialed us, not necessarily the client).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The address the connection arrived on: in-pod, the workload's own IP.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The CONNECT target.
    pub fn target(&self) -> &Authority {
        &self.target
    }

    /// `forwarded`, `baggage` and `traceparent` as sent.
    pub fn headers(&self) -> &ConnectHeaders {
        &self.headers
    }

    /// Headers to send with the 200 (e.g. the destination's `baggage`).
    pub fn response_headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.response_headers
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<H2Stream, Error> {
        let mut response = Response::new(());
        *response.headers_mut() = std::mem::take(&mut self.response_headers);
        let send = self.respond.send_response(response, false)?;
        Ok(H2Stream::new(send, self.recv, Box::new(self.live)))
    }

    /// Answers an error status (400, 401, 503, ...) as headers with END_STREAM.
    pub fn refuse(mut self, status: StatusCode) {
        reply(&mut self.respond, status);
    }
}

impl fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundRequest")
            .field("peer_identity", &self.peer_identity)
            .field("peer_addr", &self.peer_addr)
            .field("local_addr", &self.local_addr)
            .field("target", &self.target)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}
