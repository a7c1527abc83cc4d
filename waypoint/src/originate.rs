//! connect_originate: each upstream attempt is a CONNECT stream on our pooled HBONE connection
//! to the endpoint's ztunnel: an HTTP/1.1 tunnel parked by an earlier request to the same
//! endpoint (`keepalive`), or a new one.
//!
//! Pingora sees the stream through `custom_l4` and never reuses it itself (virtual streams
//! carry no file descriptor for its reuse check), so the HTTP/2 connection underneath and the
//! parked tunnels are what we pool: a request costs a CONNECT stream at most, never a
//! handshake. The stream also enforces the attempt's deadline, which gives Istio's overall
//! route timeout and per-try timeout without a timer per phase: once it passes, reads and
//! writes fail with `TimedOut` and the request fails over or ends with 504.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hbone::{ConnectRequest, Pool};
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::l4::virt::VirtualSocketStream;
use pingora_error::{Error, ErrorType, Result};
use tokio::time::Instant;

use crate::keepalive::{Attempt, Endpoint, IdleTunnels, Parking, Reused};
use crate::stream::TunnelStream;

/// Opens the CONNECT for one attempt.
pub(crate) struct HboneConnector {
    pub(crate) pool: Pool,
    pub(crate) request: ConnectRequest,
    /// Bounds the CONNECT itself (DestinationRule `connectTimeout`, default 10 s).
    pub(crate) connect_timeout: Duration,
    /// When the attempt must be over (per-try or overall timeout, whichever is first).
    pub(crate) deadline: Option<Instant>,
    /// For an HTTP/1.1 upstream: where tunnels to the endpoint are parked between requests.
    pub(crate) keepalive: Option<KeepAlive>,
}

/// How an HTTP/1.1 upstream's tunnels are kept between requests.
#[derive(Debug)]
pub(crate) struct KeepAlive {
    pub(crate) idle: Arc<IdleTunnels>,
    /// What this attempt's request and tunnel tell each other.
    pub(crate) attempt: Arc<Attempt>,
    /// DestinationRule `http.idleTimeout`.
    pub(crate) idle_timeout: Duration,
    /// DestinationRule `http.maxRequestsPerConnection` (0: no limit).
    pub(crate) max_requests: u32,
    /// Whether a parked tunnel may be taken up (not after one failed this request).
    pub(crate) take_parked: bool,
}

impl fmt::Debug for HboneConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneConnector")
            .field("next_hop", &self.request.next_hop)
            .field("authority", &self.request.authority)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl L4Connect for HboneConnector {
    async fn connect(&self, _: &PingoraAddr) -> Result<L4Stream> {
        let endpoint = self.request.authority.addr().map(|target| Endpoint {
            next_hop: self.request.next_hop,
            target,
        });
        let parked = (self.keepalive.as_ref())
            .filter(|k| k.take_parked)
            .zip(endpoint)
            .and_then(|(k, endpoint)| k.idle.take(endpoint, k.idle_timeout));
        let (stream, served) = match parked {
            Some(Reused { stream, served }) => {
                if let Some(k) = &self.keepalive {
                    k.attempt.mark_reused();
                }
                (stream, served)
            }
            None => (self.open().await?, 0),
        };
        let mut stream = TunnelStream::new(stream, self.deadline);
        if let (Some(k), Some(endpoint)) = (&self.keepalive, endpoint) {
            stream = stream.parked_after(Parking {
                idle: k.idle.clone(),
                endpoint,
                attempt: k.attempt.clone(),
                served: served + 1,
                max_requests: k.max_requests,
            });
        }
        Ok(L4Stream::from(VirtualSocketStream::new(Box::new(stream))))
    }
}

impl HboneConnector {
    /// A new CONNECT stream, within the connect timeout and the attempt's deadline.
    async fn open(&self) -> Result<hbone::H2Stream> {
        let mut until = Instant::now() + self.connect_timeout;
        if let Some(d) = self.deadline {
            until = until.min(d);
        }
        match tokio::time::timeout_at(until, self.pool.connect(self.request.clone())).await {
            Err(_) => Err(Error::explain(
                ErrorType::ConnectTimedout,
                format!("HBONE CONNECT to {} timed out", self.request.next_hop),
            )),
            Ok(Err(e)) => {
                // A status means the destination's ztunnel answered: 503 = the application is
                // unreachable, 401 = its policy refused the waypoint. Both are connect failures.
                let kind = if e.status().is_some() {
                    ErrorType::ConnectRefused
                } else {
                    ErrorType::ConnectError
                };
                Err(Error::because(
                    kind,
                    format!("HBONE CONNECT to {}", self.request.next_hop),
                    e,
                ))
            }
            Ok(Ok(stream)) => Ok(stream),
        }
    }
}
