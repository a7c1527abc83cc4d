//! ZDS (`istio.workload.zds`): how istio-cni tells ztunnel which pods to serve, and hands it each
//! pod's network namespace.
//!
//! The node agent listens on a unix `SOCK_SEQPACKET` socket (`/var/run/ztunnel/ztunnel.sock` by
//! default); ztunnel connects and says [`proto::ZdsHello`]. The agent then replays every captured
//! pod (`Add` with the netns fd attached as `SCM_RIGHTS`, or `Keep` for pods ztunnel may already
//! serve), sends `SnapshotSent`, and afterwards streams `Add`/`Del` as pods come and go. ztunnel
//! answers every request with an ack (empty error = done) before the next one arrives.
//!
//! [`ZdsClient`] is ztunnel's side. [`ZdsServer`] is the agent's side, for local runs without
//! istio-cni and for tests.

mod seqpacket;

pub mod proto;

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use prost::Message;
use tracing::{debug, warn};

use self::proto::{
    AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use self::seqpacket::{MAX_FDS, MAX_MESSAGE, Received, SeqPacket, SeqPacketListener};
use super::NetNs;

/// What the node agent asks of ztunnel, decoded and with the netns adopted.
#[derive(Debug)]
pub enum WorkloadEvent {
    /// Start serving a pod: open its listeners in `netns`.
    Add {
        /// Pod UID; later `Keep`/`Del` refer to it.
        uid: String,
        /// Pod name, namespace and service account, if the agent sent them.
        info: Option<WorkloadInfo>,
        /// The pod's network namespace.
        netns: NetNs,
    },
    /// During a replay: keep serving this already known pod.
    Keep {
        /// Pod UID.
        uid: String,
    },
    /// Stop serving a pod.
    Del {
        /// Pod UID.
        uid: String,
    },
    /// The replay is complete: pods neither added nor kept since connecting are gone.
    SnapshotSent,
}

/// Why a ZDS exchange failed.
///
/// [`ZdsError::is_protocol`] separates a bad message (already rejected to the peer; the
/// connection is still usable) from a broken connection (reconnect).
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// The agent's socket could not be reached.
    #[error(
        "cannot connect to the ZDS socket {path}: {source}; is the istio-cni node agent running?"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server socket could not be created.
    #[error("cannot listen on the ZDS socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving failed; the connection is unusable.
    #[error("ZDS socket I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection while an answer was expected.
    #[error("the ZDS peer closed the connection")]
    Closed,
    /// A message was not valid protobuf for its type.
    #[error("undecodable ZDS message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A message, or its file descriptors, did not fit the receive buffers.
    #[error(
        "ZDS message larger than {MAX_MESSAGE} bytes or with more than {MAX_FDS} file descriptors"
    )]
    Oversized,
    /// A message had no payload this side knows (a newer peer, or an empty message).
    #[error("ZDS message without a known payload; is the peer newer than this ztunnel?")]
    UnknownPayload,
    /// An `AddWorkload` came without the pod's netns fd.
    #[error("AddWorkload for pod {uid} carries no network namespace file descriptor")]
    MissingNetns {
        /// Pod UID.
        uid: String,
    },
    /// An `AddWorkload`'s fd is not a usable network namespace.
    #[error("AddWorkload for pod {uid}: bad network namespace file descriptor: {source}")]
    BadNetns {
        /// Pod UID.
        uid: String,
        /// Why it was refused.
        #[source]
        source: io::Error,
    },
    /// File descriptors came with a message that takes none, or too many with an `AddWorkload`.
    #[error("ZDS message carries {count} unexpected file descriptor(s)")]
    UnexpectedFds {
        /// How many (all were closed).
        count: usize,
    },
    /// [`ZdsClient::next`] was called before the previous request was acked.
    #[error("the previous ZDS request has not been acked; call ack() first")]
    AckPending,
    /// [`ZdsClient::ack`] was called with no request outstanding.
    #[error("no ZDS request to ack")]
    NothingToAck,
    /// The hello announced a version this side does not speak.
    #[error("unsupported ZDS version {0}")]
    UnsupportedVersion(i32),
    /// ztunnel answered a request with an error.
    #[error("ztunnel rejected the request: {0}")]
    Rejected(String),
}

// === impl ZdsError ===

impl ZdsError {
    /// True if a message was bad but the connection is intact: ztunnel already sent the peer an
    /// ack carrying this error, and the caller may keep reading.
    pub fn is_protocol(&self) -> bool {
        matches!(
            self,
            Self::Decode(_)
                | Self::Oversized
                | Self::UnknownPayload
                | Self::MissingNetns { .. }
                | Self::BadNetns { .. }
                | Self::UnexpectedFds { .. }
        )
    }
}

/// ztunnel's end of a ZDS connection.
#[derive(Debug)]
pub struct ZdsClient {
    conn: SeqPacket,
    /// A request was handed out by `next` and not acked yet.
    pending: bool,
}

// === impl ZdsClient ===

impl ZdsClient {
    /// Connects to the node agent at `path` and sends the hello.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        let path = path.as_ref();
        let conn = SeqPacket::connect(path)
            .await
            .map_err(|source| ZdsError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let hello = ZdsHello {
            version: Version::V1.into(),
        };
        conn.send(&hello.encode_to_vec(), None).await?;
        debug!(path = %path.display(), "connected to the ZDS server");
        Ok(Self {
            conn,
            pending: false,
        })
    }

    /// Waits for the next request; `Ok(None)` when the agent closed the connection.
    ///
    /// Every `Ok(Some(_))` must be answered with [`ZdsClient::ack`] before calling `next` again:
    /// the agent sends nothing more until then. A malformed request (see
    /// [`ZdsError::is_protocol`]) is logged, rejected to the agent with the error, and returned;
    /// the connection stays usable.
    pub async fn next(&mut self) -> Result<Option<WorkloadEvent>, ZdsError> {
        if self.pending {
            return Err(ZdsError::AckPending);
        }
        let Some(received) = self.conn.recv().await? else {
            return Ok(None);
        };
        match decode_request(received) {
            Ok(event) => {
                debug!(?event, "ZDS request");
                self.pending = true;
                Ok(Some(event))
            }
            Err(error) => {
                warn!(%error, "rejecting a malformed ZDS request");
                self.send_ack(error.to_string()).await?;
                Err(error)
            }
        }
    }

    /// Answers the request [`ZdsClient::next`] returned: `None` for success, or why it failed
    /// (the agent logs it and, for an add, retries).
    pub async fn ack(&mut self, error: Option<String>) -> Result<(), ZdsError> {
        if !self.pending {
            return Err(ZdsError::NothingToAck);
        }
        self.pending = false;
        self.send_ack(error.unwrap_or_default()).await
    }

    async fn send_ack(&self, error: String) -> Result<(), ZdsError> {
        let ack = workload_response::Payload::Ack(proto::Ack { error });
        let response = WorkloadResponse { payload: Some(ack) };
        self.conn.send(&response.encode_to_vec(), None).await?;
        Ok(())
    }
}

/// Turns a packet into an event, adopting the netns of an add. Fds are closed on every error path
/// (dropping `NetNs` closes it).
fn decode_request(received: Received) -> Result<WorkloadEvent, ZdsError> {
    let Received {
        bytes,
        mut fds,
        truncated,
    } = received;
    if truncated {
        return Err(ZdsError::Oversized);
    }
    let payload = WorkloadRequest::decode(bytes.as_slice())?
        .payload
        .ok_or(ZdsError::UnknownPayload)?;
    let no_fds = |fds: Vec<io::Result<NetNs>>| match fds.len() {
        0 => Ok(()),
        count => Err(ZdsError::UnexpectedFds { count }),
    };
    match payload {
        workload_request::Payload::Add(AddWorkload { uid, workload_info }) => {
            if fds.len() > 1 {
                return Err(ZdsError::UnexpectedFds { count: fds.len() });
            }
            match fds.pop() {
                None => Err(ZdsError::MissingNetns { uid }),
                Some(Err(source)) => Err(ZdsError::BadNetns { uid, source }),
                Some(Ok(netns)) => Ok(WorkloadEvent::Add {
                    uid,
                    info: workload_info,
                    netns,
                }),
            }
        }
        workload_request::Payload::Keep(KeepWorkload { uid }) => {
            no_fds(fds).map(|()| WorkloadEvent::Keep { uid })
        }
        workload_request::Payload::Del(DelWorkload { uid }) => {
            no_fds(fds).map(|()| WorkloadEvent::Del { uid })
        }
        workload_request::Payload::SnapshotSent(SnapshotSent {}) => {
            no_fds(fds).map(|()| WorkloadEvent::SnapshotSent)
        }
    }
}

/// The node agent's end: listens for ztunnel. For local runs without istio-cni, and tests.
///
/// The socket file is removed when the server is dropped.
#[derive(Debug)]
pub struct ZdsServer {
    listener: SeqPacketListener,
    path: PathBuf,
}

// === impl ZdsServer ===

impl ZdsServer {
    /// Listens at `path`, replacing a stale socket file. Must be called inside a tokio runtime.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        let path = path.as_ref().to_owned();
        match SeqPacketListener::bind(&path) {
            Ok(listener) => Ok(Self { listener, path }),
            Err(source) => Err(ZdsError::Bind { path, source }),
        }
    }

    /// The socket path ztunnel should connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for a ztunnel to connect.
    pub async fn accept(&self) -> Result<ZdsConnection, ZdsError> {
        let conn = self.listener.accept().await?;
        debug!(path = %self.path.display(), "ztunnel connected to the ZDS server");
        Ok(ZdsConnection { conn })
    }
}

impl Drop for ZdsServer {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path) {
            debug!(path = %self.path.display(), %error, "could not remove the ZDS socket file");
        }
    }
}

/// The node agent's side of one ztunnel connection. Each request waits for ztunnel's ack.
#[derive(Debug)]
pub struct ZdsConnection {
    conn: SeqPacket,
}

// === impl ZdsConnection ===

impl ZdsConnection {
    /// Reads ztunnel's hello, the first message on a connection.
    pub async fn hello(&mut self) -> Result<Version, ZdsError> {
        let received = self.conn.recv().await?.ok_or(ZdsError::Closed)?;
        if received.truncated {
            return Err(ZdsError::Oversized);
        }
        let hello = ZdsHello::decode(received.bytes.as_slice())?;
        match Version::try_from(hello.version) {
            Ok(Version::V1) => Ok(Version::V1),
            _ => Err(ZdsError::UnsupportedVersion(hello.version)),
        }
    }

    /// Asks ztunnel to serve a pod, passing its network namespace.
    pub async fn add(
        &mut self,
        uid: impl Into<String>,
        info: Option<WorkloadInfo>,
        netns: &NetNs,
    ) -> Result<(), ZdsError> {
        let add = AddWorkload {
            uid: uid.into(),
            workload_info: info,
        };
        self.request(workload_request::Payload::Add(add), Some(netns))
            .await
    }

    /// Asks ztunnel to keep serving a pod it knows (during a replay).
    pub async fn keep(&mut self, uid: impl Into<String>) -> Result<(), ZdsError> {
        let keep = KeepWorkload { uid: uid.into() };
        self.request(workload_request::Payload::Keep(keep), None)
            .await
    }

    /// Asks ztunnel to stop serving a pod.
    pub async fn del(&mut self, uid: impl Into<String>) -> Result<(), ZdsError> {
        let del = DelWorkload { uid: uid.into() };
        self.request(workload_request::Payload::Del(del), None)
            .await
    }

    /// Tells ztunnel the replay of current pods is complete.
    pub async fn snapshot_sent(&mut self) -> Result<(), ZdsError> {
        self.request(
            workload_request::Payload::SnapshotSent(SnapshotSent {}),
            None,
        )
        .await
    }

    /// Waits until ztunnel closes the connection (it never sends unprompted, so anything it
    /// does send before closing is a protocol error and ends the wait too).
    pub async fn closed(&mut self) -> Result<(), ZdsError> {
        match self.conn.recv().await? {
            None => Ok(()),
            Some(_) => Err(ZdsError::UnknownPayload),
        }
    }

    async fn request(
        &mut self,
        payload: workload_request::Payload,
        netns: Option<&NetNs>,
    ) -> Result<(), ZdsError> {
        let request = WorkloadRequest {
            payload: Some(payload),
        };
        self.conn
            .send(&request.encode_to_vec(), netns.map(AsFd::as_fd))
            .await?;
        let received = self.conn.recv().await?.ok_or(ZdsError::Closed)?;
        if received.truncated {
            return Err(ZdsError::Oversized);
        }
        if !received.fds.is_empty() {
            return Err(ZdsError::UnexpectedFds {
                count: received.fds.len(),
            });
        }
        match WorkloadResponse::decode(received.bytes.as_slice())?.payload {
            Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(ack)) => Err(ZdsError::Rejected(ack.error)),
            None => Err(ZdsError::UnknownPayload),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn socket_path() -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("ztunnel-zds-unit-{}-{n}.sock", std::process::id()))
    }

    fn info() -> WorkloadInfo {
        WorkloadInfo {
            name: "web".into(),
            namespace: "default".into(),
            service_account: "web-sa".into(),
        }
    }

    /// The full exchange over a real socket, with this process's own netns as the pod's.
    #[tokio::test]
    async fn add_keep_del_snapshot() {
        let server = ZdsServer::bind(socket_path()).expect("bind");
        let path = server.path().to_owned();
        let agent = tokio::spawn(async move {
            let mut conn = server.accept().await.expect("accept");
            assert_eq!(conn.hello().await.expect("hello"), Version::V1);
            let ns = NetNs::current().expect("netns");
            conn.add("pod-1", Some(info()), &ns)
                .await
                .expect("add acked");
            conn.keep("pod-2").await.expect("keep acked");
            let err = conn.del("pod-3").await.expect_err("del rejected");
            assert!(
                matches!(&err, ZdsError::Rejected(e) if e == "unknown pod"),
                "{err}"
            );
            conn.snapshot_sent().await.expect("snapshot acked");
        });

        let mut client = ZdsClient::connect(&path).await.expect("connect");
        match client.next().await.expect("next") {
            Some(WorkloadEvent::Add {
                uid,
                info: got,
                netns,
            }) => {
                assert_eq!(uid, "pod-1");
                assert_eq!(got, Some(info()));
                assert_eq!(netns, NetNs::current().expect("netns"));
            }
            other => panic!("expected add, got {other:?}"),
        }
        assert!(matches!(client.next().await, Err(ZdsError::AckPending)));
        client.ack(None).await.expect("ack");
        assert!(matches!(
            client.ack(None).await,
            Err(ZdsError::NothingToAck)
        ));

        assert!(
            matches!(client.next().await, Ok(Some(WorkloadEvent::Keep { uid })) if uid == "pod-2")
        );
        client.ack(None).await.expect("ack");
        assert!(
            matches!(client.next().await, Ok(Some(WorkloadEvent::Del { uid })) if uid == "pod-3")
        );
        client.ack(Some("unknown pod".into())).await.expect("ack");
        assert!(matches!(
            client.next().await,
            Ok(Some(WorkloadEvent::SnapshotSent))
        ));
        client.ack(None).await.expect("ack");

        agent.await.expect("agent");
        assert!(
            client.next().await.expect("eof").is_none(),
            "agent closed the connection"
        );
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[tokio::test]
    async fn connect_error_names_the_path() {
        let path = socket_path();
        let err = ZdsClient::connect(&path).await.expect_err("nobody listens");
        assert!(matches!(err, ZdsError::Connect { .. }));
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    /// A name, the packet, and what the error must be.
    type Case = (&'static str, Received, fn(&ZdsError) -> bool);

    #[test]
    fn decode_rejections() {
        let add = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: "u".into(),
                workload_info: None,
            })),
        }
        .encode_to_vec();
        let del = WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: "u".into(),
            })),
        }
        .encode_to_vec();
        let netns = || Ok(NetNs::current().expect("netns"));
        let bad_fd = || Err(io::Error::new(io::ErrorKind::InvalidInput, "not a netns"));
        let received = |bytes: &[u8], fds: Vec<io::Result<NetNs>>, truncated| Received {
            bytes: bytes.to_vec(),
            fds,
            truncated,
        };

        let cases: Vec<Case> = vec![
            ("garbage", received(&[0xff, 0xff], vec![], false), |e| {
                matches!(e, ZdsError::Decode(_))
            }),
            ("truncated", received(&add, vec![netns()], true), |e| {
                matches!(e, ZdsError::Oversized)
            }),
            ("no payload", received(&[0x4a, 0x00], vec![], false), |e| {
                matches!(e, ZdsError::UnknownPayload)
            }),
            ("add without fd", received(&add, vec![], false), |e| {
                matches!(e, ZdsError::MissingNetns { .. })
            }),
            (
                "add with a bad fd",
                received(&add, vec![bad_fd()], false),
                |e| matches!(e, ZdsError::BadNetns { .. }),
            ),
            (
                "add with two fds",
                received(&add, vec![netns(), netns()], false),
                |e| matches!(e, ZdsError::UnexpectedFds { count: 2 }),
            ),
            (
                "del with an fd",
                received(&del, vec![netns()], false),
                |e| matches!(e, ZdsError::UnexpectedFds { count: 1 }),
            ),
        ];
        for (name, input, expected) in cases {
            let err = decode_request(input).expect_err(name);
            assert!(expected(&err), "{name}: {err:?}");
            assert!(err.is_protocol(), "{name}: {err:?}");
        }
    }
}
