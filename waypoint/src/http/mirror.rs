//! Request mirroring: a fire-and-forget copy of the request to another service, as Envoy's
//! shadowing does (the `Host` gets a `-shadow` suffix; the response is read and dropped).
//!
//! The copy streams alongside the original: body chunks are handed over as they pass
//! `request_body_filter`. A mirror that falls behind is abandoned rather than buffering the
//! original request or slowing it down.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hbone::{Authority, ConnectRequest, HBONE_PORT};
use mesh::route::Backend;
use pingora_http::RequestHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::state::{Shared, View};
use crate::tunnel::Tunnel;

/// Chunks queued for one mirror before it is abandoned.
const QUEUE: usize = 32;
/// How long a mirror may take in all.
const DEADLINE: Duration = Duration::from_secs(10);

/// Feeds the body of the original request to its mirror.
#[derive(Debug)]
pub(super) struct Sender(Option<mpsc::Sender<Bytes>>);

impl Sender {
    /// Passes a body chunk on; `end` closes the mirror's body.
    pub(super) fn body(&mut self, chunk: Option<&Bytes>, end: bool) {
        let Some(tx) = &self.0 else { return };
        if let Some(chunk) = chunk.filter(|c| !c.is_empty())
            && tx.try_send(chunk.clone()).is_err()
        {
            tracing::debug!("mirror fell behind; abandoning it");
            self.0 = None;
        }
        if end {
            // An empty chunk marks the end; a channel closed without it means "abandon".
            if let Some(tx) = self.0.take() {
                let _ = tx.try_send(Bytes::new());
            }
        }
    }
}

/// Starts mirroring the request `tunnel` carries to `backend`; `None` if it cannot be resolved.
pub(super) fn start(
    shared: Arc<Shared>,
    view: &View,
    backend: &Backend,
    request_port: u16,
    req: &RequestHeader,
    tunnel: &Tunnel,
) -> Option<Sender> {
    let snapshot = &view.snapshot;
    let (id, service) = snapshot.service_by_host(&backend.service)?;
    let port = backend.port.unwrap_or(request_port);
    let (port_index, _) = service.port(port)?;
    let default_policy = mesh::route::TrafficPolicy::default();
    let subset = view.subset(id, backend.subset.as_deref())?;
    let chosen = view.balancer.choose(
        snapshot,
        id,
        port_index,
        subset,
        &default_policy,
        None,
        &[],
        Instant::now(),
    )?;
    let workload = snapshot.workload(chosen.workload);
    let ip = *workload.ips.first()?;
    let target = SocketAddr::new(ip, chosen.target_port);
    let request = ConnectRequest {
        src: shared.identity.clone(),
        dst_identities: vec![workload.identity.clone()],
        next_hop: SocketAddr::new(ip, HBONE_PORT),
        authority: Authority::Addr(target),
        headers: tunnel.onward(Some(service.hostname.to_string())),
    };
    let has_body = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req.headers.contains_key(http::header::TRANSFER_ENCODING);
    let head = head(req, has_body);
    let (tx, rx) = if has_body {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let service = service.hostname.clone();
    tokio::spawn(async move {
        let _chosen = chosen;
        let result = tokio::time::timeout(DEADLINE, send(&shared, request, head, rx)).await;
        match result {
            Ok(Ok(status)) => {
                tracing::debug!(mirror = %service, upstream = %target, status, "mirrored")
            }
            Ok(Err(error)) => {
                tracing::debug!(mirror = %service, upstream = %target, %error, "mirror failed")
            }
            Err(_) => tracing::debug!(mirror = %service, upstream = %target, "mirror timed out"),
        }
    });
    Some(Sender(tx))
}

/// The request head for the mirror, as HTTP/1.1 with the shadow host.
fn head(req: &RequestHeader, chunked: bool) -> String {
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let host = req
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(http::header::HOST)?.to_str().ok())
        .unwrap_or("");
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => (name, Some(port)),
        _ => (host, None),
    };
    let mut out = format!("{} {path} HTTP/1.1\r\nhost: {name}-shadow", req.method);
    if let Some(port) = port {
        let _ = write!(out, ":{port}");
    }
    out.push_str("\r\n");
    for (k, v) in &req.headers {
        if matches!(
            k.as_str(),
            "host" | "connection" | "content-length" | "transfer-encoding" | "keep-alive"
        ) {
            continue;
        }
        if let Ok(v) = v.to_str() {
            let _ = write!(out, "{k}: {v}\r\n");
        }
    }
    out.push_str(if chunked {
        "transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    } else {
        "content-length: 0\r\nconnection: close\r\n\r\n"
    });
    out
}

async fn send(
    shared: &Shared,
    request: ConnectRequest,
    head: String,
    body: Option<mpsc::Receiver<Bytes>>,
) -> std::io::Result<u16> {
    let mut stream = shared
        .pool
        .connect(request)
        .await
        .map_err(std::io::Error::other)?;
    stream.write_all(head.as_bytes()).await?;
    if let Some(mut body) = body {
        let mut complete = false;
        while let Some(chunk) = body.recv().await {
            if chunk.is_empty() {
                complete = true;
                break;
            }
            stream
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            stream.write_all(&chunk).await?;
            stream.write_all(b"\r\n").await?;
        }
        if !complete {
            return Err(std::io::Error::other(
                "the original request ended early or the mirror fell behind",
            ));
        }
        stream.write_all(b"0\r\n\r\n").await?;
    }
    stream.flush().await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let status = response
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(status)
}
