//! The `waypoint` binary.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use admin::{Admin, AdminAddrs};
use anyhow::Context;
use clap::{Parser, Subcommand};
use hbone::{CertManager, MeshCa};
use mesh::{ConfigDir, Options, Store};
use prometheus_client::registry::Registry;
use waypoint::metrics::Metrics;
use waypoint::{WaypointServer, WaypointSpec};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(version, about = "Istio ambient's L7 proxy, on Pingora")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (`info`, `access=info,waypoint=debug`, ...); also `RUST_LOG`.
    #[arg(long, global = true)]
    log: Option<String>,
    /// Admin endpoint (`/config_dump`, `/logging`, `POST /quitquitquit`); IPv4's loopback is
    /// served on `[::1]` too, at the same port.
    #[arg(long, global = true, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Prometheus endpoint (`/stats/prometheus`). On every address by default, as upstream's,
    /// where Prometheus scrapes the pod's IP.
    #[arg(long, global = true, default_value = "[::]:15020")]
    metrics: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`). On every address by default, as upstream's, where
    /// the kubelet probes the pod's IP.
    #[arg(long, global = true, default_value = "[::]:15021")]
    readiness: SocketAddr,
    /// How long requests may take to finish after SIGTERM (or `POST /quitquitquit`), as a
    /// duration (`30s`, `1m30s`), as ztunnel's `--drain-deadline` takes it; then the rest are
    /// closed.
    #[arg(
        long,
        global = true,
        default_value = "30s",
        value_parser = parse_deadline,
        value_name = "DURATION"
    )]
    drain_deadline: Duration,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs one waypoint: the Gateway `--gateway` of the configuration in `--config`.
    Run {
        /// The configuration directory (watched).
        #[arg(long)]
        config: PathBuf,
        /// The waypoint Gateway, as `namespace/name`.
        #[arg(long)]
        gateway: String,
        /// The mesh CA certificate (PEM).
        #[arg(long)]
        ca_cert: PathBuf,
        /// The mesh CA key (PEM).
        #[arg(long)]
        ca_key: PathBuf,
        /// Listen on this address instead of the instance pod's IP from the configuration.
        #[arg(long)]
        address: Option<IpAddr>,
        /// The HBONE port.
        #[arg(long, default_value_t = hbone::HBONE_PORT)]
        port: u16,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let set_log_level = admin::logging(cli.log.as_deref(), "info");
    let deadline = cli.drain_deadline;
    let addrs = AdminAddrs {
        admin: cli.admin,
        metrics: cli.metrics,
        readiness: cli.readiness,
    };
    let Command::Run {
        config,
        gateway,
        ca_cert,
        ca_key,
        address,
        port,
    } = cli.command;
    let (namespace, name) = gateway
        .split_once('/')
        .context("--gateway must be namespace/name")?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let ca = Arc::new(
        MeshCa::from_pem(&read(&ca_cert)?, &read(&ca_key)?).context("loading the mesh CA")?,
    );
    let mut dir = ConfigDir::new(&config, Options::default());
    let store = Store::open(&mut dir).with_context(|| format!("loading {}", config.display()))?;
    let _watch = store.watch(dir, mesh::DEFAULT_DEBOUNCE)?;
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let build = admin::BuildInfo::default();
    build.register(&mut registry);
    build.component("proxy", env!("CARGO_PKG_VERSION"));
    let certs = Arc::new(CertManager::new(ca));
    let lifecycle = Arc::new(admin::Lifecycle::default());
    let ready = lifecycle.clone();
    let state = Arc::new(std::sync::OnceLock::new());
    let quit = Arc::new(tokio::sync::Notify::new());
    admin::spawn(
        Admin {
            name: "waypoint-admin",
            store: store.clone(),
            certs: certs.clone(),
            registry: Arc::new(registry),
            ready: Arc::new(move || ready.check()),
            set_log_level: Some(set_log_level),
            state: state.clone(),
            quit: quit.clone(),
        },
        addrs,
    )
    .context("binding the admin endpoints")?;
    let mut spec = WaypointSpec::new(namespace, name);
    spec.address = address;
    spec.port = port;
    let server = WaypointServer::start(store, certs, spec, metrics)
        .await
        .context("starting the waypoint")?;
    let live = server.live_state();
    let _ = state.set(Arc::new(move || {
        serde_json::Map::from_iter([("proxyState".to_owned(), live())])
    }));
    lifecycle.serving();
    admin::shutdown_signal(&quit).await;
    lifecycle.draining();
    server.drain(deadline).await;
    Ok(())
}

fn parse_deadline(s: &str) -> Result<Duration, String> {
    mesh::route::parse_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline(args: &[&str]) -> Result<Duration, clap::Error> {
        let run = [
            "run",
            "--config",
            "c",
            "--gateway",
            "app/w",
            "--ca-cert",
            "p",
            "--ca-key",
            "k",
        ];
        let all = ["waypoint"].iter().chain(args).chain(&run);
        Cli::try_parse_from(all).map(|cli| cli.drain_deadline)
    }

    /// The drain deadline is a duration, 30 s unless given; a bare number has no unit and is
    /// refused rather than read as seconds or nanoseconds.
    #[test]
    fn the_drain_deadline_is_a_duration() {
        assert_eq!(deadline(&[]).expect("default"), Duration::from_secs(30));
        let given = deadline(&["--drain-deadline", "1m30s"]).expect("given");
        assert_eq!(given, Duration::from_secs(90));
        let bare = deadline(&["--drain-deadline", "30"]).expect_err("no unit");
        assert!(bare.to_string().contains("no unit"), "{bare}");
    }
}
