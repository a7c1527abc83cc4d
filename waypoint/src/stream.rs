//! A tunnel stream as Pingora's virtual socket, on both legs.
//!
//! Two things Pingora cannot know about an HBONE stream are handled here:
//! * **Deadlines.** Upstream attempts carry their deadline (per-try or overall timeout); once
//!   it passes, reads and writes fail with `TimedOut`, which ends the attempt wherever Pingora
//!   is in it.
//! * **Closing.** Pingora drops a stream it is done with. An upstream tunnel whose exchange
//!   ended cleanly is parked for the next request to its endpoint (`keepalive`). Otherwise:
//!   dropping an HTTP/2 stream whose peer has not finished resets it (`CANCEL`), and a reset
//!   racing the last response bytes can cost the client that response, so a dropped stream
//!   lingers briefly in a task of its own: it ends our side (`END_STREAM`) and waits for the
//!   peer's end, as closing a TCP socket does with FIN.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hbone::H2Stream;

use crate::keepalive::Parking;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a dropped stream waits for its peer to finish before it is reset.
const LINGER: Duration = Duration::from_secs(5);

/// An HBONE stream handed to Pingora.
pub(crate) struct TunnelStream {
    inner: Option<H2Stream>,
    expiry: Option<Pin<Box<Sleep>>>,
    /// Where an upstream tunnel goes when Pingora lets go of it, if its exchange was clean.
    parking: Option<Parking>,
}

impl TunnelStream {
    /// Wraps `inner`; with a `deadline`, I/O fails with `TimedOut` from then on.
    pub(crate) fn new(inner: H2Stream, deadline: Option<Instant>) -> Self {
        Self {
            inner: Some(inner),
            expiry: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            parking: None,
        }
    }

    /// An upstream tunnel that is parked, not closed, when it is let go of after a clean
    /// exchange.
    pub(crate) fn parked_after(mut self, parking: Parking) -> Self {
        self.parking = Some(parking);
        self
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.expiry
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }

    fn inner(&mut self) -> Pin<&mut H2Stream> {
        Pin::new(self.inner.as_mut().expect("present until drop"))
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "upstream request timeout")
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        self.inner().poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        self.inner().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_shutdown(cx)
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let mut stream = self.inner.take();
        if let Some(parking) = self.parking.take() {
            stream = stream.and_then(|s| parking.park(s));
        }
        let (Some(mut stream), Ok(runtime)) = (stream, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            let _ = tokio::time::timeout(LINGER, async move {
                let _ = stream.shutdown().await;
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

impl fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelStream")
            .field("inner", &self.inner)
            .field("deadline", &self.expiry.as_ref().map(|s| s.deadline()))
            .finish()
    }
}

impl VirtualSocket for TunnelStream {
    /// Socket options mean nothing on a tunnel stream (the outer connection has its own);
    /// Pingora fails the connection if this errors, so accept them all.
    fn set_socket_option(&self, _: VirtualSockOpt) -> io::Result<()> {
        Ok(())
    }
}
