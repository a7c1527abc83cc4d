//! connect_originate: each upstream attempt is a fresh CONNECT stream on our pooled HBONE
//! connection to the endpoint's ztunnel.
//!
//! Pingora sees the stream through `custom_l4` and never reuses it (virtual streams carry no
//! file descriptor for its reuse check), so the HTTP/2 connection underneath is what we pool:
//! one CONNECT per request costs a stream, not a handshake. The stream also enforces the
//! attempt's deadline, which gives Istio's overall route timeout and per-try timeout without a
//! timer per phase: once it passes, reads and writes fail with `TimedOut` and the request
//! fails over or ends with 504.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use hbone::{ConnectRequest, Pool};
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::l4::virt::VirtualSocketStream;
use pingora_error::{Error, ErrorType, Result};
use tokio::time::Instant;

use crate::stream::TunnelStream;

/// Opens the CONNECT for one attempt.
pub(crate) struct HboneConnector {
    pub(crate) pool: Pool,
    pub(crate) request: ConnectRequest,
    /// Bounds the CONNECT itself (DestinationRule `connectTimeout`, default 10 s).
    pub(crate) connect_timeout: Duration,
    /// When the attempt must be over (per-try or overall timeout, whichever is first).
    pub(crate) deadline: Option<Instant>,
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
        let mut until = Instant::now() + self.connect_timeout;
        if let Some(d) = self.deadline {
            until = until.min(d);
        }
        let stream =
            match tokio::time::timeout_at(until, self.pool.connect(self.request.clone())).await {
                Err(_) => {
                    return Err(Error::explain(
                        ErrorType::ConnectTimedout,
                        format!("HBONE CONNECT to {} timed out", self.request.next_hop),
                    ));
                }
                Ok(Err(e)) => {
                    // A status means the destination's ztunnel answered: 503 = the application is
                    // unreachable, 401 = its policy refused the waypoint. Both are connect failures.
                    let kind = if e.status().is_some() {
                        ErrorType::ConnectRefused
                    } else {
                        ErrorType::ConnectError
                    };
                    return Err(Error::because(
                        kind,
                        format!("HBONE CONNECT to {}", self.request.next_hop),
                        e,
                    ));
                }
                Ok(Ok(stream)) => stream,
            };
        let stream = TunnelStream::new(stream, self.deadline);
        Ok(L4Stream::from(VirtualSocketStream::new(Box::new(stream))))
    }
}
