//! Bidirectional copy between two byte streams with half-close propagation.
//!
//! Each direction starts with 1 KiB reads and grows them as the flow proves itself (16 KiB after
//! 128 KiB, 256 KiB after 10 MiB), like upstream ztunnel: most mesh connections are small
//! request/response exchanges that would waste a large buffer each, while bulk flows need large
//! reads to amortise syscalls and produce full 16 KiB TLS records.
//!
//! Bytes move as owned chunks ([`ChunkIo`]): a socket reads into the copy's buffer and the filled
//! part is handed on whole, and an HBONE tunnel gives out the DATA payloads HTTP/2 already holds
//! and sends the chunks it is given as DATA frames. So between the socket and the TLS record there
//! is no user-space copy in either direction, only the ones TLS itself makes.
//!
//! When one side reaches EOF its peer's write half is shut down (FIN, or END_STREAM on HBONE) and
//! the other direction keeps flowing until it ends too.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const INITIAL: usize = 1024;
const MEDIUM: usize = 16 * 1024;
const LARGE: usize = 256 * 1024;
const MEDIUM_AFTER: u64 = 128 * 1024;
const LARGE_AFTER: u64 = 10 * 1024 * 1024;

/// How many chunks one direction may move before yielding to the scheduler, so two always-ready
/// streams cannot monopolise a worker thread.
const BUDGET: usize = 32;

/// A stream [`copy_bidirectional`] moves bytes through, one owned chunk at a time.
///
/// The provided methods suit a socket: reads fill the copy's buffer, writes take a slice (the
/// kernel copies it). [`H2Stream`](crate::H2Stream) overrides both to pass chunks to and from
/// HTTP/2 without copying them.
pub trait ChunkIo: AsyncRead + AsyncWrite + Unpin {
    /// Reads the next chunk; empty at EOF. `buf` is the direction's buffer, to read into with
    /// at least `size` bytes of room (a stream that owns its chunks leaves it untouched).
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        size: usize,
    ) -> Poll<io::Result<Bytes>> {
        // Reclaims the allocation in place once the chunks cut from it are gone.
        buf.reserve(size);
        if ready!(tokio_util::io::poll_read_buf(Pin::new(self), cx, buf))? == 0 {
            return Poll::Ready(Ok(Bytes::new()));
        }
        Poll::Ready(Ok(buf.split().freeze()))
    }

    /// Writes a prefix of `chunk` and advances it past what was taken.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(self).poll_write(cx, chunk))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        chunk.advance(n);
        Poll::Ready(Ok(()))
    }

    /// Ends the stream so that its far end sees an error rather than an end, once the copy
    /// it was part of failed or was cut short: a CONNECT proxy turns a TCP error into a reset
    /// of the tunnel (RFC 9113, section 8.5), as the bytes in flight are lost. Dropping the
    /// stream afterwards completes it.
    ///
    /// A socket keeps the default, an ordinary close when dropped: a reset would also discard
    /// what is already written and still on its way to the caller, such as the response to a
    /// request whose body could not be delivered, and the caller is better served by that
    /// response and a FIN.
    fn abort(&mut self) {}
}

/// A socket keeps no buffer while its flow is small, and reserves one only once it is readable.
///
/// * Reads of [`INITIAL`] size go to the stack and leave as a copy of what arrived: an idle
///   connection, the common case, then holds no read buffer at all, and each read allocates only
///   what arrived, where a retained buffer is reallocated whole whenever its last chunk is still
///   queued.
/// * Larger reads cut their chunk from the direction's buffer. Reserving it before the socket is
///   readable would, after every chunk, allocate a fresh buffer for the read that finds nothing:
///   the chunk just cut is still queued in HTTP/2 until the connection task writes it, so its
///   allocation cannot be reclaimed yet. Tokio marks a socket unreadable after a short read, so
///   that read waits here instead, and by the next one the buffer is reclaimed in place.
impl ChunkIo for tokio::net::TcpStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        size: usize,
    ) -> Poll<io::Result<Bytes>> {
        ready!(self.poll_read_ready(cx))?;
        if size <= INITIAL {
            let mut stack = [MaybeUninit::<u8>::uninit(); INITIAL];
            let mut read = ReadBuf::uninit(&mut stack[..size]);
            ready!(Pin::new(self).poll_read(cx, &mut read))?;
            return Poll::Ready(Ok(Bytes::copy_from_slice(read.filled())));
        }
        buf.reserve(size);
        if ready!(tokio_util::io::poll_read_buf(Pin::new(self), cx, buf))? == 0 {
            return Poll::Ready(Ok(Bytes::new()));
        }
        Poll::Ready(Ok(buf.split().freeze()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ChunkIo for tokio_rustls::client::TlsStream<S> {}

impl<S: AsyncRead + AsyncWrite + Unpin> ChunkIo for tokio_rustls::server::TlsStream<S> {}

impl<T: ChunkIo + ?Sized> ChunkIo for Box<T> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        size: usize,
    ) -> Poll<io::Result<Bytes>> {
        (**self).poll_read_chunk(cx, buf, size)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        (**self).poll_write_chunk(cx, chunk)
    }

    fn abort(&mut self) {
        (**self).abort();
    }
}

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// From the first stream to the second (the request direction, by convention).
    pub a_to_b: u64,
    /// From the second stream to the first.
    pub b_to_a: u64,
}

/// A copy that failed, with what it had moved until then (metrics count partial flows too).
#[derive(Debug, thiserror::Error)]
#[error("{source} (after {} bytes sent and {} received)", copied.a_to_b, copied.b_to_a)]
pub struct CopyError {
    /// The I/O error.
    #[source]
    pub source: io::Error,
    /// Bytes moved before the failure.
    pub copied: Copied,
}

/// Copies `a → b` and `b → a` until both directions have reached EOF. When either fails, both
/// streams are aborted ([`ChunkIo::abort`]).
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> Result<Copied, CopyError>
where
    A: ChunkIo + ?Sized,
    B: ChunkIo + ?Sized,
{
    let mut ab = Direction::default();
    let mut ba = Direction::default();
    let result = poll_fn(|cx| {
        let ab_state = ab.poll_copy(cx, &mut *a, &mut *b)?;
        let ba_state = ba.poll_copy(cx, &mut *b, &mut *a)?;
        if ab_state.is_ready() && ba_state.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    let copied = Copied {
        a_to_b: ab.total,
        b_to_a: ba.total,
    };
    if result.is_err() {
        a.abort();
        b.abort();
    }
    result
        .map(|()| copied)
        .map_err(|source| CopyError { source, copied })
}

#[derive(Default)]
struct Direction {
    /// What socket reads fill once they outgrow [`INITIAL`]; a small flow, or a direction whose
    /// reader owns its chunks (a tunnel), never has one.
    buf: BytesMut,
    /// Read and not yet written.
    pending: Bytes,
    total: u64,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl Direction {
    /// The next read's size, grown once the flow has moved enough bytes.
    fn read_size(&self) -> usize {
        if self.total >= LARGE_AFTER {
            LARGE
        } else if self.total >= MEDIUM_AFTER {
            MEDIUM
        } else {
            INITIAL
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: ChunkIo + ?Sized,
        W: ChunkIo + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..BUDGET {
            if self.pending.is_empty() && !self.read_done {
                let size = self.read_size();
                match reader.poll_read_chunk(cx, &mut self.buf, size) {
                    Poll::Pending => {
                        // Nothing more to read for now: push out what we wrote.
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(chunk)) if chunk.is_empty() => self.read_done = true,
                    Poll::Ready(Ok(chunk)) => self.pending = chunk,
                }
            }
            while !self.pending.is_empty() {
                let before = self.pending.len();
                ready!(writer.poll_write_chunk(cx, &mut self.pending))?;
                self.total += (before - self.pending.len()) as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    impl ChunkIo for DuplexStream {}

    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (mut client, mut proxy_a) = duplex(64);
        let (mut proxy_b, mut server) = duplex(64);
        let proxy =
            tokio::spawn(async move { copy_bidirectional(&mut proxy_a, &mut proxy_b).await });

        let request = vec![7u8; 300 * 1024];
        let req = request.clone();
        let client_task = tokio::spawn(async move {
            client.write_all(&req).await.unwrap();
            client.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, request,
            "server sees all bytes, then EOF from the half-close"
        );
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();

        assert_eq!(client_task.await.unwrap(), b"bye");
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(
            copied,
            Copied {
                a_to_b: request.len() as u64,
                b_to_a: 3
            }
        );
    }

    #[test]
    fn reads_grow_with_the_flow() {
        let mut d = Direction::default();
        assert_eq!(d.read_size(), INITIAL);
        d.total = MEDIUM_AFTER;
        assert_eq!(d.read_size(), MEDIUM);
        d.total = LARGE_AFTER;
        assert_eq!(d.read_size(), LARGE);
    }

    /// A small flow's socket reads leave nothing allocated behind: an idle connection holds no
    /// read buffer.
    #[tokio::test]
    async fn small_socket_reads_keep_no_buffer() {
        let (mut writer, mut reader) = tcp_pair().await;
        let mut d = Direction::default();
        writer.write_all(&[1; 100]).await.unwrap();
        let chunk = read_chunk(&mut reader, &mut d.buf, INITIAL).await;
        assert_eq!(&chunk[..], &[1; 100][..]);
        assert_eq!(d.buf.capacity(), 0, "the read kept a buffer");
        writer.shutdown().await.unwrap();
        let eof = read_chunk(&mut reader, &mut d.buf, INITIAL).await;
        assert!(eof.is_empty(), "EOF is an empty chunk");
    }

    async fn read_chunk(reader: &mut impl ChunkIo, buf: &mut BytesMut, size: usize) -> Bytes {
        poll_fn(|cx| reader.poll_read_chunk(cx, buf, size))
            .await
            .unwrap()
    }

    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let writer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        (writer, reader)
    }

    /// The read that follows a chunk finds the socket empty while the chunk is still queued
    /// (in HTTP/2, before the connection task writes it): it must not allocate a new buffer for
    /// nothing, so the next read that has data reclaims the first allocation.
    #[tokio::test]
    async fn a_socket_read_that_finds_nothing_allocates_nothing() {
        let (mut writer, mut reader) = tcp_pair().await;
        let mut d = Direction::default();
        writer.write_all(&[1; 100]).await.unwrap();
        let queued = read_chunk(&mut reader, &mut d.buf, MEDIUM).await;
        assert_eq!(queued.len(), 100);
        let first = queued.as_ptr();
        let pending = poll_fn(|cx| Poll::Ready(reader.poll_read_chunk(cx, &mut d.buf, MEDIUM)));
        assert!(pending.await.is_pending(), "nothing was sent yet");
        drop(queued);
        writer.write_all(&[2; 100]).await.unwrap();
        let chunk = read_chunk(&mut reader, &mut d.buf, MEDIUM).await;
        assert_eq!(&chunk[..], &[2; 100][..]);
        assert_eq!(
            chunk.as_ptr(),
            first,
            "the empty read took a new buffer while the queued chunk held the first"
        );
    }

    /// The provided reads (TLS streams) reclaim their buffer too, once its chunks are gone.
    #[tokio::test]
    async fn stream_reads_reuse_one_allocation_once_chunks_are_written() {
        let (mut writer, mut reader) = duplex(4096);
        let mut d = Direction::default();
        writer.write_all(&[1; 100]).await.unwrap();
        let chunk = read_chunk(&mut reader, &mut d.buf, INITIAL).await;
        assert_eq!(chunk.len(), 100);
        let first = chunk.as_ptr();
        drop(chunk);
        writer.write_all(&[2; 100]).await.unwrap();
        let chunk = read_chunk(&mut reader, &mut d.buf, INITIAL).await;
        assert_eq!(&chunk[..], &[2; 100][..]);
        assert_eq!(
            chunk.as_ptr(),
            first,
            "the buffer was reclaimed, not reallocated"
        );
    }
}
