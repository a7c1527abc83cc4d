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
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use hbone::{ConnectRequest, H2Stream, Pool};
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora_error::{Error, ErrorType, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

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
        let timed = Timed {
            inner: stream,
            expiry: self.deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        };
        Ok(L4Stream::from(VirtualSocketStream::new(Box::new(timed))))
    }
}

/// A tunnel stream that fails reads and writes with `TimedOut` once its deadline passes.
struct Timed {
    inner: H2Stream,
    expiry: Option<Pin<Box<Sleep>>>,
}

impl Timed {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.expiry
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "upstream request timeout")
}

impl AsyncRead for Timed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl fmt::Debug for Timed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timed")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl VirtualSocket for Timed {
    fn set_socket_option(&self, _: VirtualSockOpt) -> io::Result<()> {
        Ok(())
    }
}
