//! Pods as network namespaces on one bridge, and ztunnels fed those pods over ZDS, for the
//! tests that capture real traffic: the ztunnel's, and the waypoint's, which include this file.
//!
//! Needs root (CI runs as root); [`assert_root`] makes a test fail, not skip, without it.

#![allow(dead_code, unreachable_pub)] // each test binary uses part of the fabric

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use hbone::{CertManager, MeshCa};
use mesh::Store;
use ztunnel::Ztunnel;
use ztunnel::dns::Forwarder;
use ztunnel::inpod::zds::proto::WorkloadInfo;
use ztunnel::inpod::{NetNs, PodRules, ZdsConnection, ZdsServer};
use ztunnel::metrics::Metrics;
use ztunnel::proxy::Ctx;
use ztunnel::proxy::live::LiveConnections;
use ztunnel::socket::InPod;

/// The pods' subnet: pod `n` is `198.19.7.<n>`.
pub const SUBNET: &str = "198.19.7";
/// The bridge's own address, the pods' default route.
pub const GATEWAY: &str = "198.19.7.254";
/// The pods' IPv6 subnet: pod `n` is also `fd19:7::<n in hex>`.
pub const SUBNET6: &str = "fd19:7:";
/// The bridge's own IPv6 address, the pods' IPv6 default route.
pub const GATEWAY6: &str = "fd19:7::fe";

/// Runs a command, panicking with its stderr if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fails loudly, rather than skipping, where the test cannot build namespaces.
pub fn assert_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|v| v.split_whitespace().nth(1).unwrap_or("").to_owned())
            })
        });
    assert_eq!(
        uid.as_deref(),
        Some("0"),
        "this test creates network namespaces and iptables rules: run it as root"
    );
}

/// A network namespace, deleted on drop.
pub struct Ns(pub String);

impl Ns {
    pub fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Ns(name)
    }

    pub fn open(&self) -> NetNs {
        NetNs::open(format!("/var/run/netns/{}", self.0)).expect("open netns")
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The fabric: a bridge in its own namespace, and pods plugged into it.
pub struct Fabric {
    bridge: Ns,
    tag: u32,
    pub pods: Vec<Ns>,
}

impl Fabric {
    /// A fabric whose namespaces carry `tag`, unique among the fabrics of running tests.
    pub fn new(tag: u32) -> Self {
        let bridge = Ns::new(format!("zt-fab-{tag}"));
        let br = &bridge.0;
        sh(&["ip", "-n", br, "link", "add", "br0", "type", "bridge"]);
        let gateway = format!("{GATEWAY}/24");
        sh(&["ip", "-n", br, "addr", "add", &gateway, "dev", "br0"]);
        // `nodad`: usable at once, without duplicate address detection's wait.
        let gateway6 = format!("{GATEWAY6}/64");
        sh(&[
            "ip", "-n", br, "addr", "add", &gateway6, "dev", "br0", "nodad",
        ]);
        sh(&["ip", "-n", br, "link", "set", "br0", "up"]);
        Fabric {
            bridge,
            tag,
            pods: Vec::new(),
        }
    }

    /// A pod namespace with addresses `198.19.7.<host>` and `fd19:7::<host in hex>`.
    pub fn pod(&mut self, host: u8) -> NetNs {
        let ns = Ns::new(format!("zt-pod{host}-{}", self.tag));
        let outer = format!("zv{host}-{}", self.tag);
        let (br, pod) = (&self.bridge.0, &ns.0);
        sh(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", pod,
        ]);
        sh(&["ip", "link", "set", &outer, "netns", br]);
        sh(&["ip", "-n", br, "link", "set", &outer, "master", "br0", "up"]);
        let address = format!("{SUBNET}.{host}/24");
        sh(&["ip", "-n", pod, "addr", "add", &address, "dev", "eth0"]);
        sh(&["ip", "-n", pod, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", pod, "route", "add", "default", "via", GATEWAY]);
        let address6 = format!("{SUBNET6}:{host:x}/64");
        sh(&[
            "ip", "-n", pod, "addr", "add", &address6, "dev", "eth0", "nodad",
        ]);
        sh(&[
            "ip", "-n", pod, "-6", "route", "add", "default", "via", GATEWAY6,
        ]);
        let netns = ns.open();
        self.pods.push(ns);
        netns
    }

    /// The name of pod `host`'s namespace, for `ip netns exec`.
    pub fn pod_name(&self, host: u8) -> &str {
        let name = format!("zt-pod{host}-{}", self.tag);
        let ns = self.pods.iter().find(|ns| ns.0 == name).expect("a pod");
        &ns.0
    }

    /// The path of pod `host`'s namespace, for tools that take one (ZDS).
    pub fn pod_path(&self, host: u8) -> String {
        format!("/var/run/netns/{}", self.pod_name(host))
    }
}

/// A child process, killed on drop.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the nodes of one test share: the mesh's config, its CA, and one set of metrics.
pub struct Mesh {
    pub store: Arc<Store>,
    pub ca: Arc<MeshCa>,
    pub metrics: Arc<Metrics>,
    /// The resolvers the DNS proxies forward to.
    pub dns_upstreams: Vec<std::net::SocketAddr>,
}

/// One node's ztunnel, fed `pods` over ZDS by this test playing istio-cni.
pub async fn start_node(
    dir: &Path,
    node: &str,
    mesh: &Mesh,
    pods: &[(&str, &NetNs)],
) -> (Arc<Ztunnel>, ZdsServer, ZdsConnection, Arc<AtomicBool>) {
    let sockets = Arc::new(InPod::default());
    let ctx = Arc::new(Ctx {
        node: node.into(),
        store: mesh.store.clone(),
        certs: Arc::new(CertManager::new(mesh.ca.clone())),
        metrics: mesh.metrics.clone(),
        sockets: sockets.clone(),
        live: Arc::new(LiveConnections::default()),
        hbone: hbone::Config::default(),
        // The pods' DNS is captured: mesh names are answered, other names forwarded to the
        // test's resolvers (in its own namespaces).
        resolvers: Arc::new(Forwarder::new(
            mesh.dns_upstreams.clone(),
            std::time::Duration::from_secs(2),
        )),
        dns_proxy: true,
        socks5: true,
    });
    let ztunnel = Arc::new(Ztunnel::start(ctx).await.expect("ztunnel"));
    let uds = dir.join(format!("{node}.sock"));
    let server = ZdsServer::bind(&uds).expect("zds bind");
    let synced = Arc::new(AtomicBool::new(false));
    {
        let (ztunnel, synced) = (ztunnel.clone(), synced.clone());
        tokio::spawn(async move {
            ztunnel::capture::follow_node_agent(&uds, &sockets, &ztunnel, &synced).await
        });
    }
    let mut agent = server.accept().await.expect("ztunnel connects");
    agent.hello().await.expect("hello");
    for (name, netns) in pods {
        PodRules::detect(netns)
            .expect("iptables")
            .install(netns)
            .expect("install rules");
        let info = WorkloadInfo {
            name: (*name).into(),
            namespace: "app".into(),
            service_account: String::new(),
        };
        agent
            .add(format!("uid-{name}"), Some(info), netns)
            .await
            .expect("ztunnel accepts the pod");
    }
    agent.snapshot_sent().await.expect("snapshot");
    (ztunnel, server, agent, synced)
}

/// Sums the samples of `metric` whose labels include all of `labels`.
pub fn sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
