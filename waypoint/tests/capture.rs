//! The waypoint behind real transparent capture: pods are network namespaces on a bridge with
//! istio-cni's iptables rules, a ztunnel per node is fed its pods over ZDS, the shipped
//! `waypoint` binary runs in its own (uncaptured) pod, and the client is a plain HTTP/1.1
//! client that knows nothing of the mesh. Its request to the service VIP is captured by its
//! ztunnel, tunnelled to the waypoint, routed and authorized there, and tunnelled again to
//! the chosen pod's ztunnel.
//!
//! Needs root (CI runs as root); without it the test fails and says so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hbone::MeshCa;
use mesh::{ConfigDir, Options, Store};
use ztunnel::inpod::NetNs;

#[path = "../../ztunnel/tests/support/fabric.rs"]
mod fabric;
mod support;

use fabric::{Child, Fabric, Mesh, assert_root, start_node, sum};

/// Pods `198.19.7.<n>`: the client (1) and `echo-v1` (2) on node-a, `echo-v2` (3) on node-b,
/// and the waypoint's instance (4), which no ztunnel captures.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: node-w, serviceAccountName: waypoint}
status: {podIP: 198.19.7.4}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 198.18.250.1, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: app}
spec: {clusterIP: 198.18.250.11, selector: {app: echo, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: app}
spec: {clusterIP: 198.18.250.12, selector: {app: echo, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 198.19.7.1}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v1, namespace: app, labels: {app: echo, version: v1}}
spec: {nodeName: node-a, serviceAccountName: echo}
status: {podIP: 198.19.7.2}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v2, namespace: app, labels: {app: echo, version: v2}}
spec: {nodeName: node-b, serviceAccountName: echo}
status: {podIP: 198.19.7.3}
"#;

/// A header-matched split between the versions, and an L7 DENY on the waypoint.
const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

/// An HTTP response: its status, its head and its body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `GET path` with `headers` to `dst` from inside `netns`, from an ordinary (unmarked)
/// socket, and reads the answer until the server closes.
fn get_in(
    netns: &NetNs,
    dst: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Answer> {
    let addr: SocketAddr = dst.parse().expect("addr");
    let mut s = netns.run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(3)))??;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: {dst}\r\nconnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("no HTTP answer: {raw:?}"),
        )
    })?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// [`get_in`] off the runtime's workers, which carry the ztunnels.
async fn get(
    netns: &Arc<NetNs>,
    dst: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
) -> std::io::Result<Answer> {
    let netns = netns.clone();
    tokio::task::spawn_blocking(move || get_in(&netns, dst, path, headers))
        .await
        .expect("join")
}

/// The echo backend of the waypoint tests, serving port 8080 inside `netns`.
fn echo_in(netns: &NetNs, pod: &'static str, seen: &Arc<Mutex<Vec<support::Seen>>>) {
    let listener = netns
        .run_in(|| std::net::TcpListener::bind("0.0.0.0:8080"))
        .expect("enter netns")
        .expect("bind echo");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    tokio::spawn(support::echo(listener, pod, seen.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_requests_are_routed_and_authorized_by_the_waypoint() {
    assert_root();
    let mut fabric = Fabric::new(std::process::id() % 10_000 + 20_000);
    let client = Arc::new(fabric.pod(1));
    let echo_v1 = fabric.pod(2);
    let echo_v2 = fabric.pod(3);
    let waypoint_pod = fabric.pod(4);
    let seen = Arc::new(Mutex::new(Vec::new()));
    echo_in(&echo_v1, "echo-v1", &seen);
    echo_in(&echo_v2, "echo-v2", &seen);

    let dir = std::env::temp_dir().join(format!("waypoint-capture-{}", std::process::id()));
    let config = dir.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(config.join("mesh.yaml"), MESH).expect("write");
    std::fs::write(config.join("routes.yaml"), ROUTES).expect("write");
    let mut watched = ConfigDir::new(&config, Options::default());
    let store = Store::open(&mut watched).expect("config");
    let _watch = store
        .watch(watched, Duration::from_millis(50))
        .expect("watch");
    let ca = Arc::new(MeshCa::generate("cluster.local").expect("ca"));
    std::fs::write(dir.join("ca.pem"), ca.root_pem()).expect("write");
    std::fs::write(dir.join("ca.key"), ca.key_pem()).expect("write");

    // The waypoint, as an operator runs it, in its own pod.
    let log = dir.join("waypoint.log");
    let path = |p: &Path| p.display().to_string();
    let waypoint_ns = fabric.pod_name(4).to_owned();
    let _waypoint = Child(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &waypoint_ns,
                env!("CARGO_BIN_EXE_waypoint"),
            ])
            .args(["--log", "info"])
            .args(["run", "--gateway", "app/waypoint"])
            .args(["--config", &path(&config)])
            .args(["--ca-cert", &path(&dir.join("ca.pem"))])
            .args(["--ca-key", &path(&dir.join("ca.key"))])
            .stdout(Stdio::from(std::fs::File::create(&log).expect("log")))
            .stderr(Stdio::from(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("log"),
            ))
            .spawn()
            .expect("waypoint run"),
    );

    // A ztunnel per node for the captured pods.
    let shared = Mesh {
        store: store.clone(),
        ca: ca.clone(),
        metrics: Arc::default(),
        dns_upstreams: Vec::new(),
    };
    let _node_a = start_node(
        &dir,
        "node-a",
        &shared,
        &[("client", &client), ("echo-v1", &echo_v1)],
    )
    .await;
    let _node_b = start_node(&dir, "node-b", &shared, &[("echo-v2", &echo_v2)]).await;

    let waypoint_pod = Arc::new(waypoint_pod);
    let mut ready = Err(std::io::Error::other("not tried"));
    for _ in 0..200 {
        ready = get(&waypoint_pod, "127.0.0.1:15021", "/healthz/ready", &[]).await;
        if ready.as_ref().is_ok_and(|a| a.status == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        ready.map(|a| a.status).ok(),
        Some(200),
        "the waypoint is ready:\n{}",
        logged()
    );

    // The default rule: every plain request reaches v1, on the client's own node.
    for _ in 0..10 {
        let answer = get(&client, "198.18.250.1:80", "/", &[])
            .await
            .expect("through the waypoint");
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("x-backend"), Some("echo-v1"), "{answer:?}");
    }
    // A header match sends the request across the nodes to v2.
    let answer = get(&client, "198.18.250.1:80", "/v2", &[("x-version", "v2")])
        .await
        .expect("through the waypoint");
    assert_eq!(answer.header("x-backend"), Some("echo-v2"), "{answer:?}");
    // What the backend saw came from the waypoint, on the caller's behalf.
    let request = (seen.lock().unwrap().iter())
        .find(|s| s.backend == "echo-v2")
        .cloned()
        .expect("v2 saw the request");
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("GET", "/v2")
    );

    // The waypoint's L7 DENY, as Istio answers it.
    let answer = get(&client, "198.18.250.1:80", "/admin/users", &[])
        .await
        .expect("an answer");
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (403, "RBAC: access denied")
    );
    assert_eq!(
        seen.lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.starts_with("/admin"))
            .count(),
        0,
        "a denied request never reaches a backend"
    );

    // Straight to the pod, around the waypoint: its ztunnel refuses the tunnel.
    let bypass = get(&client, "198.19.7.2:8080", "/admin/users", &[]).await;
    assert!(bypass.is_err(), "bypass must fail: {bypass:?}");

    // The waypoint's own account, scraped from its pod as Prometheus would.
    let caller = "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"";
    let service = "destination_service=\"echo.app.svc.cluster.local\"";
    let mut text = String::new();
    for _ in 0..100 {
        text = get(&waypoint_pod, "127.0.0.1:15020", "/stats/prometheus", &[])
            .await
            .expect("metrics")
            .body;
        let counted = |code: &str| {
            let code = format!("response_code=\"{code}\"");
            sum(&text, "istio_requests_total", &[caller, &code])
        };
        if counted("403") >= 1.0 && counted("200") >= 11.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = |code: &str| {
        let code = format!("response_code=\"{code}\"");
        sum(
            &text,
            "istio_requests_total",
            &["reporter=\"waypoint\"", caller, service, &code],
        )
    };
    assert_eq!((requests("200"), requests("403")), (11.0, 1.0), "{text}");

    // And its access log, with the caller's identity and the verdict (written just after the
    // metrics).
    let denied_line = |log: &str| {
        log.lines().any(|l| {
            l.contains("path=\"/admin/users\"")
                && l.contains("status=403")
                && l.contains("src.identity=spiffe://cluster.local/ns/app/sa/client")
        })
    };
    for _ in 0..100 {
        if denied_line(&logged()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = logged();
    assert!(
        denied_line(&log),
        "the access log shows the denied request and who sent it:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
