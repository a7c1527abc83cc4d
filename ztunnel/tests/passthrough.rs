//! A ServiceEntry resolved `NONE` (the default), end to end on loopback: connections to its
//! address go to that address as plain TCP, as istiod's `PASSTHROUGH` tells upstream ztunnel,
//! even when the entry selects pods of the mesh; resolved `STATIC`, the same entry's pods take
//! them over HBONE.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ztunnel::socket::Loopback;

#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/socks.rs"]
mod socks;
use nodes::Nodes;

/// `{resolution}` is the ServiceEntry's.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 127.92.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: partner, namespace: shop, labels: {app: partner}}
spec: {nodeName: node-b, serviceAccountName: partner}
status: {podIP: 127.92.2.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: shop}
spec:
  hosts: [partner.example.com]
  addresses: [127.92.9.9]
  ports: [{number: 8443, name: tcp, protocol: TCP}]
  workloadSelector: {labels: {app: partner}}
  {resolution}
"#;

/// An application on `addr` that answers each connection with its name and the address the
/// connection came from.
async fn answer_with_name(addr: &str, name: &'static str) {
    let app = TcpListener::bind(addr).await.expect("bind app");
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = app.accept().await {
            let _ = s
                .write_all(format!("{name} from {}", peer.ip()).as_bytes())
                .await;
        }
    });
}

/// Who answers the client's connection to the entry's address, through its SOCKS5 port.
async fn call_partner() -> String {
    let client = "127.92.1.1".parse().expect("ip");
    let dst: SocketAddr = "127.92.9.9:8443".parse().expect("addr");
    let (code, mut stream) = socks::connect(client, dst).await;
    assert_eq!(code, 0, "SOCKS5 reply");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_none_goes_where_it_was_sent() {
    let nodes = Nodes::new(&MESH.replace("{resolution}", ""));
    let _a = nodes.start("node-a", Arc::new(Loopback)).await;
    let _b = nodes.start("node-b", Arc::new(Loopback)).await;
    answer_with_name("127.92.9.9:8443", "outside").await;
    answer_with_name("127.92.2.1:8443", "partner").await;

    // Plain TCP from the client's own address: nothing in the mesh in between.
    assert_eq!(call_partner().await, "outside from 127.92.1.1");

    nodes
        .reconfigure(&MESH.replace("{resolution}", "resolution: STATIC"))
        .await;
    // Over HBONE to the selected pod, whose ztunnel connects from the client's address.
    assert_eq!(call_partner().await, "partner from 127.92.1.1");
    let metrics = nodes.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_workload=\"partner\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "the second call went through the partner's ztunnel over mTLS:\n{metrics}"
    );
}
