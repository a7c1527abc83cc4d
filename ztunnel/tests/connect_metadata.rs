//! A CONNECT's metadata on loopback, as upstream ztunnel speaks it: an outbound CONNECT names
//! its source workload in `baggage` and carries a fresh `traceparent`, which the access log shows;
//! an inbound 200 names the destination; and a destination that cannot find its caller by address
//! labels the caller's telemetry from the caller's baggage (its principal and namespace still
//! from the certificate), never when it can, and logs the caller's trace id.
//!
//! Only node-a runs a ztunnel. The `remote` pod's "ztunnel" is a recording HBONE server, and
//! strangers are raw mTLS + HTTP/2 clients, so each side of the wire is checked on its own.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hbone::headers::{Baggage, WorkloadType, name};
use hbone::{CertManager, ConnectHeaders, Handler, Identity, InboundRequest};
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use ztunnel::socket::Loopback;

#[path = "support/logs.rs"]
mod logs;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/poll.rs"]
mod poll;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/socks.rs"]
mod socks;
use logs::{log, trace_id};
use nodes::Nodes;
use poll::poll;

/// `client` is a Deployment's pod as the API server writes one; `server-0` a StatefulSet's.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: client-7c9d8-x2x4z
  generateName: client-7c9d8-
  namespace: app
  labels: {app: client, version: v3, pod-template-hash: 7c9d8}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: client-7c9d8, controller: true}]
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 127.38.1.1}
---
apiVersion: v1
kind: Pod
metadata:
  name: server-0
  generateName: server-
  namespace: app
  labels: {app: server}
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: server, controller: true}]
spec: {nodeName: node-a, serviceAccountName: server}
status: {podIP: 127.38.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: app}
spec: {nodeName: node-b, serviceAccountName: remote}
status: {podIP: 127.38.2.1}
"#;

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).expect("identity")
}

/// Stands in for node-b's ztunnel: reports each CONNECT's headers and accepts it.
struct Recorder(mpsc::UnboundedSender<ConnectHeaders>);

impl Handler for Recorder {
    async fn handle(&self, request: InboundRequest) {
        let _ = self.0.send(request.headers().clone());
        let _ = request.accept();
    }
}

/// A raw mTLS + HTTP/2 connection to server-0's ztunnel from `from` (any port), presenting a
/// certificate for `identity`.
async fn dial_server(
    certs: &CertManager,
    from: &str,
    identity: Identity,
) -> h2::client::SendRequest<Bytes> {
    let to: SocketAddr = "127.38.1.2:15008".parse().unwrap();
    let cert = certs.fetch(&identity).await.expect("certificate");
    let config =
        hbone::tls::client_config(cert, Arc::from([id("app", "server")])).expect("client config");
    let socket = TcpSocket::new_v4().expect("socket");
    let from: IpAddr = from.parse().expect("address");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    let tcp = socket.connect(to).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(rustls_pki_types::ServerName::IpAddress(to.ip().into()), tcp)
        .await
        .expect("mTLS");
    let (send, conn) = h2::client::handshake(tls).await.expect("HTTP/2");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// The whole body of a tunnel's response: what the application answered.
async fn answer(response: http::Response<h2::RecvStream>) -> Vec<u8> {
    let mut body = response.into_body();
    let mut answer = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        answer.extend_from_slice(&chunk);
    }
    answer
}

/// A CONNECT to `authority` with `headers`, some bytes and the end of the stream; the response
/// (whose body is the application's answer).
async fn connect_with(
    send: &h2::client::SendRequest<Bytes>,
    authority: &str,
    headers: &[(&str, &str)],
) -> http::Response<h2::RecvStream> {
    let mut request = Request::builder().method(Method::CONNECT).uri(authority);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).expect("request");
    let mut send = send.clone().ready().await.expect("ready");
    let (response, mut stream) = send.send_request(request, false).expect("send");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered in time")
        .expect("response");
    stream
        .send_data(Bytes::from_static(b"ping, please"), true)
        .expect("data");
    response
}

fn closed_inbound(nodes: &Nodes, labels: &[&str]) -> f64 {
    let text = nodes.metrics_text();
    text.lines()
        .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
        .filter(|l| l.contains("reporter=\"destination\""))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn eventually(what: &str, check: impl FnMut() -> bool) {
    assert!(
        poll(check, |held| *held).await,
        "timed out waiting for {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_metadata_names_both_ends_and_follows_one_trace() {
    let log = log();
    let nodes = Nodes::new(MESH);
    let certs = &nodes.certs;
    let _node_a = nodes.start("node-a", Arc::new(Loopback)).await;

    // The application on server-0: answers once the caller is done.
    let app = TcpListener::bind("127.38.1.2:8080").await.expect("bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = s.write_all(b"pong").await;
            });
        }
    });

    // 1. Outbound: the CONNECT names the Deployment behind the calling pod, and the trace the
    // access log shows.
    let (tx, mut seen) = mpsc::unbounded_channel();
    let remote = hbone::Server::new(
        certs
            .fetch(&id("app", "remote"))
            .await
            .expect("remote cert"),
        Recorder(tx),
        hbone::Config::default(),
    )
    .expect("recording server");
    let listener = TcpListener::bind("127.38.2.1:15008").await.expect("bind");
    let (_drain, watch) = hbone::drain::channel();
    tokio::spawn(remote.serve(listener, watch));
    let client = "127.38.1.1".parse().expect("ip");
    let server: SocketAddr = "127.38.2.1:8080".parse().expect("addr");
    let (code, tunnel) = socks::connect(client, server).await;
    assert_eq!(code, 0, "the recording server accepted the tunnel");
    let headers = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the CONNECT arrived")
        .expect("recorder alive");
    assert_eq!(
        headers.baggage,
        Some(Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("app".into()),
            workload: Some((WorkloadType::Deployment, "client".into())),
            service_name: Some("client".into()),
            service_version: Some("v3".into()),
            region: None,
            zone: None,
        }),
        "the source's baggage"
    );
    let trace = headers.traceparent.expect("a traceparent");
    drop(tunnel);
    let line = log.line(&["dst.hbone_addr=127.38.2.1:8080"]).await;
    assert_eq!(
        trace_id(&line),
        trace.trace_id().to_string(),
        "the outbound access log shows the trace it sent: {line}"
    );
    // Each end as upstream logs it: the pod's name, its namespace and cluster apart.
    for field in [
        "src.workload=client-7c9d8-x2x4z src.namespace=app",
        "src.identity=spiffe://cluster.local/ns/app/sa/client src.cluster=Kubernetes",
        "dst.workload=remote dst.namespace=app",
        "dst.identity=spiffe://cluster.local/ns/app/sa/remote dst.cluster=Kubernetes",
    ] {
        assert!(line.contains(field), "{field}: {line}");
    }

    // 2. Inbound: a caller the mesh does not know by address (127.0.0.1) is labelled from its
    // baggage, except for what its certificate proves; the 200 names the destination; the
    // access log shows the caller's trace.
    let send = dial_server(certs, "127.0.0.1", id("batch", "cron")).await;
    let claimed = "k8s.cluster.name=east,k8s.namespace.name=spoofed,k8s.cronjob.name=backup,\
                   service.name=backup,service.version=v9";
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = connect_with(
        &send,
        "127.38.1.2:8080",
        &[(name::BAGGAGE, claimed), (name::TRACEPARENT, traceparent)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let answered = response
        .headers()
        .get(name::BAGGAGE)
        .and_then(|v| v.to_str().ok())
        .map(Baggage::parse);
    assert_eq!(
        answered,
        Some(Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("app".into()),
            workload: Some((WorkloadType::Pod, "server".into())),
            service_name: Some("server".into()),
            service_version: Some("latest".into()),
            region: None,
            zone: None,
        }),
        "the destination's baggage on the 200"
    );
    assert_eq!(answer(response).await, b"pong");
    let r = &nodes;
    eventually("the stranger's connection to be counted", || {
        closed_inbound(
            r,
            &[
                "source_workload=\"backup\"",
                "source_canonical_service=\"backup\"",
                "source_canonical_revision=\"v9\"",
                "source_cluster=\"east\"",
                "source_workload_namespace=\"batch\"",
                "source_principal=\"spiffe://cluster.local/ns/batch/sa/cron\"",
                "destination_workload=\"server\"",
            ],
        ) == 1.0
    })
    .await;
    let line = log
        .line(&["src.identity=spiffe://cluster.local/ns/batch/sa/cron"])
        .await;
    assert_eq!(
        trace_id(&line),
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "the inbound access log shows the caller's trace: {line}"
    );
    // A caller no workload has the address of: only what its certificate proves. The bytes as
    // upstream's inbound log counts them: sent back to the caller (`pong`), received from it.
    for field in [
        "src.workload= src.namespace= src.identity=spiffe://cluster.local/ns/batch/sa/cron src.cluster= ",
        "dst.workload=server-0 dst.namespace=app",
        "bytes_sent=4 bytes_recv=12 ",
    ] {
        assert!(line.contains(field), "{field}: {line}");
    }

    // 3. A caller known by its address is labelled from the configuration, whatever it claims.
    let send = dial_server(certs, "127.38.1.1", id("app", "client")).await;
    let response = connect_with(&send, "127.38.1.2:8080", &[(name::BAGGAGE, claimed)]).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(answer(response).await, b"pong");
    eventually("the known caller's connection to be counted", || {
        closed_inbound(
            r,
            &[
                "source_workload=\"client\"",
                "source_canonical_revision=\"v3\"",
                "source_cluster=\"Kubernetes\"",
                "source_workload_namespace=\"app\"",
            ],
        ) == 1.0
    })
    .await;
    assert_eq!(
        closed_inbound(r, &["source_workload=\"backup\""]),
        1.0,
        "the second caller's claim was not believed"
    );
}
