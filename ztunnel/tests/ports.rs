//! ztunnel's ports on a workload, end to end on loopback: a tunnel may never target them, but
//! a ztunnel that serves no SOCKS5 port (`--socks5 false`, upstream's default) leaves 15080 to
//! the application, and a tunnel reaches it there.

use std::sync::Arc;
use std::time::Duration;

use hbone::{Authority, ConnectHeaders, ConnectRequest, Identity, Pool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use ztunnel::socket::Loopback;

#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/scratch.rs"]
mod scratch;
use nodes::Nodes;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: cart}
status: {podIP: 127.95.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: till, namespace: shop}
spec: {nodeName: node-c, serviceAccountName: till}
status: {podIP: 127.95.3.1}
"#;

/// What a tunnel from `shop/client` to `port` of the pod at `127.95.{pod}.1`, whose service
/// account is `sa`, reads: the answer, or the error.
async fn call(nodes: &Nodes, (pod, sa): (u8, &str), port: u16) -> Result<String, hbone::Error> {
    let id = |sa| Identity::new("cluster.local", "shop", sa).expect("identity");
    let pool = Pool::new(nodes.certs.clone(), hbone::Config::default());
    let mut tunnel = pool
        .connect(ConnectRequest {
            src: id("client"),
            dst_identities: vec![id(sa)],
            next_hop: ([127, 95, pod, 1], 15008).into(),
            authority: Authority::Addr(([127, 95, pod, 1], port).into()),
            headers: ConnectHeaders::default(),
        })
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_15080_is_the_applications_without_socks5() {
    let (cart, till) = ((2, "cart"), (3, "till"));
    let mut nodes = Nodes::new(MESH);
    let _b = nodes.start("node-b", Arc::new(Loopback)).await;
    nodes.socks5 = false;
    let _c = nodes.start("node-c", Arc::new(Loopback)).await;

    let refused = call(&nodes, cart, 15080)
        .await
        .expect_err("ztunnel's own port");
    assert_eq!(
        refused.status(),
        Some(http::StatusCode::SERVICE_UNAVAILABLE)
    );

    let app = TcpListener::bind("127.95.3.1:15080")
        .await
        .expect("the port is free for the application");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            let _ = s.write_all(b"the application's").await;
        }
    });
    assert_eq!(
        call(&nodes, till, 15080).await.expect("tunnel"),
        "the application's"
    );
    for port in [15001, 15006, 15008, 15053] {
        let refused = call(&nodes, till, port)
            .await
            .expect_err("ztunnel's own port");
        assert_eq!(
            refused.status(),
            Some(http::StatusCode::SERVICE_UNAVAILABLE),
            "{port}"
        );
    }
}
