//! A destination that is not who the mesh says it is, end to end on loopback: something on a
//! pod's HBONE port presents a certificate from the mesh's own CA, valid, but for another
//! service account. The caller's ztunnel refuses it during the handshake, sends nothing, and
//! counts the connection with Istio's `IDENTITY_ERROR` flag.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hbone::{CertHandle, Config, Identity, InboundRequest, Server};
use tokio::net::TcpListener;
use ztunnel::socket::Loopback;

#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/poll.rs"]
mod poll;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/socks.rs"]
mod socks;
use nodes::Nodes;
use poll::poll;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 127.94.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: cart}
status: {podIP: 127.94.2.1}
"#;

/// Counts the tunnels it is asked for, and accepts none.
struct Impostor(Arc<AtomicUsize>);

impl hbone::Handler for Impostor {
    async fn handle(&self, request: InboundRequest) {
        self.0.fetch_add(1, Ordering::SeqCst);
        request.refuse(http::StatusCode::SERVICE_UNAVAILABLE);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_with_another_identity_is_refused_and_counted() {
    let nodes = Nodes::new(MESH);
    let _a = nodes.start("node-a", Arc::new(Loopback)).await;
    // No ztunnel for node-b: an impostor holds the cart pod's HBONE port instead.
    let impostor: Identity = "spiffe://cluster.local/ns/shop/sa/impostor"
        .parse()
        .expect("identity");
    let cert = nodes.ca.issue(&impostor).expect("issue");
    let asked = Arc::new(AtomicUsize::new(0));
    let server = Server::new(
        CertHandle::fixed(cert),
        Impostor(asked.clone()),
        Config::default(),
    )
    .expect("server");
    let listener = TcpListener::bind("127.94.2.1:15008").await.expect("bind");
    let (_drain, watch) = hbone::drain::channel();
    tokio::spawn(server.serve(listener, watch));

    let cart: SocketAddr = "127.94.2.1:8080".parse().expect("addr");
    let (code, _) = socks::connect("127.94.1.1".parse().expect("ip"), cart).await;
    assert_ne!(code, 0, "the SOCKS5 request is refused");
    assert_eq!(asked.load(Ordering::SeqCst), 0, "no tunnel was asked for");

    let flagged = |t: &str| {
        t.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("reporter=\"source\"")
                && l.contains("destination_workload=\"cart\"")
                && l.contains("response_flags=\"IDENTITY_ERROR\"")
        })
    };
    let text = poll(|| nodes.metrics_text(), |t| flagged(t)).await;
    assert!(
        flagged(&text),
        "the refusal is counted as an identity error:\n{text}"
    );
}
