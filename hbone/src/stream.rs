//! One HBONE tunnel as a byte stream: `AsyncRead + AsyncWrite` over an HTTP/2 stream pair.
//!
//! * Flow control: receive capacity is released as the reader *consumes* bytes, not when a frame
//!   arrives, so a slow reader pushes back on the sender through the HTTP/2 window.
//! * Half-close: `shutdown` sends END_STREAM and reading may continue; the peer's END_STREAM reads
//!   as EOF and writing may continue.
//! * Dropping the stream without `shutdown` resets it (RST_STREAM `CANCEL`, h2's "stream no longer
//!   needed"). That is how HTTP/2 clients let go of a tunnel they are done with (Envoy's and our
//!   waypoint's idle upstream pools drop theirs so), and upstream ztunnel reads it as the end of
//!   the stream: so does this one. A reset with `NO_ERROR` is an end too (a server may reset
//!   after a complete response), and shutting down a stream the peer ended either way succeeds,
//!   as there is nothing left to close. Any other reset is an error; so is writing data to a
//!   stream the peer has reset, as the data is lost.
//! * An abort (a failed copy, a connection a policy change refuses) resets with
//!   `CONNECT_ERROR` instead, as RFC 9113 section 8.5 has a CONNECT proxy signal a TCP error: the
//!   far end sees a failure, never a clean end that could pass a truncated stream for a whole.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::ChunkIo;

/// Anything a stream keeps alive for its lifetime (a pool slot, a live-stream count).
type Guard = Box<dyn Send + Sync>;

/// An established HBONE tunnel.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read.
    pending: Bytes,
    write_closed: bool,
    _guard: Guard,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, guard: Guard) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            _guard: guard,
        }
    }

    /// Waits for send capacity (flow-control window and buffer room) for up to `want` bytes.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                // Capacity was assigned and taken back before we saw it: wait for more.
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                None | Some(Err(_)) => return self.broken(cx).map(Err),
            }
        }
    }

    fn send(&mut self, cx: &mut Context<'_>, data: Bytes) -> Poll<io::Result<()>> {
        if self.send.send_data(data, false).is_err() {
            return self.broken(cx).map(Err);
        }
        Poll::Ready(Ok(()))
    }

    /// Waits until at least `min` bytes have arrived, or the peer ended its side, and shows what
    /// has arrived without consuming it: reads return it afterwards, and its flow-control
    /// capacity is released only then. For a proxy that must look at a stream's first bytes
    /// (protocol sniffing) before deciding what to do with it.
    pub async fn peek(&mut self, min: usize) -> io::Result<&[u8]> {
        while self.pending.len() < min {
            match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
                None => break,
                Some(Ok(chunk)) if self.pending.is_empty() => self.pending = chunk,
                Some(Ok(chunk)) => {
                    let mut joined = BytesMut::with_capacity(self.pending.len() + chunk.len());
                    joined.extend_from_slice(&self.pending);
                    joined.extend_from_slice(&chunk);
                    self.pending = joined.freeze();
                }
                Some(Err(e)) => {
                    recv_error(e)?;
                    break;
                }
            }
        }
        Ok(&self.pending)
    }

    fn release(&mut self, n: usize) {
        // Fails only if the stream is already gone, in which case there is nothing to release.
        let _ = self.recv.flow_control().release_capacity(n);
    }

    fn broken(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        // The stream can no longer send: find out why.
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(reason) => reset_error(reason),
            Err(e) => h2_io_error(e),
        })
    }
}

/// Whether a reset the peer sent ends the stream cleanly rather than failing it.
fn ends_cleanly(reason: Reason) -> bool {
    reason == Reason::NO_ERROR || reason == Reason::CANCEL
}

/// Maps an error from the receive side: a reset that ends the stream cleanly reads as EOF.
fn recv_error(e: h2::Error) -> io::Result<()> {
    if e.is_reset() && e.is_remote() && e.reason().is_some_and(ends_cleanly) {
        Ok(())
    } else {
        Err(h2_io_error(e))
    }
}

fn reset_error(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("HBONE stream reset by peer: {reason}"),
    )
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().expect("checked is_io");
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.release(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(e)) => return Poll::Ready(recv_error(e)),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_send_capacity(cx, buf.len()))?;
        ready!(this.send(cx, Bytes::copy_from_slice(&buf[..n])))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.send.reserve_capacity(0);
        if this.send.send_data(Bytes::new(), true).is_err() {
            // The peer has reset the stream: if it ended it cleanly, nothing is left to close.
            return Poll::Ready(match ready!(this.send.poll_reset(cx)) {
                Ok(reason) if ends_cleanly(reason) => {
                    this.write_closed = true;
                    Ok(())
                }
                Ok(reason) => Err(reset_error(reason)),
                Err(e) => Err(h2_io_error(e)),
            });
        }
        this.write_closed = true;
        Poll::Ready(Ok(()))
    }
}

/// Chunks pass between the copy and HTTP/2 as they are: received DATA payloads are handed out
/// whole (their flow-control capacity released as they go), and a chunk to send becomes DATA
/// frames as the window allows, split without copying.
impl ChunkIo for H2Stream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _: &mut BytesMut,
        _: usize,
    ) -> Poll<io::Result<Bytes>> {
        if !self.pending.is_empty() {
            let chunk = std::mem::take(&mut self.pending);
            self.release(chunk.len());
            return Poll::Ready(Ok(chunk));
        }
        loop {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(Bytes::new())),
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    self.release(chunk.len());
                    return Poll::Ready(Ok(chunk));
                }
                Some(Err(e)) => return Poll::Ready(recv_error(e).map(|()| Bytes::new())),
            }
        }
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let n = ready!(self.poll_send_capacity(cx, chunk.len()))?;
        self.send(cx, chunk.split_to(n))
    }

    /// Resets the stream with `CONNECT_ERROR`, which peers read as a failed connection, where
    /// the `CANCEL` of a plain drop reads as an end.
    fn abort(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
    }
}

impl fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id())
            .field("pending", &self.pending.len())
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "pingora")]
impl pingora_core::protocols::l4::virt::VirtualSocket for H2Stream {
    /// Socket options (nodelay, keepalive) mean nothing on a tunnel stream; the outer TCP
    /// connection has its own. Pingora fails the connection if this errors, so accept them all.
    fn set_socket_option(
        &self,
        _: pingora_core::protocols::l4::virt::VirtualSockOpt,
    ) -> io::Result<()> {
        Ok(())
    }
}
