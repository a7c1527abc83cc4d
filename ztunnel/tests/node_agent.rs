//! Following the node agent across its reconnects, as istio-cni drives ztunnel: on every
//! connection the agent replays the pods it still has, adding them again (their proxies carry on
//! undisturbed) or keeping them, and a pod it does not replay is no longer served; a pod
//! recreated under the same name in a new network namespace is served there, and deleting the
//! pod it replaced, even after a replay that named both, leaves it served there. A pod the
//! configuration does not name yet is served at once, its connections waiting for the
//! configuration, and refused if it does not name the pod in time; served again once named
//! with another identity, and no longer once named on another node, its waiting connections
//! refused then, as they are when the pod is removed.
//!
//! Needs root (CI runs as root); without it the test fails and says so.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
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
#[path = "support/poll.rs"]
mod poll;
use fabric::{Mesh, Ns, assert_root, start_node};
use poll::poll;

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

const A: &str = "Kubernetes//Pod/app/a";
const B: &str = "Kubernetes//Pod/app/b";
const C: &str = "Kubernetes//Pod/app/c";

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

    // A pod the configuration does not name yet is served at once, as upstream serves it,
    // under the identity the agent gave it.
    let app = c
        .run_in(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 7777)))
        .expect("enter the namespace")
        .expect("bind the application");
    std::thread::spawn(move || {
        for mut s in app.incoming().flatten() {
            let mut buf = [0u8; 5];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(&buf);
            }
        }
    });
    agent.add("uid-d", info("d"), &c).await.expect("pod d");
    assert!(listening_in(&c), "pod d served before it is named");
    assert_eq!((proxies().0, proxies().1), (3, 0), "active, pending");
    let d_listener = listener_inode(&c);
    // `/config_dump` shows it as upstream's does, named as the agent named it, beside those up.
    let state = ztunnel.workload_state().await;
    let dump = state.dump();
    let d = &dump["Kubernetes//Pod/app/d"];
    assert_eq!(d["state"], "Up", "{d}");
    assert_eq!(d["info"]["name"], "d", "{d}");
    assert_eq!(d["connections"]["outbound"], serde_json::json!([]), "{d}");
    assert_eq!(dump[A]["state"], "Up");
    assert_eq!(dump[A]["info"]["serviceAccount"], "default", "{}", dump[A]);
    assert_eq!(dump[A]["connections"]["inbound"], serde_json::json!([]));
    assert_eq!(dump.len(), 3, "{dump:?}");

    // Its connections wait for the configuration to name it; those of a pod it never names
    // (pod e) are refused once the wait is over.
    agent.add("uid-e", info("e"), &b).await.expect("pod e");
    assert!(listening_in(&b), "pod e served before it is named");
    let app_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7777);
    let e_started = Instant::now();
    let from_e = waiting(&ns_b, app_addr, "pod e's").await;
    let from_d = waiting(&ns_c, app_addr, "pod d's").await;
    std::fs::write(
        dir.join("mesh.yaml"),
        format!(
            "{MESH}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: d, namespace: app}}\n\
             spec: {{nodeName: node-a}}\nstatus: {{podIP: 198.19.8.4}}\n"
        ),
    )
    .expect("write");
    mesh.store.reload(&mut config).expect("reload");
    let (code, mut s) = from_d.await.expect("join").expect("a SOCKS5 reply");
    assert_eq!(
        code, 0,
        "pod d's connection carried once the configuration names it"
    );
    s.write_all(b"hello").expect("write");
    let mut echoed = [0u8; 5];
    s.read_exact(&mut echoed).expect("the application's answer");
    assert_eq!(&echoed, b"hello");
    assert_eq!(
        listener_inode(&c),
        d_listener,
        "pod d's proxy carries on once named"
    );
    assert_eq!((proxies().0, proxies().1), (4, 0), "active, pending");
    let refused = from_e.await.expect("join");
    assert!(
        refused.is_none(),
        "pod e's connection closed without a reply"
    );
    let waited = e_started.elapsed();
    assert!(
        waited > Duration::from_secs(4) && waited < Duration::from_secs(10),
        "refused when the 5 s wait is over, not before and not never: {waited:?}"
    );
    assert!(listening_in(&b), "pod e still served");

    // The configuration names pod e on another node, and gives pod d another service account:
    // pod e is no longer served here (pending, as upstream counts a pod it cannot serve), a
    // connection of its still waiting is refused then rather than carried as that workload,
    // and pod d's proxy starts again under its new identity.
    let from_e = waiting(&ns_b, app_addr, "pod e's, again,").await;
    let renamed = Instant::now();
    std::fs::write(
        dir.join("mesh.yaml"),
        format!(
            "{MESH}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: d, namespace: app}}\n\
             spec: {{nodeName: node-a, serviceAccountName: reviews}}\n\
             status: {{podIP: 198.19.8.4}}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: e, namespace: app}}\n\
             spec: {{nodeName: node-b}}\nstatus: {{podIP: 198.19.8.5}}\n"
        ),
    )
    .expect("write");
    mesh.store.reload(&mut config).expect("reload");
    let refused = from_e.await.expect("join");
    assert!(
        refused.is_none(),
        "pod e's waiting connection closed without a reply"
    );
    assert!(
        renamed.elapsed() < Duration::from_secs(3),
        "refused once named elsewhere, not when the wait is over: {:?}",
        renamed.elapsed()
    );
    eventually(|| !listening_in(&b), "pod e's listeners closed").await;
    eventually(
        || listener_inode(&c) != d_listener,
        "pod d's proxy started again",
    )
    .await;
    assert_eq!((proxies().0, proxies().1), (3, 1), "active, pending");
    let dump = ztunnel.workload_state().await.dump();
    let e = &dump["Kubernetes//Pod/app/e"];
    assert_eq!(e["state"], "Pending", "{e}");
    let d = &dump["Kubernetes//Pod/app/d"];
    assert_eq!(d["info"]["serviceAccount"], "reviews", "{d}");

    // A pod removed while a connection of its waits for the configuration: the connection is
    // refused as its proxy stops, not when the wait is over.
    let ns_f = Ns::new(format!("zt-agent-f-{tag}"));
    let f = ns_f.open();
    agent.add("uid-f", info("f"), &f).await.expect("pod f");
    assert!(listening_in(&f), "pod f served before it is named");
    let from_f = waiting(&ns_f, app_addr, "pod f's").await;
    let removed = Instant::now();
    agent.del("uid-f").await.expect("pod f removed");
    let refused = from_f.await.expect("join");
    assert!(
        refused.is_none(),
        "pod f's waiting connection closed without a reply"
    );
    assert!(
        removed.elapsed() < Duration::from_secs(3),
        "refused as the proxy stops, not when the wait is over: {:?}",
        removed.elapsed()
    );

    let _ = std::fs::remove_dir_all(&dir);
}

/// A SOCKS5 CONNECT from inside `ns` through its pod's SOCKS5 port to `dst`, shown to wait:
/// sent, and still unanswered a moment later. The task ends with the reply code and the
/// stream, or none when ztunnel closes the connection without replying.
async fn waiting(
    ns: &Ns,
    dst: SocketAddrV4,
    whose: &str,
) -> tokio::task::JoinHandle<Option<(u8, TcpStream)>> {
    let netns = ns.open();
    let (asked, asking) = std::sync::mpsc::channel();
    let task = tokio::task::spawn_blocking(move || socks_from(&netns, dst, &asked));
    tokio::task::spawn_blocking(move || asking.recv_timeout(Duration::from_secs(10)))
        .await
        .expect("join")
        .expect("the SOCKS5 request sent");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "{whose} connection waits");
    task
}

/// A SOCKS5 CONNECT from inside `netns` through its pod's SOCKS5 port to `dst`, said on `asked`
/// once sent: the reply code and the stream, or none when ztunnel closed the connection
/// without replying.
fn socks_from(
    netns: &NetNs,
    dst: SocketAddrV4,
    asked: &std::sync::mpsc::Sender<()>,
) -> Option<(u8, TcpStream)> {
    netns
        .run_in(|| {
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, 15080)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
            let mut request = vec![5, 1, 0, 5, 1, 0, 1];
            request.extend_from_slice(&dst.ip().octets());
            request.extend_from_slice(&dst.port().to_be_bytes());
            s.write_all(&request).ok()?;
            let _ = asked.send(());
            let mut reply = [0u8; 12];
            s.read_exact(&mut reply).ok()?;
            Some((reply[3], s))
        })
        .expect("enter the namespace")
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

/// Waits for `check`, which a draining proxy satisfies once its listeners close.
async fn eventually(check: impl Fn() -> bool, what: &str) {
    assert!(poll(check, |held| *held).await, "{what}: not in time");
}
