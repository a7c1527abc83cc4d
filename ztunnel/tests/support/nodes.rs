//! Ztunnels in the test's own process, one per node, on loopback addresses: the mesh they serve
//! read from YAML in a scratch directory (and watched, so the test can change it), one mesh CA,
//! and metrics the test reads as Prometheus text. For tests that reach into a ztunnel (a socket
//! factory of their own) or stand in for one end themselves.

#![allow(dead_code)] // each test binary uses part of it

use std::sync::Arc;
use std::time::Duration;

use hbone::{CertManager, MeshCa};
use mesh::{ConfigDir, Options, Store, WatchHandle};
use prometheus_client::registry::Registry;
use ztunnel::Ztunnel;
use ztunnel::dns::Forwarder;
use ztunnel::metrics::Metrics;
use ztunnel::proxy::Ctx;
use ztunnel::proxy::live::LiveConnections;
use ztunnel::socket::SocketFactory;

use crate::scratch::Dir;

/// The configuration and everything the nodes share.
pub(crate) struct Nodes {
    pub(crate) dir: Dir,
    pub(crate) store: Arc<Store>,
    pub(crate) ca: Arc<MeshCa>,
    pub(crate) certs: Arc<CertManager>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) live: Arc<LiveConnections>,
    /// The resolvers ztunnel asks; none (and no DNS proxy) unless a test sets them.
    pub(crate) dns: Option<Arc<Forwarder>>,
    /// Whether, with resolvers, each workload gets a DNS proxy (`ztunnel run --no-dns`: not).
    pub(crate) dns_proxy: bool,
    /// Whether each workload gets a SOCKS5 port (`ztunnel run --socks5 false`: not).
    pub(crate) socks5: bool,
    registry: Registry,
    _watch: WatchHandle,
}

impl Nodes {
    /// The mesh `yaml` describes, loaded and watched.
    pub(crate) fn new(yaml: &str) -> Self {
        let dir = Dir::with_mesh(yaml);
        let mut config = ConfigDir::new(&dir.0, Options::default());
        let store = Store::open(&mut config).expect("valid configuration");
        let watch = store
            .watch(config, Duration::from_millis(20))
            .expect("watch");
        let ca = Arc::new(MeshCa::generate(&store.load().options().trust_domain).expect("ca"));
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        Self {
            dir,
            store,
            certs: Arc::new(CertManager::new(ca.clone())),
            ca,
            metrics,
            live: Arc::new(LiveConnections::default()),
            dns: None,
            dns_proxy: true,
            socks5: true,
            registry,
            _watch: watch,
        }
    }

    /// Starts the ztunnel of `node`, making its sockets with `sockets`.
    pub(crate) async fn start(&self, node: &str, sockets: Arc<dyn SocketFactory>) -> Ztunnel {
        let ctx = Arc::new(Ctx {
            node: node.into(),
            store: self.store.clone(),
            certs: self.certs.clone(),
            metrics: self.metrics.clone(),
            sockets,
            live: self.live.clone(),
            hbone: hbone::Config::default(),
            resolvers: (self.dns.clone())
                .unwrap_or_else(|| Arc::new(Forwarder::new(Vec::new(), Duration::from_secs(1)))),
            dns_proxy: self.dns.is_some() && self.dns_proxy,
            socks5: self.socks5,
        });
        Ztunnel::start(ctx).await.expect("the ztunnel starts")
    }

    /// Rewrites the mesh and waits until the ztunnels use it.
    pub(crate) async fn reconfigure(&self, yaml: &str) {
        let before = self.store.load().version();
        self.dir.write("mesh.yaml", yaml);
        for _ in 0..400 {
            if self.store.load().version() > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the new mesh was never loaded");
    }

    /// The ztunnels' metrics, as scraped.
    pub(crate) fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        text
    }
}
