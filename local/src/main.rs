//! `cargo run -p local`: the local mesh, a few requests through it, then serving until Ctrl-C.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use admin::{Admin, AdminAddrs};
use anyhow::Context;
use clap::Parser;
use local::LocalMesh;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    about = "Runs the local ambient mesh: ztunnels, waypoints and sample backends on loopback"
)]
struct Cli {
    /// The configuration directory (watched: edits apply live).
    #[arg(long, default_value = "deploy/local")]
    config: PathBuf,
    /// The workload (by address) the demonstration requests leave from.
    #[arg(long, default_value = "127.0.1.1")]
    from: IpAddr,
    /// Exit after the demonstration instead of serving until Ctrl-C.
    #[arg(long)]
    once: bool,
    /// Log filter (`info`, `access=info,waypoint=debug`, ...); also `RUST_LOG`.
    #[arg(long)]
    log: Option<String>,
    /// Admin endpoint (`/config_dump`, `/logging`, `POST /quitquitquit`); IPv4's loopback is
    /// served on `[::1]` too, at the same port.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Prometheus endpoint (`/stats/prometheus`).
    #[arg(long, default_value = "127.0.0.1:15020")]
    metrics: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, default_value = "127.0.0.1:15021")]
    readiness: SocketAddr,
}

/// One demonstration request: why, `host:port`, path, headers.
type Demo = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// What the demonstration asks, and why.
const REQUESTS: &[Demo] = &[
    (
        "L4 only: productpage has no waypoint",
        "productpage.default.svc.cluster.local:9080",
        "/",
        &[],
    ),
    (
        "through the waypoint: the VirtualService sends everyone to reviews v1",
        "reviews.default.svc.cluster.local:9080",
        "/reviews/1",
        &[],
    ),
    (
        "through the waypoint: end-user jason goes to reviews v2",
        "reviews.default.svc.cluster.local:9080",
        "/reviews/1",
        &[("end-user", "jason")],
    ),
    (
        "through the waypoint: L7 authorization denies /admin",
        "reviews.default.svc.cluster.local:9080",
        "/admin",
        &[],
    ),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let set_log_level = admin::logging(cli.log.as_deref(), "warn");
    // deploy/local runs an example Wasm plugin; build it from source first.
    plugins::examples::build("add_header");
    let mesh = LocalMesh::start(&cli.config)
        .await
        .with_context(|| format!("starting the local mesh from {}", cli.config.display()))?;
    let waypoints: Vec<_> = (mesh.waypoints.iter())
        .map(|(name, w)| (name.clone(), w.live_state()))
        .collect();
    let mut nodes = Vec::new();
    for node in &mesh.nodes {
        nodes.push(node.workload_state().await);
    }
    let state: admin::StateDump = Arc::new(move || {
        let waypoints: serde_json::Map<String, serde_json::Value> = (waypoints.iter())
            .map(|(name, dump)| (name.clone(), dump()))
            .collect();
        let workloads: serde_json::Map<String, serde_json::Value> =
            nodes.iter().flat_map(|node| node.dump()).collect();
        serde_json::Map::from_iter([
            (
                "proxyState".to_owned(),
                serde_json::json!({ "waypoints": waypoints }),
            ),
            ("workloadState".to_owned(), workloads.into()),
        ])
    });
    // Everything is served once `start` returns.
    let lifecycle = Arc::new(admin::Lifecycle::default());
    lifecycle.serving();
    let ready = lifecycle.clone();
    let quit = Arc::new(tokio::sync::Notify::new());
    let bound = admin::spawn(
        Admin {
            name: "local-admin",
            store: mesh.store.clone(),
            certs: mesh.certs.clone(),
            registry: mesh.registry.clone(),
            ready: Arc::new(move || ready.check()),
            set_log_level: Some(set_log_level),
            state: Arc::new(state.into()),
            quit: quit.clone(),
        },
        AdminAddrs {
            admin: cli.admin,
            metrics: cli.metrics,
            readiness: cli.readiness,
        },
    )
    .context("binding the admin endpoints")?;
    for node in &mesh.nodes {
        println!(
            "ztunnel for {} serves {:?}",
            node.node(),
            node.workloads().await
        );
    }
    for (name, waypoint) in &mesh.waypoints {
        println!("waypoint {name} serves HBONE on {}", waypoint.addr());
    }
    let from = cli.from;
    for &(why, target, path, headers) in REQUESTS {
        let (host, port) = target.rsplit_once(':').context("host:port")?;
        let port: u16 = port.parse().context("host:port")?;
        let answer = mesh.get(from, host, port, path, headers).await;
        let flags: String = headers
            .iter()
            .map(|(k, v)| format!(" -H '{k}: {v}'"))
            .collect();
        println!();
        println!("# {why}");
        println!("$ curl --socks5-hostname {from}:15080{flags} http://{target}{path}");
        match answer {
            Ok(text) => println!("{text}"),
            Err(e) => println!("request failed: {e}"),
        }
    }
    println!();
    println!("metrics: curl http://{}/stats/prometheus", bound.metrics);
    println!("config:  curl http://{}/config_dump", bound.admin);
    let deadline = Duration::from_secs(5);
    if cli.once {
        mesh.shutdown(deadline).await;
        return Ok(());
    }
    admin::shutdown_signal(&quit).await;
    lifecycle.draining();
    mesh.shutdown(deadline).await;
    Ok(())
}
