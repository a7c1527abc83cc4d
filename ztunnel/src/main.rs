//! The `ztunnel` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hbone::{CertManager, MeshCa};
use mesh::{ConfigDir, Options, Store};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use ztunnel::Ztunnel;
use ztunnel::admin::{self, Admin, AdminAddrs, SetLogLevel};
use ztunnel::local::LocalMesh;
use ztunnel::metrics::Metrics;
use ztunnel::proxy::Ctx;
use ztunnel::proxy::live::LiveConnections;
use ztunnel::socket::Loopback;

/// Large per-connection buffers are recycled instead of mapped and unmapped, as upstream does.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(version, about = "Istio ambient's per-node L4 proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (`info`, `access=info,ztunnel=debug`, ...); also `RUST_LOG`.
    #[arg(long, global = true)]
    log: Option<String>,
    /// Admin endpoint (`/config_dump`, `/logging`).
    #[arg(long, global = true, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Prometheus endpoint (`/stats/prometheus`).
    #[arg(long, global = true, default_value = "127.0.0.1:15020")]
    metrics: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, global = true, default_value = "127.0.0.1:15021")]
    readiness: SocketAddr,
    /// How long connections may take to finish after SIGTERM.
    #[arg(long, global = true, default_value = "30", value_name = "SECONDS")]
    drain_deadline: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the local mesh: one ztunnel per node on loopback addresses, sample backends, and a
    /// request through it.
    Local {
        /// The configuration directory.
        #[arg(long, default_value = "deploy/local")]
        config: PathBuf,
        /// The workload (by address) the demonstration request leaves from.
        #[arg(long, default_value = "127.0.1.1")]
        from: std::net::IpAddr,
        /// What the demonstration request asks for.
        #[arg(long, default_value = "productpage.default.svc.cluster.local:9080")]
        to: String,
        /// Exit after the demonstration instead of serving until SIGTERM.
        #[arg(long)]
        once: bool,
    },
    /// Runs one ztunnel for one node on loopback workload addresses.
    Run {
        /// The configuration directory (watched).
        #[arg(long)]
        config: PathBuf,
        /// This ztunnel's node: it serves the workloads whose `spec.nodeName` is this.
        #[arg(long)]
        node: String,
        /// The mesh CA certificate (PEM).
        #[arg(long)]
        ca_cert: PathBuf,
        /// The mesh CA key (PEM).
        #[arg(long)]
        ca_key: PathBuf,
    },
}

fn logging(filter: Option<&str>) -> SetLogLevel {
    let filter = filter
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer())
        .init();
    Arc::new(move |level: &str| {
        let new =
            EnvFilter::try_new(level).map_err(|e| format!("invalid filter {level:?}: {e}"))?;
        handle.reload(new).map_err(|e| e.to_string())?;
        Ok(level.to_owned())
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let set_log_level = logging(cli.log.as_deref());
    let addrs = AdminAddrs {
        admin: cli.admin,
        metrics: cli.metrics,
        readiness: cli.readiness,
    };
    let deadline = Duration::from_secs(cli.drain_deadline);
    match cli.command {
        Command::Local {
            config,
            from,
            to,
            once,
        } => {
            let mesh = LocalMesh::start(&config)
                .await
                .with_context(|| format!("starting the local mesh from {}", config.display()))?;
            let bound = admin::spawn(
                Admin {
                    store: mesh.store.clone(),
                    certs: Arc::new(CertManager::new(mesh.ca.clone())),
                    registry: mesh.registry.clone(),
                    ready: mesh.ready(),
                    set_log_level: Some(set_log_level),
                },
                addrs,
            )
            .context("binding the admin endpoints")?;
            let (host, port) = to.rsplit_once(':').context("--to must be host:port")?;
            let port: u16 = port.parse().context("--to must be host:port")?;
            for node in &mesh.nodes {
                println!(
                    "ztunnel for {} serves {:?}",
                    node.node(),
                    node.workloads().await
                );
            }
            let answer = mesh.get(from, host, port, "/").await;
            println!();
            println!("$ curl --socks5-hostname {from}:15080 http://{host}:{port}/");
            match answer {
                Ok(text) => println!("{text}"),
                Err(e) => println!("request failed: {e}"),
            }
            println!("metrics: curl http://{}/stats/prometheus", bound.metrics);
            println!("config:  curl http://{}/config_dump", bound.admin);
            if once {
                mesh.shutdown(deadline).await;
                return Ok(());
            }
            shutdown_signal().await;
            mesh.shutdown(deadline).await;
        }
        Command::Run {
            config,
            node,
            ca_cert,
            ca_key,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let ca = Arc::new(
                MeshCa::from_pem(&read(&ca_cert)?, &read(&ca_key)?)
                    .context("loading the mesh CA")?,
            );
            let mut dir = ConfigDir::new(&config, Options::default());
            let store =
                Store::open(&mut dir).with_context(|| format!("loading {}", config.display()))?;
            let _watch = store.watch(dir, mesh::DEFAULT_DEBOUNCE)?;
            let metrics = Arc::new(Metrics::default());
            let mut registry = Registry::default();
            metrics.register(&mut registry);
            let certs = Arc::new(CertManager::new(ca));
            let ready = Arc::new(AtomicBool::new(false));
            admin::spawn(
                Admin {
                    store: store.clone(),
                    certs: certs.clone(),
                    registry: Arc::new(registry),
                    ready: ready.clone(),
                    set_log_level: Some(set_log_level),
                },
                addrs,
            )
            .context("binding the admin endpoints")?;
            let ctx = Arc::new(Ctx {
                store,
                certs,
                metrics,
                sockets: Arc::new(Loopback),
                live: Arc::new(LiveConnections::default()),
                hbone: hbone::Config::default(),
            });
            let ztunnel = Ztunnel::start(ctx, &node)
                .await
                .context("starting the ztunnel")?;
            ready.store(true, Ordering::Release);
            tracing::info!(node = %node, workloads = ?ztunnel.workloads().await, "ztunnel ready");
            shutdown_signal().await;
            ready.store(false, Ordering::Release);
            ztunnel.drain(deadline).await;
        }
    }
    Ok(())
}

/// SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops ztunnel");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("draining");
}
