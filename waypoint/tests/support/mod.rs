//! A whole ambient mesh in one process for the waypoint's end-to-end tests: real ztunnels (one
//! per node) on per-workload `127.<net>.x.y` addresses, the real waypoint, echo backends that
//! report which pod answered and what it saw, and a client speaking HTTP through its
//! ztunnel's SOCKS5 port, as an application would through capture.

#![allow(dead_code, unreachable_pub)] // each test binary uses part of the harness

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hbone::{CertManager, MeshCa};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh::model::Protocol;
use mesh::{ConfigDir, Options, Store, WatchHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use waypoint::metrics::Metrics;
use waypoint::{WaypointServer, WaypointSpec};
use ztunnel::Ztunnel;
use ztunnel::proxy::Ctx;
use ztunnel::proxy::live::LiveConnections;
use ztunnel::socket::Loopback;

#[path = "../../../ztunnel/tests/support/scratch.rs"]
mod scratch;
pub(crate) use scratch::Dir;

/// The mesh on `127.<net>.0.0/16`. Namespace `app` (ambient) has:
/// * `client` (127.net.1.1, node-a);
/// * service `echo` (VIP 10.net.0.1, port 80 → http 8080, bound to the waypoint) with pods
///   `echo-v1` (127.net.1.2, node-a) and `echo-v2` (127.net.2.1, node-b), labelled
///   `version: v1|v2`;
/// * services `echo-v1` and `echo-v2` (10.net.0.11 and .12, port 80) for one version each;
/// * service `shadow` (10.net.0.2:80 → 8080) with pod `shadow-1` (127.net.2.2, node-b);
/// * service `echo-tcp` (10.net.0.3:90 → tcp 9000, bound to the waypoint) on the echo pods;
/// * the waypoint Gateway `waypoint` with its pod at 127.net.3.1.
pub fn mesh_yaml(net: u8) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: app, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: app}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: waypoint-0, namespace: app, labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}}}
spec: {{nodeName: node-w, serviceAccountName: waypoint}}
status: {{podIP: 127.{net}.3.1}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: 10.{net}.0.1, selector: {{app: echo}}, ports: [{{name: http, port: 80, targetPort: http}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-tcp, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: 10.{net}.0.3, selector: {{app: echo}}, ports: [{{name: tcp, port: 90, targetPort: 9000}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v1, namespace: app}}
spec: {{clusterIP: 10.{net}.0.11, selector: {{app: echo, version: v1}}, ports: [{{name: http, port: 80, targetPort: http}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v2, namespace: app}}
spec: {{clusterIP: 10.{net}.0.12, selector: {{app: echo, version: v2}}, ports: [{{name: http, port: 80, targetPort: http}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: shadow, namespace: app}}
spec: {{clusterIP: 10.{net}.0.2, selector: {{app: shadow}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: app, labels: {{app: client}}}}
spec: {{nodeName: node-a, serviceAccountName: client}}
status: {{podIP: 127.{net}.1.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-v1, namespace: app, labels: {{app: echo, version: v1}}}}
spec: {{nodeName: node-a, serviceAccountName: echo, containers: [{{name: e, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: 127.{net}.1.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-v2, namespace: app, labels: {{app: echo, version: v2}}}}
spec: {{nodeName: node-b, serviceAccountName: echo, containers: [{{name: e, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: 127.{net}.2.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: shadow-1, namespace: app, labels: {{app: shadow}}}}
spec: {{nodeName: node-b, serviceAccountName: shadow}}
status: {{podIP: 127.{net}.2.2}}
"#
    )
}

/// What a backend saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub backend: String,
    pub method: String,
    pub path: String,
    pub host: String,
    pub body: String,
}

/// A running mesh.
pub struct Mesh {
    pub net: u8,
    pub dir: Dir,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub waypoint: Option<WaypointServer>,
    /// The mesh CA, for callers the test plays itself.
    pub ca: Arc<MeshCa>,
    ztunnels: Vec<Ztunnel>,
    backends: Vec<JoinHandle<()>>,
    _watch: WatchHandle,
}

/// An HTTP response as the client saw it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Response {
    /// The pod that answered (from the echo backend's `x-backend` header).
    pub fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Mesh {
    /// Starts the mesh of [`mesh_yaml`] plus `extra` (routes, policies) in `routes.yaml`.
    pub async fn start(net: u8, extra: &str) -> Mesh {
        // `RUST_LOG=access=info,waypoint=debug` shows what the proxies did.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let dir = Dir::empty();
        dir.write("mesh.yaml", &mesh_yaml(net));
        dir.write("routes.yaml", extra);
        let mut config = ConfigDir::new(&dir.0, Options::default());
        let store = Store::open(&mut config).expect("valid configuration");
        let watch = store
            .watch(config, Duration::from_millis(20))
            .expect("watch");
        let snapshot = store.load();
        let ca = Arc::new(MeshCa::generate(&snapshot.options().trust_domain).expect("ca"));
        let nodes: BTreeSet<&str> = snapshot
            .workloads()
            .iter()
            .filter(|w| w.protocol == Protocol::Hbone)
            .filter_map(|w| w.node.as_deref())
            .collect();
        let live = Arc::new(LiveConnections::default());
        let zmetrics = Arc::new(ztunnel::metrics::Metrics::default());
        let mut ztunnels = Vec::new();
        for node in nodes {
            let ctx = Arc::new(Ctx {
                node: node.into(),
                store: store.clone(),
                certs: Arc::new(CertManager::new(ca.clone())),
                metrics: zmetrics.clone(),
                sockets: Arc::new(Loopback),
                live: live.clone(),
                hbone: hbone::Config::default(),
                resolvers: Arc::new(ztunnel::dns::Forwarder::new(
                    Vec::new(),
                    std::time::Duration::from_secs(1),
                )),
                dns_proxy: false,
                socks5: true,
            });
            ztunnels.push(Ztunnel::start(ctx).await.expect("ztunnel"));
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut backends = Vec::new();
        for (pod, last) in [("echo-v1", "1.2"), ("echo-v2", "2.1"), ("shadow-1", "2.2")] {
            let ip: IpAddr = format!("127.{net}.{last}").parse().unwrap();
            let l = TcpListener::bind((ip, 8080)).await.expect("bind backend");
            backends.push(tokio::spawn(echo(l, pod, seen.clone())));
            if pod.starts_with("echo") {
                let l = TcpListener::bind((ip, 9000))
                    .await
                    .expect("bind tcp backend");
                backends.push(tokio::spawn(tcp_echo(l, pod)));
            }
        }
        let metrics = Arc::new(Metrics::default());
        let waypoint = WaypointServer::start(
            store.clone(),
            Arc::new(CertManager::new(ca.clone())),
            WaypointSpec::new("app", "waypoint"),
            metrics.clone(),
        )
        .await
        .expect("waypoint");
        Mesh {
            net,
            dir,
            store,
            metrics,
            seen,
            waypoint: Some(waypoint),
            ca,
            ztunnels,
            backends,
            _watch: watch,
        }
    }

    pub fn ip(&self, last: &str) -> IpAddr {
        format!("127.{}.{last}", self.net).parse().unwrap()
    }

    /// The echo service's VIP.
    pub fn vip(&self) -> String {
        format!("10.{}.0.1", self.net)
    }

    /// Replaces `routes.yaml` and waits until the new snapshot is applied.
    pub async fn set_routes(&self, yaml: &str) {
        let before = self.store.load().version();
        self.dir.write("routes.yaml", yaml);
        // Generous: a debug build compiles a new plugin module slowly on a busy machine.
        for _ in 0..3000 {
            // The waypoint publishes its view once the snapshot's plugins are loaded.
            if self.metrics.config_version.get() as u64 > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "routes were not applied: {:?}",
            self.store.last_error().map(|e| e.to_string())
        );
    }

    /// Opens a SOCKS5 connection from the client pod to `host:port`.
    pub async fn socks(&self, host: &str, port: u16) -> std::io::Result<TcpStream> {
        socks(self.ip("1.1"), host, port).await
    }

    /// Sends one request from the client pod to the echo service, through its ztunnel.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Response {
        self.request_to(&self.vip(), 80, method, path, headers, body)
            .await
            .expect("request")
    }

    /// Sends one request to `host:port` through the client's ztunnel.
    pub async fn request_to(
        &self,
        host: &str,
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Response, String> {
        request(self.ip("1.1"), host, port, method, path, headers, body).await
    }

    /// A POST to `path` of `first` and then `second`, from the client pod on a connection of
    /// its own, that echo-v1 fails as its head arrives (`x-fail-with: close-at-once`). `second`
    /// is sent once echo-v2 has the request, after the retry if echo-v1 was tried first, so a
    /// retry comes while the body still arrives. The response as text, and whether echo-v1 was
    /// tried.
    pub async fn post_retried_midway(
        &self,
        path: &str,
        first: &str,
        second: &str,
    ) -> (String, bool) {
        let mut s = self.socks(&self.vip(), 80).await.expect("socks");
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: echo.app.svc.cluster.local:80\r\n\
             x-fail: echo-v1\r\nx-fail-with: close-at-once\r\nx-record-head: 1\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{first}",
            first.len() + second.len()
        );
        s.write_all(head.as_bytes()).await.expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !(self.seen_by("echo-v2").iter()).any(|s| s.path == path && s.body == "(head)") {
            assert!(
                std::time::Instant::now() < deadline,
                "echo-v2 never had {path}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        s.write_all(second.as_bytes()).await.expect("write");
        let mut response = String::new();
        s.read_to_string(&mut response).await.expect("read");
        let tried = (self.seen_by("echo-v1").iter())
            .any(|s| s.path == path && s.body == "(closed before the body)");
        (response, tried)
    }

    /// Requests seen by `backend` so far.
    pub fn seen_by(&self, backend: &str) -> Vec<Seen> {
        (self.seen.lock().unwrap().iter())
            .filter(|s| s.backend == backend)
            .cloned()
            .collect()
    }

    pub async fn shutdown(mut self) {
        if let Some(w) = self.waypoint.take() {
            w.drain(Duration::from_secs(1)).await;
        }
        for z in self.ztunnels.drain(..) {
            z.drain(Duration::from_secs(1)).await;
        }
        for b in &self.backends {
            b.abort();
        }
    }
}

/// Waits until `count` has grown by `by`, for 30 s at most (the caller's checks tell if not):
/// for tests that need traffic to flow through a change, however slowly the machine serves it.
pub async fn grown(count: &std::sync::atomic::AtomicUsize, by: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    let target = count.load(Relaxed) + by;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count.load(Relaxed) < target && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends one HTTP/1.1 request to `host:port` through the ztunnel of the pod at `from`.
pub async fn request(
    from: IpAddr,
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Response, String> {
    let stream = socks(from, host, port).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::builder().method(method).uri(path);
    // The service's name, unless the case sets its own `host`.
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", format!("echo.app.svc.cluster.local:{port}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// SOCKS5 CONNECT from `from` (the client pod's address) through its ztunnel.
pub async fn socks(from: IpAddr, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut s = socket.connect(SocketAddr::new(from, 15080)).await?;
    let mut request = vec![5, 1, 0, 5, 1, 0];
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            request.push(3);
            request.push(host.len() as u8);
            request.extend_from_slice(host.as_bytes());
        }
    }
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request).await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    if head[3] != 0 {
        return Err(std::io::Error::other(format!(
            "SOCKS5 refused the connection (reply {})",
            head[3]
        )));
    }
    Ok(s)
}

/// An HTTP/1.1 backend that answers with what it saw, and misbehaves on request:
/// `x-fail: <pods>` with `x-fail-with: <status>|close|close-at-once` fails on the listed pods
/// (answering the status, closing once the body is read, or closing before reading it);
/// `x-record-head: 1` records the request as `(head)` as soon as its head arrives;
/// `x-delay-ms: <n>` (optionally only on the pods of `x-delay-on`) waits first;
/// `x-close: 1` answers with `connection: close`. Every answer names its connection in
/// `x-connection` (`<pod>/<n>`, counted per pod).
pub async fn echo(listener: TcpListener, pod: &'static str, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut connections = 0u64;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        connections += 1;
        let connection =
            http::HeaderValue::try_from(format!("{pod}/{connections}")).expect("a header value");
        let seen = seen.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let seen = seen.clone();
                let connection = connection.clone();
                async move {
                    let close = req.headers().get("x-close").is_some();
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let listed =
                        |n: &str| header(n).is_some_and(|v| v.split(',').any(|p| p.trim() == pod));
                    let delay = header("x-delay-ms").and_then(|v| v.parse::<u64>().ok());
                    let delay_here = header("x-delay-on").is_none() || listed("x-delay-on");
                    let fail = listed("x-fail").then(|| header("x-fail-with")).flatten();
                    if header("x-record-head").is_some() {
                        seen.lock().unwrap().push(Seen {
                            backend: pod.to_owned(),
                            method: req.method().to_string(),
                            path: req.uri().to_string(),
                            host: header("host").unwrap_or_default(),
                            body: "(head)".to_owned(),
                        });
                    }
                    if fail.as_deref() == Some("close-at-once") {
                        seen.lock().unwrap().push(Seen {
                            backend: pod.to_owned(),
                            method: req.method().to_string(),
                            path: req.uri().to_string(),
                            host: header("host").unwrap_or_default(),
                            body: "(closed before the body)".to_owned(),
                        });
                        return Err("closing before the body");
                    }
                    let mut text = format!(
                        "backend={pod}\nmethod={}\npath={}\n",
                        req.method(),
                        req.uri()
                    );
                    let host = header("host").unwrap_or_default();
                    for (k, v) in req.headers() {
                        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                    }
                    let method = req.method().to_string();
                    let path = req.uri().to_string();
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let body = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
                    text.push_str(&format!("body={body}\n"));
                    seen.lock().unwrap().push(Seen {
                        backend: pod.to_owned(),
                        method,
                        path,
                        host,
                        body,
                    });
                    if let (Some(ms), true) = (delay, delay_here) {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let status = match fail.as_deref() {
                        Some("close") => return Err("closing without a response"),
                        Some(code) => code.parse().unwrap_or(500),
                        None => 200,
                    };
                    let mut resp = http::Response::new(Full::new(Bytes::from(text)));
                    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    resp.headers_mut()
                        .insert("x-backend", http::HeaderValue::from_static(pod));
                    resp.headers_mut().insert("x-connection", connection);
                    if close {
                        resp.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, &'static str>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A TCP backend that says who it is, then echoes.
pub async fn tcp_echo(listener: TcpListener, pod: &'static str) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.write_all(format!("{pod}\n").as_bytes()).await;
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// The path of example Wasm plugin `name`, built from source.
pub fn example_plugin(name: &str) -> String {
    plugins::examples::build(name).display().to_string()
}
