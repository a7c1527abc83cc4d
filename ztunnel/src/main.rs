//! The `ztunnel` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use admin::{Admin, AdminAddrs};
use anyhow::Context;
use clap::{Parser, Subcommand};
use hbone::{CertManager, MeshCa};
use mesh::{ConfigDir, Options, Store};
use prometheus_client::registry::Registry;
use ztunnel::Ztunnel;
use ztunnel::dns::Forwarder;
use ztunnel::inpod::zds::proto::WorkloadInfo;
use ztunnel::inpod::{NetNs, PodRules, ZdsConnection, ZdsError, ZdsServer};
use ztunnel::metrics::Metrics;
use ztunnel::proxy::Ctx;
use ztunnel::proxy::live::LiveConnections;
use ztunnel::socket::{InPod, Loopback, SocketFactory};

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
    /// How long connections may take to finish after SIGTERM (or `POST /quitquitquit`), as a
    /// duration (`10s`, `1m30s`); then the rest are closed. Default: derived from
    /// `--termination-grace-period`, as upstream derives it.
    #[arg(
        long,
        global = true,
        env = "CONNECTION_TERMINATION_DEADLINE",
        value_parser = parse_deadline,
        value_name = "DURATION"
    )]
    drain_deadline: Option<Duration>,
    /// The pod's `terminationGracePeriodSeconds`, after which Kubernetes kills the process:
    /// the drain ends a little before it (5 s, or 1 s for a period of 10 s or less), so the
    /// connections left are closed by ztunnel rather than cut by the kill. Without it, and
    /// without `--drain-deadline`, the drain lasts 5 s.
    #[arg(
        long,
        global = true,
        env = "TERMINATION_GRACE_PERIOD_SECONDS",
        value_name = "SECONDS"
    )]
    termination_grace_period: Option<u64>,
    /// Data-plane worker threads. Two by default whatever the node's size, as upstream; with one,
    /// the data plane runs on a single thread without work stealing.
    #[arg(
        long,
        global = true,
        env = "ZTUNNEL_WORKER_THREADS",
        default_value_t = 2,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    worker_threads: u16,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs one ztunnel for one node: on its workloads' loopback addresses, or inside each pod
    /// the node agent announces (`--inpod-uds`).
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
        /// Capture in each pod's network namespace, announced by the node agent (istio-cni, or
        /// `ztunnel cni`) on this ZDS socket, instead of serving workloads on loopback.
        #[arg(long)]
        inpod_uds: Option<PathBuf>,
        /// An upstream resolver, for the DNS proxy and for ServiceEntry DNS names (`ip` or `ip:port`);
        /// repeatable. Default: the `nameserver`s of `/etc/resolv.conf`, as upstream.
        #[arg(long = "dns-upstream", value_parser = parse_resolver)]
        dns_upstreams: Vec<SocketAddr>,
        /// No DNS proxy (upstream's `DNS_CAPTURE=false`); the node agent must not redirect DNS
        /// either (`ztunnel cni --no-dns`).
        #[arg(long)]
        no_dns: bool,
        /// Whether each workload gets a SOCKS5 port (15080). Upstream opens it only when asked
        /// (`UNSTABLE_ENABLE_SOCKS5=true`); `false` leaves that port to the pods' applications.
        #[arg(long, env = "UNSTABLE_ENABLE_SOCKS5", default_value_t = true, action = clap::ArgAction::Set)]
        socks5: bool,
    },
    /// Plays the node agent (istio-cni's side of ZDS) for local use: installs the in-pod
    /// capture rules in each pod's network namespace and announces the pods to ztunnel.
    Cni {
        /// The ZDS socket ztunnel connects to.
        #[arg(long)]
        uds: PathBuf,
        /// A pod as `namespace/name=/path/to/netns` (e.g. `/var/run/netns/pod1`); repeatable.
        #[arg(long = "pod", required = true)]
        pods: Vec<String>,
        /// Leave the pods' DNS alone (for a ztunnel run with `--no-dns`).
        #[arg(long)]
        no_dns: bool,
        /// Capture IPv4 only, as istio-cni with `ENABLE_INBOUND_IPV6=false`: no ip6tables rules.
        #[arg(long)]
        no_ipv6: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime(cli.worker_threads.into())
        .context("starting the data-plane runtime")?
        .block_on(run(cli))
}

/// The data plane's runtime. One worker is the calling thread alone (a current-thread runtime,
/// which schedules without the work-stealing pool's bookkeeping), for a small node where ztunnel
/// shares its cores with the pods.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder.enable_all().thread_name("ztunnel-worker").build()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let set_log_level = admin::logging(cli.log.as_deref(), "info");
    let addrs = AdminAddrs {
        admin: cli.admin,
        metrics: cli.metrics,
        readiness: cli.readiness,
    };
    let deadline = drain_deadline(cli.drain_deadline, cli.termination_grace_period);
    match cli.command {
        Command::Cni {
            uds,
            pods,
            no_dns,
            no_ipv6,
        } => cni(&uds, &pods, !no_dns, !no_ipv6).await?,
        Command::Run {
            config,
            node,
            ca_cert,
            ca_key,
            inpod_uds,
            dns_upstreams,
            no_dns,
            socks5,
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
            let build = admin::BuildInfo::default();
            build.register(&mut registry);
            build.component("ztunnel", env!("CARGO_PKG_VERSION"));
            let certs = Arc::new(CertManager::new(ca));
            // Ready once serving and, in pods, while the node agent's pods are synced, as
            // upstream is; every reason that holds is named, as upstream names its pending
            // tasks.
            let lifecycle = Arc::new(admin::Lifecycle::default());
            let synced = Arc::new(AtomicBool::new(inpod_uds.is_none()));
            let ready: admin::Readiness = {
                let (lifecycle, synced) = (lifecycle.clone(), synced.clone());
                Arc::new(move || {
                    let agent = (!synced.load(Ordering::Acquire))
                        .then(|| "the node agent's pods are not synced".to_owned());
                    let waiting: Vec<String> =
                        lifecycle.check().err().into_iter().chain(agent).collect();
                    if waiting.is_empty() {
                        Ok(())
                    } else {
                        Err(waiting.join(", "))
                    }
                })
            };
            let quit = Arc::new(tokio::sync::Notify::new());
            let state = Arc::new(std::sync::OnceLock::new());
            admin::spawn(
                Admin {
                    name: "ztunnel-admin",
                    store: store.clone(),
                    certs: certs.clone(),
                    registry: Arc::new(registry),
                    ready,
                    set_log_level: Some(set_log_level),
                    state: state.clone(),
                    quit: quit.clone(),
                },
                addrs,
            )
            .context("binding the admin endpoints")?;
            let inpod = inpod_uds.as_ref().map(|_| Arc::new(InPod::default()));
            let sockets: Arc<dyn SocketFactory> = match &inpod {
                Some(inpod) => inpod.clone(),
                None => Arc::new(Loopback),
            };
            let resolvers = Arc::new(resolvers(dns_upstreams));
            let ctx = Arc::new(Ctx {
                node: node.as_str().into(),
                store,
                certs,
                metrics,
                sockets,
                live: Arc::new(LiveConnections::default()),
                hbone: hbone::Config::default(),
                resolvers,
                dns_proxy: !no_dns,
                socks5,
            });
            let ztunnel = Arc::new(Ztunnel::start(ctx).await.context("starting the ztunnel")?);
            let workloads = ztunnel.workload_state().await;
            let _ = state.set(Arc::new(move || {
                serde_json::Map::from_iter([("workloadState".to_owned(), workloads.dump().into())])
            }) as admin::StateDump);
            lifecycle.serving();
            let follower = match (inpod_uds, inpod) {
                (Some(uds), Some(inpod)) => {
                    let ztunnel = ztunnel.clone();
                    tracing::info!(node = %node, uds = %uds.display(), "ztunnel started; ready once the node agent's pods are synced");
                    Some(tokio::spawn(async move {
                        ztunnel::capture::follow_node_agent(&uds, &inpod, &ztunnel, &synced).await
                    }))
                }
                _ => {
                    tracing::info!(node = %node, workloads = ?ztunnel.workloads().await, "ztunnel ready");
                    None
                }
            };
            admin::shutdown_signal(&quit).await;
            lifecycle.draining();
            if let Some(follower) = follower {
                follower.abort();
                let _ = follower.await;
            }
            match Arc::try_unwrap(ztunnel) {
                Ok(z) => z.drain(deadline).await,
                Err(_) => {
                    tracing::warn!("ztunnel still shared at shutdown; connections are closed")
                }
            }
        }
    }
    Ok(())
}

/// How long the drain lasts: as given, else ending ahead of the kill that follows the grace
/// period (a clean close of each connection rather than the kill's reset), else 5 s, as
/// upstream's.
fn drain_deadline(given: Option<Duration>, grace_period: Option<u64>) -> Duration {
    match (given, grace_period) {
        (Some(deadline), _) => deadline,
        (None, Some(secs)) => {
            let ahead = if secs > 10 { 5 } else { 1 };
            Duration::from_secs(secs.saturating_sub(ahead).max(1))
        }
        (None, None) => Duration::from_secs(5),
    }
}

/// A drain deadline: a duration as upstream's `CONNECTION_TERMINATION_DEADLINE` (`10s`).
fn parse_deadline(s: &str) -> Result<Duration, String> {
    mesh::route::parse_duration(s).map_err(|e| e.to_string())
}

/// How long an upstream resolver has to answer a query.
const DNS_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// The resolvers ztunnel asks (for the DNS proxy, and for ServiceEntry endpoints that are DNS
/// names): those given, else `/etc/resolv.conf`'s. Without any, the DNS proxy still answers the
/// mesh's names (and `SERVFAIL` to the rest), and DNS names are unreachable.
fn resolvers(given: Vec<SocketAddr>) -> Forwarder {
    if !given.is_empty() {
        return Forwarder::new(given, DNS_UPSTREAM_TIMEOUT);
    }
    let path = std::path::Path::new("/etc/resolv.conf");
    let forwarder = Forwarder::from_resolv_conf(path, DNS_UPSTREAM_TIMEOUT).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "no DNS resolvers");
        Forwarder::new(Vec::new(), DNS_UPSTREAM_TIMEOUT)
    });
    if forwarder.upstreams().is_empty() {
        tracing::warn!(
            "no DNS resolvers: the DNS proxy answers mesh names only, and ServiceEntry \
             endpoints that are DNS names cannot be reached"
        );
    }
    forwarder
}

/// `ip` (port 53) or `ip:port`.
fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{s:?} is not an IP address or IP:port"))
}

/// The node agent's side: rules in, pods announced, replayed on every reconnect.
async fn cni(uds: &std::path::Path, pods: &[String], dns: bool, ipv6: bool) -> anyhow::Result<()> {
    let mut announced = Vec::new();
    for pod in pods {
        let (workload, netns) = pod
            .split_once('=')
            .context("--pod must be namespace/name=/path/to/netns")?;
        let (namespace, name) = workload
            .split_once('/')
            .context("--pod must be namespace/name=/path/to/netns")?;
        let ns = NetNs::open(netns).with_context(|| format!("opening {netns}"))?;
        PodRules::detect(&ns)
            .map(|rules| rules.capturing_dns(dns).capturing_ipv6(ipv6))
            .and_then(|rules| rules.install(&ns))
            .with_context(|| format!("installing capture rules in {netns}"))?;
        println!("capture rules installed for {workload} ({netns})");
        announced.push((namespace.to_owned(), name.to_owned(), ns));
    }
    let server = ZdsServer::bind(uds).with_context(|| format!("binding {}", uds.display()))?;
    println!("waiting for ztunnel on {}", uds.display());
    loop {
        // One connection that goes wrong must not stop the agent for the ztunnels after it.
        let mut conn = match server.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("accepting a ztunnel: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(e) = replay(&mut conn, &announced).await {
            eprintln!("ztunnel connection failed: {e}");
            continue;
        }
        // Keep the connection until ztunnel goes away, then wait for the next one.
        let _ = conn.closed().await;
    }
}

/// Greets a ztunnel and announces every pod, then the end of the snapshot.
async fn replay(
    conn: &mut ZdsConnection,
    announced: &[(String, String, NetNs)],
) -> Result<(), ZdsError> {
    conn.hello().await?;
    for (namespace, name, ns) in announced {
        let info = WorkloadInfo {
            name: name.clone(),
            namespace: namespace.clone(),
            service_account: String::new(),
        };
        match conn
            .add(format!("{namespace}/{name}"), Some(info), ns)
            .await
        {
            Ok(()) => println!("ztunnel serves {namespace}/{name}"),
            Err(ZdsError::Rejected(why)) => println!("ztunnel refused {namespace}/{name}: {why}"),
            Err(e) => return Err(e),
        }
    }
    conn.snapshot_sent().await
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use super::*;

    #[test]
    fn dns_upstreams_take_port_53_unless_given_one() {
        let parsed = |s: &str| parse_resolver(s).map(|a| a.to_string());
        assert_eq!(parsed("10.96.0.10"), Ok("10.96.0.10:53".to_owned()));
        assert_eq!(parsed("10.96.0.10:5353"), Ok("10.96.0.10:5353".to_owned()));
        assert_eq!(parsed("fd00::a"), Ok("[fd00::a]:53".to_owned()));
        assert!(parsed("kube-dns").is_err());
    }

    #[test]
    fn the_drain_ends_ahead_of_the_grace_periods_kill() {
        let secs = Duration::from_secs;
        assert_eq!(drain_deadline(None, None), secs(5));
        assert_eq!(drain_deadline(None, Some(30)), secs(25));
        assert_eq!(drain_deadline(None, Some(11)), secs(6));
        assert_eq!(drain_deadline(None, Some(10)), secs(9));
        assert_eq!(drain_deadline(None, Some(1)), secs(1));
        assert_eq!(drain_deadline(None, Some(0)), secs(1));
        assert_eq!(drain_deadline(Some(secs(90)), Some(30)), secs(90));
        assert_eq!(parse_deadline("1m30s"), Ok(secs(90)));
        assert!(parse_deadline("30").is_err(), "a unit is required");
    }

    #[test]
    fn worker_threads_choose_the_runtime() {
        let one = runtime(1).expect("runtime");
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let three = runtime(3).expect("runtime");
        assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(three.metrics().num_workers(), 3);
    }

    #[test]
    fn worker_threads_default_to_two_and_refuse_zero() {
        // The declared default, whatever ZTUNNEL_WORKER_THREADS says in this environment.
        let command = <Cli as clap::CommandFactory>::command();
        let arg = command
            .get_arguments()
            .find(|a| a.get_id() == "worker_threads")
            .expect("the option");
        assert_eq!(arg.get_default_values(), ["2"]);
        assert_eq!(
            arg.get_env(),
            Some(std::ffi::OsStr::new("ZTUNNEL_WORKER_THREADS"))
        );
        let run = ["ztunnel", "cni", "--uds", "/x", "--pod", "a/b=/c"];
        let zero = Cli::try_parse_from(run.iter().copied().chain(["--worker-threads", "0"]));
        let error = zero.expect_err("zero workers").to_string();
        assert!(error.contains("--worker-threads"), "{error}");
    }

    #[test]
    fn socks5_is_served_unless_turned_off_as_upstream_names_it() {
        let command = <Cli as clap::CommandFactory>::command();
        let run = command.find_subcommand("run").expect("run");
        let arg = (run.get_arguments())
            .find(|a| a.get_id() == "socks5")
            .expect("the option");
        assert_eq!(arg.get_default_values(), ["true"]);
        assert_eq!(
            arg.get_env(),
            Some(std::ffi::OsStr::new("UNSTABLE_ENABLE_SOCKS5"))
        );
        let run = [
            "ztunnel",
            "run",
            "--config",
            "c",
            "--node",
            "n",
            "--ca-cert",
            "a",
            "--ca-key",
            "k",
            "--socks5",
            "false",
        ];
        let parsed = Cli::try_parse_from(run).expect("parsed");
        assert!(matches!(parsed.command, Command::Run { socks5: false, .. }));
    }
}
