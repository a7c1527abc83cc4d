//! Unix `SOCK_SEQPACKET` sockets on tokio, carrying one message (and maybe a netns fd) per packet.
//!
//! SEQPACKET keeps message boundaries, so ZDS needs no framing: one `sendmsg` is one protobuf
//! message, and the fd attached to it arrives with exactly that message.
//!
//! tokio has no SEQPACKET type, and `AsyncFd`'s constructors are now `unsafe` (forbidden here) or
//! deprecated. So the socket is registered as a [`UnixDatagram`], the closest tokio type (message
//! oriented, no stream buffering), and used only for readiness and ownership of the fd: every
//! syscall on it is ours (`sendmsg`/`recvmsg`/`accept`), inside `async_io`.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

use crate::inpod::NetNs;
use crate::inpod::netns::ensure_netns;

/// Largest message accepted. ZDS messages are a pod UID and three names, far below this.
pub(super) const MAX_MESSAGE: usize = 1024;
/// Room for this many fds per message: as many as Linux passes in one (`SCM_MAX_FD`). ZDS sends
/// at most one, but a peer sending more must not truncate the control data: the fds that did
/// arrive could then not be listed, and each such message would leak them until ztunnel runs out.
/// With room for all, the extra ones are received and closed.
pub(super) const MAX_FDS: usize = 253;

/// One received packet.
#[derive(Debug)]
pub(super) struct Received {
    /// The message, at most [`MAX_MESSAGE`] bytes.
    pub(super) bytes: Vec<u8>,
    /// Each fd that came with it, adopted as a network namespace (or why it could not be).
    pub(super) fds: Vec<io::Result<NetNs>>,
    /// The message or its fds did not fit and were cut; the message must be rejected.
    pub(super) truncated: bool,
}

/// A connected SEQPACKET socket registered with tokio.
#[derive(Debug)]
pub(super) struct SeqPacket {
    socket: UnixDatagram,
}

impl SeqPacket {
    /// Connects to a listening socket at `path`.
    pub(super) async fn connect(path: &Path) -> io::Result<Self> {
        let addr = SockAddr::unix(path)?;
        // A unix connect completes at once or fails with EAGAIN when the listener's backlog is
        // full; a blocking connect off the runtime is simpler than polling for that.
        let socket = tokio::task::spawn_blocking(move || -> io::Result<Socket> {
            let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
            socket.connect(&addr)?;
            Ok(socket)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Self {
            socket: register(socket)?,
        })
    }

    /// Sends one message, with `fd` attached as `SCM_RIGHTS` if given.
    pub(super) async fn send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() {
            &[]
        } else {
            &[ControlMessage::ScmRights(&fds)]
        };
        let sent = self
            .socket
            .async_io(Interest::WRITABLE, || {
                sendmsg::<UnixAddr>(
                    self.socket.as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    cmsgs,
                    // A peer that went away is an error to report, not a SIGPIPE.
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            })
            .await?;
        if sent != bytes.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "sent {sent} of {} bytes of a SEQPACKET message",
                    bytes.len()
                ),
            ));
        }
        Ok(())
    }

    /// Receives one message; `None` when the peer closed the connection.
    pub(super) async fn recv(&self) -> io::Result<Option<Received>> {
        self.socket
            .async_io(Interest::READABLE, || recv_once(self.socket.as_raw_fd()))
            .await
    }
}

/// Makes a socket nonblocking and registers it with the runtime (see the module docs).
fn register(socket: Socket) -> io::Result<UnixDatagram> {
    socket.set_nonblocking(true)?;
    UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(OwnedFd::from(
        socket,
    )))
}

fn recv_once(fd: RawFd) -> io::Result<Option<Received>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    // CLOEXEC: an fd that is about to be reopened and closed must not leak into a child spawned
    // by another thread in between.
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let len = msg.bytes;
    let mut truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let mut raw_fds = Vec::new();
    match msg.cmsgs() {
        Ok(cmsgs) => {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    raw_fds.extend(fds);
                }
            }
        }
        // MSG_CTRUNC, which the room for `SCM_MAX_FD` fds rules out for SCM_RIGHTS.
        Err(_) => truncated = true,
    }
    if len == 0 && raw_fds.is_empty() && !truncated {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some(Received {
        bytes: buf,
        fds: raw_fds.into_iter().map(adopt_netns).collect(),
        truncated,
    }))
}

/// Takes ownership of a received fd, as a [`NetNs`] if it is one; closes it either way.
///
/// The received fd is a bare integer, and turning that into an `OwnedFd` needs `unsafe`, which
/// the workspace forbids. Instead the namespace is reopened through `/proc/self/fd/N` (the same
/// thing `nsenter --net=/proc/self/fd/N` does), giving a new, owned fd on the same namespace, and
/// the received one is closed. The type is checked before opening (see [`ensure_netns`]).
fn adopt_netns(raw: RawFd) -> io::Result<NetNs> {
    let path = PathBuf::from(format!("/proc/self/fd/{raw}"));
    let adopted = ensure_netns(&path).and_then(|()| NetNs::from_fd(File::open(&path)?.into()));
    // `close` takes the integer, so this is safe; nothing else in the process knows this fd.
    if let Err(errno) = nix::unistd::close(raw) {
        tracing::warn!(fd = raw, %errno, "closing a received file descriptor failed");
    }
    adopted
}

/// A listening SEQPACKET socket registered with tokio.
#[derive(Debug)]
pub(super) struct SeqPacketListener {
    socket: UnixDatagram,
}

impl SeqPacketListener {
    /// Listens at `path`, replacing a stale socket file left by a previous process.
    pub(super) fn bind(path: &Path) -> io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
        socket.bind(&SockAddr::unix(path)?)?;
        socket.listen(16)?;
        Ok(Self {
            socket: register(socket)?,
        })
    }

    /// Accepts the next connection.
    pub(super) async fn accept(&self) -> io::Result<SeqPacket> {
        let (socket, _) = self
            .socket
            .async_io(Interest::READABLE, || SockRef::from(&self.socket).accept())
            .await?;
        Ok(SeqPacket {
            socket: register(socket)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, IntoRawFd};

    use super::*;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("list fds")
            .count()
    }

    #[test]
    fn adopting_closes_the_received_fd() {
        let ns = NetNs::current().expect("netns");
        let before = open_fds();
        // Stand in for received fds: duplicates whose numbers we give away. A leak of one fd per
        // adoption shows as hundreds more open fds; other tests running alongside add a few.
        for _ in 0..500 {
            let dup = nix::unistd::dup(ns.as_fd()).expect("dup");
            let adopted = adopt_netns(dup.into_raw_fd()).expect("adopt");
            assert_eq!(adopted, ns);
        }
        let after = open_fds();
        assert!(
            after < before + 100,
            "fds leaked: {before} before, {after} after"
        );
    }

    #[test]
    fn adopting_a_non_namespace_fails() {
        let raw = File::open("/proc/self/status").expect("open").into_raw_fd();
        let err = adopt_netns(raw).expect_err("not a netns");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains("not a namespace"), "{err}");
    }
}
