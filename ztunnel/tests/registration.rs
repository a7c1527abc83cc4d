//! The registration race, end to end on loopback: an inbound connection is registered for
//! re-checks before it is admitted, so a policy change published while it is still connecting
//! to its application refuses it. The caller gets 401 in place of 200, no byte reaches the
//! application, and the refusal is counted with flag `DENY` like any other.
//!
//! The application connect is held by a socket factory until the change is in, which makes the
//! interleaving certain instead of a matter of timing.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh::model::Workload;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use ztunnel::socket::{Connecting, Loopback, Owner, SocketFactory};

#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/socks.rs"]
mod socks;
use nodes::Nodes;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 127.36.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: app}
spec: {nodeName: node-b, serviceAccountName: server}
status: {podIP: 127.36.2.1}
"#;

const DENY_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: app}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/client]}}]}]
"#;

/// Loopback sockets, except that a connect to `held` waits for `release` (after saying on
/// `started` that it has begun).
#[derive(Debug)]
struct HeldConnect {
    held: SocketAddr,
    started: Arc<Notify>,
    release: Arc<Notify>,
}

impl SocketFactory for HeldConnect {
    fn listen(&self, owner: &Owner, port: u16) -> std::io::Result<TcpListener> {
        Loopback.listen(owner, port)
    }

    fn dns(
        &self,
        owner: &Owner,
        port: u16,
    ) -> std::io::Result<Vec<(tokio::net::UdpSocket, tokio::net::TcpListener)>> {
        Loopback.dns(owner, port)
    }

    fn udp_to(
        &self,
        workload: &Workload,
        dst: SocketAddr,
    ) -> std::io::Result<tokio::net::UdpSocket> {
        Loopback.udp_to(workload, dst)
    }

    fn connect(&self, workload: &Workload, dst: SocketAddr) -> Connecting {
        let connecting = Loopback.connect(workload, dst);
        if dst != self.held {
            return connecting;
        }
        let (started, release) = (self.started.clone(), self.release.clone());
        Box::pin(async move {
            started.notify_one();
            release.notified().await;
            connecting.await
        })
    }

    fn dialer(&self, owner: &Owner) -> Arc<dyn hbone::Dial> {
        Loopback.dialer(owner)
    }

    fn app_tunnel_addr(&self, local: IpAddr, port: u16) -> SocketAddr {
        Loopback.app_tunnel_addr(local, port)
    }

    fn captures(&self) -> bool {
        false
    }

    fn serves(&self, uid: &str) -> bool {
        Loopback.serves(uid)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_while_connecting_to_the_application_refuses_with_401() {
    let nodes = Nodes::new(MESH);
    let (store, live) = (&nodes.store, &nodes.live);
    let app: SocketAddr = "127.36.2.1:8080".parse().unwrap();
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let _a = nodes.start("node-a", Arc::new(Loopback)).await;
    let held = HeldConnect {
        held: app,
        started: started.clone(),
        release: release.clone(),
    };
    let _b = nodes.start("node-b", Arc::new(held)).await;
    // The application: records what it receives.
    let listener = TcpListener::bind(app).await.expect("bind the application");
    let received = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        got.len()
    });

    let from = "127.36.1.1".parse().unwrap();
    let caller = tokio::spawn(async move { socks::connect(from, app).await.0 });
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the inbound connection was admitted and connects to the application");

    // The DENY arrives while the connect is held. Re-evaluating here as well as in the
    // ztunnel's own loop makes sure it has been applied before the connect completes.
    let before = store.load().version();
    nodes.dir.write("deny.yaml", DENY_CLIENT);
    for _ in 0..500 {
        if store.load().version() > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        store.load().version() > before,
        "the policy was not applied"
    );
    live.reevaluate(&store.load());
    release.notify_one();

    assert_eq!(
        caller.await.unwrap(),
        2,
        "SOCKS5 'not allowed by ruleset': the CONNECT was answered 401, not 200"
    );
    assert_eq!(
        received.await.unwrap(),
        0,
        "no byte reached the application"
    );
    // Counted once the handler is done with it, just after it answered.
    let text = || nodes.metrics_text();
    let denied = |text: &str| {
        text.lines().any(|l| {
            l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("response_flags=\"DENY\"")
                && l.ends_with(" 1")
        })
    };
    for _ in 0..500 {
        if denied(&text()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(denied(&text()), "counted as denied:\n{}", text());
    assert_eq!(
        nodes.metrics.late_rejections.get(),
        0,
        "refused before it was established"
    );
}
