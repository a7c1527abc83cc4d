//! Following the node agent across its reconnects, as istio-cni drives ztunnel: on every
//! connection the agent replays the pods it still has, adding them again (their proxies carry on
//! undisturbed) or keeping them, and a pod it does not replay is no longer served; a pod
//! recreated under the same name in a new network namespace is served there, and deleting the
//! pod it replaced, even after a replay that named both, leaves it served there.
//!
//! Needs root (CI runs as root); without it the test fails and says so.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hbone::MeshCa;
use mesh::{ConfigDir, Options, Store};
use ztunnel::Ztunnel;
use ztunnel::inpod::zds::proto::WorkloadInfo;
use ztunnel::inpod::{NetNs, ZdsConnection, ZdsServer};
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
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: app}
spec: {nodeName: node-a}
status: {podIP: 198.19.8.3}
"#;

const A: &str = "Kubernetes//v1/Pod/app/a";
const B: &str = "Kubernetes//v1/Pod/app/b";
const C: &str = "Kubernetes//v1/Pod/app/c";

/// Whether the workload's SOCKS5 listener answers on the loopback of `netns`.
fn listening_in(netns: &NetNs) -> bool {
    let socks = SocketAddr::from((Ipv4Addr::LOCALHOST, 15080));
    netns
        .run_in(|| TcpStream::connect_timeout(&socks, Duration::from_secs(1)).is_ok())
        .expect("enter the namespace")
}

/// The socket inode of the SOCKS5 listener in `netns`, from the namespace's own TCP table: a
/// proxy started again has a new one.
fn listener_inode(netns: &NetNs) -> String {
    let table = netns
        .run_in(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))
        .expect("enter the namespace")
        .expect("the TCP table");
    // local_address 127.0.0.1:15080 (hex, little-endian address), state 0A (LISTEN).
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&"0100007F:3AE8") && f.get(3) == Some(&"0A"))
        .and_then(|f| f.get(9).map(|inode| inode.to_string()))
        .expect("a listener on 127.0.0.1:15080")
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
    let (ns_a, ns_b, ns_c, ns_b2) = (
        Ns::new(format!("zt-agent-a-{tag}")),
        Ns::new(format!("zt-agent-b-{tag}")),
        Ns::new(format!("zt-agent-c-{tag}")),
        Ns::new(format!("zt-agent-b2-{tag}")),
    );
    let (a, b, c, b2) = (ns_a.open(), ns_b.open(), ns_c.open(), ns_b2.open());
    let info = |name: &str| {
        Some(WorkloadInfo {
            name: name.into(),
            namespace: "app".into(),
            service_account: String::new(),
        })
    };

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
    let pods = [("a", &a), ("b", &b), ("c", &c)];
    let (ztunnel, server, agent, synced) = start_node(&dir, "node-a", &mesh, &pods).await;
    let synced = move || synced.load(Ordering::Acquire);
    assert!(synced(), "ready once the agent's snapshot is in");
    assert_eq!(served(&ztunnel).await, [A, B, C]);
    assert!(listening_in(&a) && listening_in(&b) && listening_in(&c));
    let a_listener = listener_inode(&a);
    let m = &mesh.metrics;
    let proxies = || {
        (
            m.proxies_active.get(),
            m.proxies_pending.get(),
            m.proxies_started.get(),
            m.proxies_stopped.get(),
        )
    };
    assert_eq!(proxies(), (3, 0, 3, 0), "active, pending, started, stopped");

    // The agent restarts: ztunnel connects again, and the agent replays pod a (added again) and
    // pod b (kept, as istio-cni does for a pod whose namespace it no longer holds), not pod c.
    drop(agent);
    let mut agent = reconnected(&server).await;
    assert!(
        !synced(),
        "not ready while the agent is away, nor while it replays"
    );
    agent
        .add("uid-a", info("a"), &a)
        .await
        .expect("pod a again");
    agent.keep("uid-b").await.expect("pod b kept");
    assert_eq!(
        served(&ztunnel).await,
        [A, B, C],
        "nothing dropped mid-replay"
    );
    agent.snapshot_sent().await.expect("snapshot");
    assert!(synced(), "ready again");
    assert_eq!(served(&ztunnel).await, [A, B], "pod c was not replayed");
    eventually(|| !listening_in(&c), "pod c's listeners closed").await;
    assert_eq!(listener_inode(&a), a_listener, "pod a's proxy undisturbed");
    assert!(listening_in(&b), "pod b still served");
    assert_eq!(
        proxies(),
        (2, 0, 3, 1),
        "pod c's proxy stopped, none restarted"
    );
    let refused = agent
        .keep("uid-a")
        .await
        .expect_err("keep after the snapshot");
    assert!(
        refused.to_string().contains("after the snapshot"),
        "{refused}"
    );

    // Pod b is recreated under its name (a StatefulSet's pod): a new uid and a new namespace,
    // announced before the old pod's deletion.
    agent
        .add("uid-b2", info("b"), &b2)
        .await
        .expect("recreated");
    assert!(listening_in(&b2), "served in the new namespace");
    eventually(|| !listening_in(&b), "no longer in the old one").await;

    // The agent restarts before deleting the old pod, and replays both, the old one last.
    drop(agent);
    let mut agent = reconnected(&server).await;
    agent.add("uid-a", info("a"), &a).await.expect("pod a");
    agent.add("uid-b2", info("b"), &b2).await.expect("pod b2");
    agent.add("uid-b", info("b"), &b).await.expect("old pod b");
    agent.snapshot_sent().await.expect("snapshot");
    agent.del("uid-b").await.expect("the old pod deleted");
    assert_eq!(served(&ztunnel).await, [A, B], "the new pod stays served");
    assert!(listening_in(&b2), "from its own namespace");
    eventually(|| !listening_in(&b), "not from the old one").await;

    // A pod the configuration does not name yet is accepted and pending until it does.
    agent.add("uid-d", info("d"), &c).await.expect("pod d");
    assert_eq!((proxies().0, proxies().1), (2, 1), "active, pending");
    // `/config_dump` shows it as upstream's does, named as the agent named it, beside those up.
    let state = ztunnel.workload_state().await;
    let dump = state.dump();
    let d = &dump["Kubernetes//v1/Pod/app/d"];
    assert_eq!(d["state"], "Pending", "{d}");
    assert_eq!(d["info"]["name"], "d", "{d}");
    assert!(d.get("connections").is_none(), "{d}");
    assert_eq!(dump[A]["state"], "Up");
    assert_eq!(dump[A]["info"]["serviceAccount"], "default", "{}", dump[A]);
    assert_eq!(dump[A]["connections"]["inbound"], serde_json::json!([]));
    assert_eq!(dump.len(), 3, "{dump:?}");
    std::fs::write(
        dir.join("mesh.yaml"),
        format!(
            "{MESH}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: d, namespace: app}}\n\
             spec: {{nodeName: node-a}}\nstatus: {{podIP: 198.19.8.4}}\n"
        ),
    )
    .expect("write");
    mesh.store.reload(&mut config).expect("reload");
    eventually(|| listening_in(&c), "pod d served once named").await;
    assert_eq!((proxies().0, proxies().1), (3, 0), "active, pending");

    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent's side of ztunnel's next connection, greeted.
async fn reconnected(server: &ZdsServer) -> ZdsConnection {
    let mut agent = tokio::time::timeout(Duration::from_secs(10), server.accept())
        .await
        .expect("ztunnel reconnects in time")
        .expect("accept");
    agent.hello().await.expect("hello");
    agent
}

/// Waits up to 5 s for `check`, which a draining proxy satisfies once its listeners close.
async fn eventually(check: impl Fn() -> bool, what: &str) {
    let until = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < until, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
