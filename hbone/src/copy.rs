//! Bidirectional copy between two byte streams with half-close propagation.
//!
//! Each direction starts with a 1 KiB buffer and grows it as the flow proves itself (16 KiB after
//! 128 KiB, 256 KiB after 10 MiB), like upstream ztunnel: most mesh connections are small
//! request/response exchanges that would waste a large buffer each, while bulk flows need large
//! reads to amortise syscalls and produce full 16 KiB TLS records.
//!
//! When one side reaches EOF its peer's write half is shut down (FIN, or END_STREAM on HBONE) and
//! the other direction keeps flowing until it ends too.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const INITIAL: usize = 1024;
const MEDIUM: usize = 16 * 1024;
const LARGE: usize = 256 * 1024;
const MEDIUM_AFTER: u64 = 128 * 1024;
const LARGE_AFTER: u64 = 10 * 1024 * 1024;

/// How many buffers one direction may move before yielding to the scheduler, so two always-ready
/// streams cannot monopolise a worker thread.
const BUDGET: usize = 32;

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

/// Copies `a → b` and `b → a` until both directions have reached EOF.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> Result<Copied, CopyError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Direction::new();
    let mut ba = Direction::new();
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
    result
        .map(|()| copied)
        .map_err(|source| CopyError { source, copied })
}

struct Direction {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    total: u64,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: vec![0; INITIAL].into_boxed_slice(),
            pos: 0,
            end: 0,
            total: 0,
            read_done: false,
            need_flush: false,
            done: false,
        }
    }

    /// Grows the buffer between reads, once the flow has moved enough bytes.
    fn grow(&mut self) {
        let want = if self.total >= LARGE_AFTER {
            LARGE
        } else if self.total >= MEDIUM_AFTER {
            MEDIUM
        } else {
            return;
        };
        if self.buf.len() < want {
            self.buf = vec![0; want].into_boxed_slice();
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..BUDGET {
            if self.pos == self.end && !self.read_done {
                self.grow();
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing more to read for now: push out what we wrote.
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.pos = 0;
                            self.end = n;
                        }
                    }
                }
            }
            while self.pos < self.end {
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.total += n as u64;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

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
    fn buffer_grows_with_the_flow() {
        let mut d = Direction::new();
        d.grow();
        assert_eq!(d.buf.len(), INITIAL);
        d.total = MEDIUM_AFTER;
        d.grow();
        assert_eq!(d.buf.len(), MEDIUM);
        d.total = LARGE_AFTER;
        d.grow();
        assert_eq!(d.buf.len(), LARGE);
    }
}
