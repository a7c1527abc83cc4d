//! The embedded default: a whole mesh on loopback, from a directory of the usual YAML.
//!
//! All of `127.0.0.0/8` is loopback on Linux, so every workload gets its own `127.x.y.z`
//! address (its `status.podIP`) and every node its own ztunnel, all in one process, no root and
//! no Kubernetes. A local CA issues every identity. Each workload with ports gets a sample
//! backend that says who it is, so a request through the mesh shows which backend answered.
//! Applications reach the mesh through each workload's SOCKS5 port (15080). Every waypoint
//! Gateway with an instance pod gets a waypoint on that pod's address, except a sandwiched one
//! (`ambient.istio.io/waypoint-inbound-binding`), which ztunnel feeds over PROXY protocol.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hbone::{CertManager, MeshCa};
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh::model::{Protocol, Target, Workload};
use mesh::{ConfigDir, Options, Store, WatchHandle};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use waypoint::{WaypointServer, WaypointSpec};
use ztunnel::Ztunnel;
use ztunnel::dns::Forwarder;
use ztunnel::proxy::live::LiveConnections;
use ztunnel::proxy::{Ctx, ports, socks5};
use ztunnel::socket::Loopback;

/// Why the local mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] mesh::ConfigError),
    /// The CA.
    #[error(transparent)]
    Cert(#[from] hbone::CertError),
    /// A ztunnel.
    #[error(transparent)]
    Ztunnel(#[from] ztunnel::Error),
    /// A waypoint.
    #[error(transparent)]
    Waypoint(#[from] waypoint::Error),
    /// A sample backend's listener.
    #[error("binding a sample backend on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running local mesh.
#[derive(Debug)]
pub struct LocalMesh {
    /// The configuration.
    pub store: Arc<Store>,
    /// One ztunnel per node.
    pub nodes: Vec<Ztunnel>,
    /// One waypoint per waypoint Gateway.
    pub waypoints: Vec<(String, WaypointServer)>,
    /// The Prometheus registry of every ztunnel and waypoint.
    pub registry: Arc<Registry>,
    /// The mesh CA.
    pub ca: Arc<MeshCa>,
    /// The workload certificates of every ztunnel and waypoint, issued by `ca`: one cache,
    /// as the registry is one, so the admin endpoint shows them all.
    pub certs: Arc<CertManager>,
    backends: Vec<JoinHandle<()>>,
    _watch: WatchHandle,
}

impl LocalMesh {
    /// Loads `dir`, starts one ztunnel per node and a sample backend per workload port, and
    /// watches `dir` for changes.
    pub async fn start(dir: &Path) -> Result<Self, Error> {
        let mut config = ConfigDir::new(dir, Options::default());
        let store = Store::open(&mut config)?;
        let watch = store.watch(config, mesh::DEFAULT_DEBOUNCE)?;
        let snapshot = store.load();
        let ca = Arc::new(MeshCa::generate(&snapshot.options().trust_domain)?);
        let metrics = Arc::new(ztunnel::metrics::Metrics::default());
        let waypoint_metrics = Arc::new(waypoint::metrics::Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        waypoint_metrics.register(&mut registry);
        let build = admin::BuildInfo::default();
        build.register(&mut registry);
        build.component("ztunnel", env!("CARGO_PKG_VERSION"));
        build.component("proxy", env!("CARGO_PKG_VERSION"));
        let live = Arc::new(LiveConnections::default());
        let certs = Arc::new(CertManager::new(ca.clone()));
        let nodes: BTreeSet<&str> = snapshot
            .workloads()
            .iter()
            .filter(|w| w.protocol == Protocol::Hbone)
            .filter_map(|w| w.node.as_deref())
            .collect();
        let mut ztunnels = Vec::new();
        for node in nodes {
            let ctx = Arc::new(Ctx {
                node: node.into(),
                store: store.clone(),
                certs: certs.clone(),
                metrics: metrics.clone(),
                sockets: Arc::new(Loopback),
                live: live.clone(),
                hbone: hbone::Config::default(),
                // Each workload's DNS proxy answers the mesh's names; the local mesh forwards
                // nothing to the host's resolvers.
                resolvers: Arc::new(Forwarder::new(Vec::new(), Duration::from_secs(1))),
                dns_proxy: true,
                socks5: true,
            });
            ztunnels.push(Ztunnel::start(ctx).await?);
        }
        let mut waypoints = Vec::new();
        for w in snapshot.waypoints() {
            let has_instance = (w.instances.iter()).any(|&i| !snapshot.workload(i).ips.is_empty());
            // A sandwiched waypoint (a third-party one fed over PROXY protocol) is its own
            // process; ztunnel serves its pods like any workload's.
            if !has_instance || w.inbound_binding.is_some() {
                continue;
            }
            let server = WaypointServer::start(
                store.clone(),
                certs.clone(),
                WaypointSpec::new(&w.namespace, &w.name),
                waypoint_metrics.clone(),
            )
            .await?;
            waypoints.push((format!("{}/{}", w.namespace, w.name), server));
        }
        let mut backends = Vec::new();
        // Every workload that has not ended answers, ready or not: a Service that publishes
        // not-ready addresses sends it traffic all the same.
        for w in snapshot.workloads().iter().filter(|w| w.running) {
            for port in backend_ports(&snapshot, w) {
                let Some(&ip) = w.ips.first() else { continue };
                let addr = SocketAddr::new(ip, port);
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?;
                let who = format!("{}/{} ({})", w.namespace, w.name, w.identity);
                backends.push(tokio::spawn(sample_backend(listener, who)));
            }
        }
        Ok(Self {
            store,
            nodes: ztunnels,
            waypoints,
            registry: Arc::new(registry),
            ca,
            certs,
            backends,
            _watch: watch,
        })
    }

    /// Sends `GET path` with `headers` to `host:port` through the SOCKS5 port of the workload
    /// at `from`, as `curl --socks5-hostname` would, and returns the status line, the `x-`
    /// headers (what the mesh and its plugins added) and the body.
    pub async fn get(
        &self,
        from: std::net::IpAddr,
        host: &str,
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<String> {
        // Leave from the workload's own address, as its application would.
        let socket = if from.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(from, 0))?;
        let mut s = socket.connect(SocketAddr::new(from, ports::SOCKS5)).await?;
        let mut request = vec![5, 1, 0, 5, 1, 0, 3, host.len() as u8];
        request.extend_from_slice(host.as_bytes());
        request.extend_from_slice(&port.to_be_bytes());
        s.write_all(&request).await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        if head[3] != socks5::Reply::Succeeded as u8 {
            return Err(std::io::Error::other(format!(
                "SOCKS5 refused the connection (reply code {})",
                head[3]
            )));
        }
        let mut request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        s.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        s.read_to_string(&mut response).await?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let mut lines = head.lines();
        let mut out = lines.next().unwrap_or_default().to_owned();
        for line in lines.filter(|l| l.to_ascii_lowercase().starts_with("x-")) {
            out.push('\n');
            out.push_str(line);
        }
        out.push('\n');
        out.push_str(body);
        Ok(out)
    }

    /// Stops everything, letting connections finish for up to `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        for (_, waypoint) in self.waypoints {
            waypoint.drain(deadline).await;
        }
        for node in self.nodes {
            node.drain(deadline).await;
        }
        for b in self.backends {
            b.abort();
        }
    }
}

/// The ports a workload's sample backend listens on: its named container ports and the numeric
/// target ports of its services.
fn backend_ports(snapshot: &mesh::Snapshot, w: &Workload) -> BTreeSet<u16> {
    let mut ports: BTreeSet<u16> = w.named_ports.iter().map(|&(_, p)| p).collect();
    for &s in &w.services {
        for p in &snapshot.service(s).ports {
            if let Target::Number(n) = p.target {
                ports.insert(n);
            }
        }
    }
    ports
}

/// An HTTP/1.1 server that answers every request with who it is and what it was asked.
async fn sample_backend(listener: TcpListener, who: String) {
    let who: Arc<str> = who.into();
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let who = who.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let body = format!(
                    "hello from {who}\nyou asked for {} {} (connection from {peer})\n",
                    req.method(),
                    req.uri()
                );
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
