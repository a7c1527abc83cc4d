//! Following the node agent across its reconnects, as istio-cni drives ztunnel: on every
//! connection the agent replays the pods it still has, adding them again or keeping them, and a
//! pod it does not replay is no longer served; a pod recreated under the same name in a new
//! network namespace is served there, and deleting the pod it replaced leaves it alone.
//!
//! Needs root (CI runs as root); without it the test fails and says so.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone::MeshCa;
use mesh::{ConfigDir, Options, Store};
use ztunnel::Ztunnel;
use ztunnel::inpod::NetNs;
use ztunnel::inpod::zds::proto::WorkloadInfo;
use ztunnel::metrics::Metrics;

#[path = "support/fabric.rs"]
mod fabric;
use fabric::{Mesh, Ns, assert_root, start_node};

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: app}
spec: {nodeName: node-a}
status: {podIP: 198.19.8.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: app}
spec: {nodeName: node-a}
status: {podIP: 198.19.8.2}
"#;

const A: &str = "Kubernetes//v1/Pod/app/a";
const B: &str = "Kubernetes//v1/Pod/app/b";

/// Whether the workload's SOCKS5 listener answers on the loopback of `netns`.
fn listening_in(netns: &NetNs) -> bool {
    let socks = SocketAddr::from((Ipv4Addr::LOCALHOST, 15080));
    netns
        .run_in(|| TcpStream::connect_timeout(&socks, Duration::from_secs(1)).is_ok())
        .expect("enter the namespace")
}

async fn served(ztunnel: &Ztunnel) -> Vec<String> {
    (ztunnel.workloads().await.iter())
        .map(ToString::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_follow_the_agent_across_reconnects_and_recreation() {
    assert_root();
    let tag = std::process::id();
    let (ns_a, ns_b, ns_a2) = (
        Ns::new(format!("zt-agent-a-{tag}")),
        Ns::new(format!("zt-agent-b-{tag}")),
        Ns::new(format!("zt-agent-a2-{tag}")),
    );
    let (a, b, a2) = (ns_a.open(), ns_b.open(), ns_a2.open());

    let dir = std::env::temp_dir().join(format!("ztunnel-agent-{tag}"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("mesh.yaml"), MESH).expect("write");
    let mut config = ConfigDir::new(&dir, Options::default());
    let mesh = Mesh {
        store: Store::open(&mut config).expect("config"),
        ca: Arc::new(MeshCa::generate("cluster.local").expect("ca")),
        metrics: Arc::new(Metrics::default()),
        dns_upstreams: Vec::new(),
    };
    let (ztunnel, server, agent) = start_node(&dir, "node-a", &mesh, &[("a", &a), ("b", &b)]).await;
    assert_eq!(served(&ztunnel).await, [A, B]);
    assert!(listening_in(&a) && listening_in(&b));

    // The agent restarts: ztunnel connects again, and the agent replays pod a only, keeping it
    // (as istio-cni does for a pod whose namespace it no longer holds).
    drop(agent);
    let mut agent = tokio::time::timeout(Duration::from_secs(10), server.accept())
        .await
        .expect("ztunnel reconnects in time")
        .expect("accept");
    agent.hello().await.expect("hello");
    agent.keep("uid-a").await.expect("pod a kept");
    assert_eq!(served(&ztunnel).await, [A, B], "nothing dropped mid-replay");
    agent.snapshot_sent().await.expect("snapshot");
    assert_eq!(served(&ztunnel).await, [A], "pod b was not replayed");
    assert!(listening_in(&a), "pod a still served in its namespace");
    eventually(|| !listening_in(&b), "pod b's listeners closed").await;

    // Pod a is recreated under its name (a StatefulSet's pod): a new uid and a new namespace,
    // announced before the old pod's deletion.
    let info = WorkloadInfo {
        name: "a".into(),
        namespace: "app".into(),
        service_account: String::new(),
    };
    agent
        .add("uid-a2", Some(info), &a2)
        .await
        .expect("the recreated pod is served");
    assert!(listening_in(&a2), "served in the new namespace");
    eventually(|| !listening_in(&a), "no longer in the old one").await;
    agent.del("uid-a").await.expect("the old pod deleted");
    assert_eq!(served(&ztunnel).await, [A], "the new pod stays served");
    assert!(listening_in(&a2));

    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits up to 5 s for `check`, which a draining proxy satisfies once its listeners close.
async fn eventually(check: impl Fn() -> bool, what: &str) {
    let until = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < until, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
