//! Starting and stopping one waypoint: certificate, HBONE listener, HTTP proxy, and the task
//! that follows configuration changes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hbone::drain::DrainTrigger;
use hbone::{CertManager, HBONE_PORT, Pool};
use mesh::Store;
use pingora_core::apps::HttpServerOptions;
use pingora_core::server::configuration::ServerConf;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::Error;
use crate::callout::MeshCalls;
use crate::http::Waypoint;
use crate::metrics::Metrics;
use crate::state::{Shared, WaypointName};
use crate::terminate::Terminate;
use crate::wasm::Plugins;

/// Which waypoint to run and where.
#[derive(Debug, Clone)]
pub struct WaypointSpec {
    /// The Gateway (class `istio-waypoint`) this process is an instance of.
    pub name: WaypointName,
    /// The address to listen on; default: the first instance pod's IP in the configuration.
    pub address: Option<IpAddr>,
    /// The HBONE port (15008; 0 picks a free one, for tests).
    pub port: u16,
    /// HTTP/2 and TLS settings of both HBONE legs.
    pub hbone: hbone::Config,
}

impl WaypointSpec {
    /// The Gateway `namespace/name` on its instance's address, port 15008.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            name: WaypointName {
                namespace: namespace.into(),
                name: name.into(),
            },
            address: None,
            port: HBONE_PORT,
            hbone: hbone::Config::default(),
        }
    }
}

/// A running waypoint.
#[derive(Debug)]
pub struct WaypointServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    drain: Option<DrainTrigger>,
    serve: JoinHandle<()>,
    follow: JoinHandle<()>,
    sample: JoinHandle<()>,
}

impl WaypointServer {
    /// Starts serving `spec` with identities from `certs`, following `store`.
    pub async fn start(
        store: Arc<Store>,
        certs: Arc<CertManager>,
        spec: WaypointSpec,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let snapshot = store.load();
        let (_, waypoint) = snapshot
            .waypoint_by_name(&spec.name.namespace, &spec.name.name)
            .ok_or_else(|| Error::UnknownWaypoint(spec.name.to_string()))?;
        if waypoint.inbound_binding.is_some() {
            return Err(Error::Sandwiched(spec.name.to_string()));
        }
        let instance = waypoint
            .instances
            .iter()
            .map(|&id| snapshot.workload(id))
            .find(|w| !w.ips.is_empty())
            .ok_or_else(|| Error::NoInstance(spec.name.to_string()))?;
        let identity = instance.identity.clone();
        let ip = spec.address.unwrap_or(instance.ips[0]);
        drop(snapshot);

        let cert = certs.fetch(&identity).await?;
        // In a pod, the kernel's choice of source is the pod's address, which the endpoint's
        // ztunnel knows as the waypoint's; on loopback (the local mesh, tests) it would be
        // 127.0.0.1, nobody's, so the tunnels leave from the waypoint's own address.
        let pool = if ip.is_loopback() {
            let dialer = Arc::new(hbone::SourceDial(ip));
            Pool::with_dialer(certs, spec.hbone.clone(), dialer)
        } else {
            Pool::new(certs, spec.hbone.clone())
        };
        let node = plugins::NodeInfo {
            id: format!(
                "waypoint~{ip}~{}.{}~{}.svc.cluster.local",
                spec.name.name, spec.name.namespace, spec.name.namespace
            ),
            cluster: format!("{}.{}", spec.name.name, spec.name.namespace),
            metadata: vec![
                ("NAMESPACE".into(), spec.name.namespace.to_string()),
                ("WORKLOAD_NAME".into(), spec.name.name.to_string()),
                (
                    "SERVICE_ACCOUNT".into(),
                    identity.service_account().to_string(),
                ),
            ],
        };
        let calls = MeshCalls::default();
        let host = plugins::Host::new(node, Arc::new(calls.clone()))
            .map_err(|e| Error::Plugins(e.to_string()))?;
        let _ = metrics.plugins.set(host.metrics().clone());
        let wasm = Plugins::new(host);
        let shared = Arc::new(
            Shared::new(
                store,
                spec.name.clone(),
                ip,
                identity.clone(),
                pool,
                metrics,
                wasm,
            )
            .await,
        );
        calls.bind(&shared);

        let conf = Arc::new(ServerConf::default());
        let mut proxy = pingora_proxy::http_proxy(&conf, Waypoint::new(shared.clone()));
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        proxy.server_options = Some(options);

        let (trigger, watch) = hbone::drain::channel();
        let terminate = Terminate {
            shared: shared.clone(),
            proxy: Arc::new(proxy),
            shutdown: watch.clone().into_receiver(),
        };
        let server = hbone::Server::new(cert, terminate, spec.hbone)?;
        let sample = tokio::spawn(sample_hbone(
            shared.metrics.clone(),
            server.stats(),
            shared.pool.stats(),
        ));
        let addr = SocketAddr::new(ip, spec.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        tracing::info!(waypoint = %spec.name, %identity, %addr, "waypoint serving HBONE");
        Ok(Self {
            addr,
            shared: shared.clone(),
            drain: Some(trigger),
            serve: tokio::spawn(server.serve(listener, watch)),
            follow: tokio::spawn(shared.follow()),
            sample,
        })
    }

    /// The HBONE listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The waypoint's live state for `/config_dump`'s `proxyState` (what the mesh's snapshot
    /// does not show): each endpoint's requests in flight, failures in a row and ejection.
    /// It holds no reference that keeps the waypoint's state alive once it stops.
    pub fn live_state(&self) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
        let shared = Arc::downgrade(&self.shared);
        move || match shared.upgrade() {
            Some(shared) => serde_json::json!({
                "endpoints": shared.view().balancer.dump(std::time::Instant::now()),
            }),
            None => serde_json::Value::Null,
        }
    }

    /// Stops accepting, lets tunnels and requests finish for up to `deadline`, then stops.
    pub async fn drain(mut self, deadline: Duration) {
        self.follow.abort();
        self.sample.abort();
        if let Some(trigger) = self.drain.take()
            && tokio::time::timeout(deadline, trigger.drain())
                .await
                .is_err()
        {
            tracing::warn!("drain deadline passed; closing the remaining tunnels");
        }
        self.serve.abort();
    }
}

/// Publishes the HBONE gauges every second.
async fn sample_hbone(
    metrics: Arc<Metrics>,
    downstream: Arc<hbone::Stats>,
    upstream: Arc<hbone::Stats>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        metrics.sample_hbone("downstream", &downstream);
        metrics.sample_hbone("upstream", &upstream);
    }
}
