//! A service that prefers near endpoints, end to end on loopback: three ztunnels, one per node,
//! two nodes in one zone and one in another. The client's connections to the service VIP all
//! reach the endpoint in its zone; when that endpoint stops being ready they fail over to the
//! other zone; and under `internalTrafficPolicy: Local`, with no endpoint on the client's node,
//! they are refused.

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

/// `{cart}` is the Service's extra spec; `{ready}` cart-b's readiness.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-a}}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-a}}
---
apiVersion: v1
kind: Node
metadata: {name: node-c, labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-b}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 127.91.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-b, namespace: shop, labels: {app: cart}}
spec: {nodeName: node-b, serviceAccountName: cart}
status: {podIP: 127.91.2.1, conditions: [{type: Ready, status: "{ready}"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-c, namespace: shop, labels: {app: cart}}
spec: {nodeName: node-c, serviceAccountName: cart}
status: {podIP: 127.91.3.1}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.91.1, selector: {app: cart}, ports: [{port: 80, targetPort: 8080}], {cart}}
"#;

fn mesh(cart: &str, ready: bool) -> String {
    MESH.replace("{cart}", cart)
        .replace("{ready}", if ready { "True" } else { "False" })
}

/// An application on `ip:8080` that answers each connection with its name.
async fn answer_with_name(ip: &str, name: &'static str) {
    let app = TcpListener::bind(format!("{ip}:8080"))
        .await
        .expect("bind app");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            let _ = s.write_all(name.as_bytes()).await;
        }
    });
}

/// Who answers a connection from the client to the cart VIP (through the client's SOCKS5
/// port), or the SOCKS5 reply code when it is refused.
async fn call_cart() -> Result<String, u8> {
    let client = "127.91.1.1".parse().expect("ip");
    let vip: SocketAddr = "10.96.91.1:80".parse().expect("addr");
    let (code, mut stream) = socks::connect(client, vip).await;
    if code != 0 {
        return Err(code);
    }
    let mut name = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut name))
        .await
        .expect("answered in time")
        .expect("read");
    Ok(name)
}

/// Who answers 24 calls, deduplicated (two endpoints chosen at random both answer, but for
/// a chance of 2 in 2^24).
async fn answers() -> Vec<Result<String, u8>> {
    let mut seen = Vec::new();
    for _ in 0..24 {
        let answer = call_cart().await;
        if !seen.contains(&answer) {
            seen.push(answer);
        }
    }
    seen.sort();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_endpoints_first_then_failover_and_strict_local() {
    let nodes = Nodes::new(&mesh("trafficDistribution: PreferClose", true));
    let _a = nodes.start("node-a", Arc::new(Loopback)).await;
    let _b = nodes.start("node-b", Arc::new(Loopback)).await;
    let _c = nodes.start("node-c", Arc::new(Loopback)).await;
    answer_with_name("127.91.2.1", "cart-b").await;
    answer_with_name("127.91.3.1", "cart-c").await;

    assert_eq!(
        answers().await,
        [Ok("cart-b".to_owned())],
        "every call stays in the client's zone"
    );

    nodes
        .reconfigure(&mesh("trafficDistribution: PreferClose", false))
        .await;
    assert_eq!(
        answers().await,
        [Ok("cart-c".to_owned())],
        "with no ready endpoint in its zone, the client fails over to the other"
    );

    nodes
        .reconfigure(&mesh("trafficDistribution: Bogus", true))
        .await;
    assert_eq!(
        answers().await,
        [Ok("cart-b".to_owned()), Ok("cart-c".to_owned())],
        "an unknown distribution spreads over every endpoint"
    );

    nodes
        .reconfigure(&mesh("internalTrafficPolicy: Local", true))
        .await;
    let refused = answers().await;
    assert!(
        matches!(refused[..], [Err(code)] if code != 0),
        "Local with no endpoint on the client's node refuses: {refused:?}"
    );
}
