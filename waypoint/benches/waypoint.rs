//! The waypoint in its real position, against direct, ztunnel-only, nginx and haproxy, measured
//! in one run on loopback.
//!
//! Paths (HTTP/1.1 keep-alive clients and backends in this process; ztunnels in this process
//! on their own runtime; the waypoint, nginx and haproxy as their own processes):
//! * direct:   client → backend
//! * ztunnel:  client → SOCKS5 on the client's ztunnel → HBONE → backend's ztunnel → backend
//! * waypoint: client → client ztunnel → HBONE → waypoint (HTTP routing) → HBONE → backend's
//!   ztunnel → backend
//! * nginx, haproxy: client → proxy (plain HTTP reverse proxy, upstream keep-alive) → backend
//!
//! Figures: requests per second with 8 keep-alive connections (and, on the waypoint path,
//! with 32 streams on one h2c connection); CPU time per request of the
//! waypoint, nginx and haproxy processes (from their CPU-time clocks, during that phase); latency p50/p99 of
//! requests at a fixed rate on one connection, from each request's scheduled start; waypoint
//! RSS with 10, 1,000 and 10,000 routes (separate processes) and bytes per route; the time
//! for a changed route to take effect with 10,000 routes loaded, under load, and how many
//! requests failed meanwhile.
//! Run with `cargo bench -p waypoint`; `WAYPOINT_BENCH_QUICK=1` shortens every phase (a smoke
//! run). nginx and haproxy rows are skipped when the binaries are not installed.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hbone::{CertManager, MeshCa};
use mesh::model::Protocol;
use mesh::{ConfigDir, Options, Store};
use ztunnel::Ztunnel;
use ztunnel::proxy::Ctx;
use ztunnel::proxy::live::LiveConnections;
use ztunnel::socket::Loopback;

#[path = "../../ztunnel/benches/support/procfs.rs"]
mod procfs;

const CLIENT: &str = "127.52.1.1";
const SERVER_1: &str = "127.52.2.1";
const SERVER_2: &str = "127.52.2.2";
/// Serves the ztunnel-only service (endpoints of a waypoint-bound service accept only the
/// waypoint).
const SERVER_3: &str = "127.52.2.3";
const WAYPOINT: &str = "127.52.3.1";
const PROXIES: &str = "127.52.5.1";
/// The service bound to the waypoint, and the same endpoints without it.
const VIA_WAYPOINT: &str = "10.52.0.1";
const L4_ONLY: &str = "10.52.0.2";
const BACKEND_PORT: u16 = 8080;

struct Scale {
    seconds: u64,
    rate: u64,
    connections: usize,
}

fn main() {
    // `RUST_LOG=warn` shows what the in-process ztunnels refused, if anything. By default their
    // access log is off: stopping the waypoint process ends its tunnels without TLS
    // close_notify, which the ztunnels would log as errors, one per tunnel.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,access=off"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let quick = std::env::var_os("WAYPOINT_BENCH_QUICK").is_some();
    let scale = if quick {
        Scale {
            seconds: 1,
            rate: 500,
            connections: 8,
        }
    } else {
        Scale {
            seconds: 5,
            rate: 500,
            connections: 8,
        }
    };
    let dir = std::env::temp_dir().join(format!("waypoint-bench-{}", std::process::id()));
    let ca = MeshCa::generate("cluster.local").expect("ca");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("ca.pem"), ca.root_pem()).expect("write");
    std::fs::write(dir.join("ca.key"), ca.key_pem()).expect("write");
    let config = dir.join("config");
    write_mesh(&config);

    for (name, addr) in [
        ("server-1", SERVER_1),
        ("server-2", SERVER_2),
        ("server-3", SERVER_3),
    ] {
        spawn_backend(SocketAddr::new(ip(addr), BACKEND_PORT), name);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _ztunnels = runtime.block_on(start_ztunnels(&config, ca));
    let mut waypoint = Process::waypoint(&dir, &config, WAYPOINT, "127.52.3.1");
    let nginx = Process::nginx(&dir);
    let haproxy = Process::haproxy(&dir);

    let backend = SocketAddr::new(ip(SERVER_1), BACKEND_PORT);
    let direct = || connect_from(ip(CLIENT), backend);
    let l4 = || via_socks(SocketAddr::new(ip(L4_ONLY), 80));
    let wp = || via_socks(SocketAddr::new(ip(VIA_WAYPOINT), 80));

    println!("waypoint benchmark (loopback, 2-core machine; clients, backends and ztunnels share");
    println!("the machine with the proxy under test)");
    println!();
    println!(
        "{:>30}  {:>10}  {:>12}  {:>12}  {:>14}",
        "path", "req/s", "p50 µs", "p99 µs", "proxy CPU µs/req"
    );
    let direct_row = measure("direct", &direct, None, &scale);
    measure("ztunnel → ztunnel", &l4, None, &scale);
    let wp_row = measure("ztunnel → waypoint → ztunnel", &wp, Some(&waypoint), &scale);
    let h2_row = measure_h2(
        &format!("same, h2c, 1 conn × {H2_STREAMS} streams"),
        &wp,
        &waypoint,
        &scale,
    );
    let mut others = Vec::new();
    for (name, proc, port) in [("nginx", &nginx, 8081), ("haproxy", &haproxy, 8082)] {
        match proc {
            Some(p) => {
                let open = || connect_from(ip(CLIENT), SocketAddr::new(ip(PROXIES), port));
                others.push((name, measure(name, &open, Some(p), &scale)));
            }
            None => println!("{name:>30}  (not installed; skipped)"),
        }
    }
    println!();

    // The same waypoint path with Wasm plugins on the Gateway, one configuration at a time.
    println!("with a WasmPlugin on the waypoint (same process, reloaded between rows):");
    let mut plugin_rows = Vec::new();
    for (name, module, body) in [
        ("no-op plugin", Some("noop"), false),
        ("header plugin (add_header)", Some("add_header"), false),
        ("no plugin, 1 KiB POST", None, true),
        (
            "body plugin (body_inspect), 1 KiB POST",
            Some("body_inspect"),
            true,
        ),
    ] {
        set_plugin(&config, module);
        WITH_BODY.store(body, Ordering::Relaxed);
        wait_for_plugin(&wp, module);
        plugin_rows.push((name, measure(name, &wp, Some(&waypoint), &scale)));
    }
    set_plugin(&config, None);
    WITH_BODY.store(false, Ordering::Relaxed);
    wait_for_plugin(&wp, None);
    println!();
    let host = plugin_host_costs(quick);

    // Memory per route, each count in a fresh process.
    let counts: &[usize] = if quick {
        &[10, 1000]
    } else {
        &[10, 1000, 10_000]
    };
    let mut rss = Vec::new();
    for (i, &n) in counts.iter().enumerate() {
        let config = dir.join(format!("config-{n}"));
        write_mesh(&config);
        write_routes(&config, n, "backend-1");
        let addr = format!("127.52.4.{}", i + 1);
        let mut p = Process::waypoint(&dir, &config, &addr, &addr);
        std::thread::sleep(Duration::from_millis(500));
        rss.push((n, p.rss()));
        p.stop();
    }

    // A route change with 10,000 routes loaded, under load.
    let routes = if quick { 1000 } else { 10_000 };
    write_routes(&config, routes, "backend-1");
    wait_for(&wp, &format!("/r{}/", routes - 1), "server-1");
    let (apply, failed, served) = route_change(&config, routes, &wp);

    for (name, row) in &others {
        if let (Some(wp_cpu), Some(cpu)) = (wp_row.cpu, row.cpu) {
            println!(
                "{:>44}: {:9.2}",
                format!("waypoint CPU per request / {name}'s"),
                wp_cpu / cpu
            );
        }
    }
    println!(
        "{:>44}: {:9.2}",
        "waypoint path req/s / direct",
        wp_row.rps / direct_row.rps
    );
    println!(
        "{:>44}: {:9.1} µs p50, {:.1} µs p99",
        "added latency, waypoint path vs direct",
        wp_row.p50 - direct_row.p50,
        wp_row.p99 - direct_row.p99
    );
    println!(
        "{:>44}: {:9.2} req/s ratio, {:.2} CPU ratio",
        "h2c downstream / HTTP/1.1 (waypoint path)",
        h2_row.rps / wp_row.rps,
        h2_row.cpu.zip(wp_row.cpu).map_or(f64::NAN, |(a, b)| a / b)
    );
    if let Some(cpu) = wp_row.cpu {
        verdict(
            "waypoint CPU per request, both TLS legs (µs)",
            cpu,
            "≤ 125",
            cpu <= 125.0,
        );
    }
    let delta = |base: &Row, row: &Row| {
        (
            row.cpu.zip(base.cpu).map(|(a, b)| a - b),
            row.p50 - base.p50,
        )
    };
    for (i, (name, row)) in plugin_rows.iter().enumerate() {
        let base = if i < 2 { &wp_row } else { &plugin_rows[2].1 };
        if std::ptr::eq(base, row) {
            continue;
        }
        let (cpu, p50) = delta(base, row);
        println!(
            "{:>44}: {} µs CPU/req, {:+.1} µs p50",
            format!("added by the {name}"),
            cpu.map_or("-".to_owned(), |c| format!("{c:+.1}")),
            p50
        );
    }
    println!(
        "{:>44}: {:9.1} ms",
        format!(
            "module compile (add_header, {} KB)",
            host.module_bytes / 1000
        ),
        host.compile.as_secs_f64() * 1e3
    );
    println!(
        "{:>44}: {:9.1} µs",
        "instance start (_initialize + root context)",
        host.start.as_secs_f64() * 1e6
    );
    println!(
        "{:>44}: {:9.2} µs",
        "no-op plugin, host CPU per request",
        host.noop_per_request * 1e6
    );
    verdict(
        "header plugin, host CPU per request (µs)",
        host.header_per_request * 1e6,
        "≤ 5",
        host.header_per_request <= 5e-6,
    );
    for &(n, bytes) in &rss {
        println!(
            "{:>44}: {:9.1} MB",
            format!("waypoint RSS with {n} routes"),
            bytes as f64 / 1e6
        );
    }
    if let Some(&(_, at_1000)) = rss.iter().find(|(n, _)| *n == 1000) {
        verdict(
            "waypoint RSS with 1,000 routes (MB)",
            at_1000 as f64 / 1e6,
            "≤ 60",
            at_1000 <= 60_000_000,
        );
    }
    if let (Some(&(n0, r0)), Some(&(n1, r1))) = (rss.first(), rss.last()) {
        let per_route = r1.saturating_sub(r0) as f64 / (n1 - n0) as f64;
        verdict(
            "RSS per route (KiB)",
            per_route / 1024.0,
            "≤ 10",
            per_route <= 10.0 * 1024.0,
        );
    }
    verdict(
        &format!("route change applied at {routes} routes (ms)"),
        apply.as_secs_f64() * 1e3,
        "≤ 100",
        apply <= Duration::from_millis(100),
    );
    verdict(
        &format!("failed requests during the change (of {served})"),
        failed as f64,
        "0",
        failed == 0,
    );
    if quick {
        println!("\n(quick run: short phases and fewer routes; figures are not comparable)");
    }
    waypoint.stop();
    for mut p in [nginx, haproxy].into_iter().flatten() {
        p.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes (or, with `None`, removes) a WasmPlugin running example `module` on the Gateway.
fn set_plugin(config: &Path, module: Option<&str>) {
    let file = config.join("plugin.yaml");
    let Some(module) = module else {
        let _ = std::fs::remove_file(&file);
        return;
    };
    let plugin_config = match module {
        "add_header" => "{headers: {x-bench: added}}",
        "body_inspect" => "{deny: [DROP TABLE]}",
        _ => "{}",
    };
    let yaml = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: bench, namespace: bench}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  url: file://{}\n  pluginConfig: {plugin_config}\n",
        example_plugin(module).display()
    );
    let tmp = config.join(".plugin.tmp");
    std::fs::write(&tmp, yaml).expect("write");
    std::fs::rename(tmp, file).expect("rename");
}

/// Waits until responses show that the plugin configuration took effect: every example but the
/// no-op one adds a response header; the no-op and plugin-less states get a fixed settle time.
fn wait_for_plugin(open: &dyn Fn() -> TcpStream, module: Option<&str>) {
    let marker = match module {
        Some("add_header") => Some("x-bench: added"),
        Some("body_inspect") => Some("x-body-bytes"),
        _ => None,
    };
    let Some(marker) = marker else {
        std::thread::sleep(Duration::from_secs(2));
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = open();
    loop {
        let mut head = String::new();
        let _ = get_head(&mut s, &mut head);
        if head.to_ascii_lowercase().contains(marker) {
            return;
        }
        assert!(Instant::now() < deadline, "the plugin never took effect");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Like [`get`], keeping the response head.
fn get_head(s: &mut TcpStream, head: &mut String) -> std::io::Result<()> {
    if WITH_BODY.load(Ordering::Relaxed) {
        let mut request = format!(
            "POST / HTTP/1.1\r\nhost: backend.bench\r\ncontent-length: {}\r\n\r\n",
            BODY.len()
        )
        .into_bytes();
        request.extend_from_slice(&BODY);
        s.write_all(&request)?;
    } else {
        s.write_all(b"GET / HTTP/1.1\r\nhost: backend.bench\r\n\r\n")?;
    }
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        raw.push(byte[0]);
    }
    *head = String::from_utf8_lossy(&raw).into_owned();
    let length = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body)
}

fn example_plugin(name: &str) -> PathBuf {
    plugins::examples::build(name)
}

/// What the plugin host itself costs, measured in this process.
struct HostCosts {
    /// Size of the module compiled.
    module_bytes: usize,
    compile: Duration,
    start: Duration,
    noop_per_request: f64,
    header_per_request: f64,
}

/// Compile and instance-start times, and CPU per request of a plugin on a reused instance: a
/// stream context through request headers, response headers and its end, over the header maps
/// of a typical request (built per request, as the waypoint does).
fn plugin_host_costs(quick: bool) -> HostCosts {
    use plugins::{Headers, Host, NoCalls, NodeInfo, PluginConfig, StreamInfo};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bytes = std::fs::read(example_plugin("add_header")).expect("module");
    let host = Host::new(NodeInfo::default(), Arc::new(NoCalls)).expect("host");
    let t = Instant::now();
    let module = host.compile(&bytes).expect("compile");
    let compile = t.elapsed();
    let config = |name: &str, json: &str| {
        let mut c = PluginConfig::new(format!("bench.{name}"), name, json.as_bytes().to_vec());
        c.instances = 1;
        c
    };
    let t = Instant::now();
    let header = host
        .load(
            &module,
            config("add_header", r#"{"headers": {"x-bench": "added"}}"#),
        )
        .expect("load");
    let start = t.elapsed();
    let noop_module = host
        .compile(&std::fs::read(example_plugin("noop")).expect("module"))
        .expect("compile");
    let noop = host.load(&noop_module, config("noop", "")).expect("load");
    let requests = if quick { 20_000 } else { 200_000 };
    let info = Arc::new(StreamInfo::new(
        SocketAddr::new(ip(CLIENT), 40000),
        SocketAddr::new(ip(VIA_WAYPOINT), 80),
        Some("spiffe://cluster.local/ns/bench/sa/client".into()),
    ));
    let per_request = |plugin: &plugins::Plugin| {
        runtime.block_on(async {
            let cpu0 = thread_cpu();
            for _ in 0..requests {
                let mut stream = plugin.stream(info.clone()).expect("stream");
                let mut req = Headers::new();
                for (n, v) in [
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "backend.bench"),
                    ("user-agent", "bench"),
                    ("accept", "*/*"),
                ] {
                    req.push(n, v);
                }
                stream.request_headers(&mut req, true).await;
                let mut resp = Headers::new();
                resp.push(":status", "200");
                resp.push("content-length", "8");
                resp.push("content-type", "text/plain");
                stream.response_headers(&mut resp, false).await;
            }
            (thread_cpu() - cpu0).as_secs_f64() / requests as f64
        })
    };
    let noop_per_request = per_request(&noop);
    let header_per_request = per_request(&header);
    HostCosts {
        module_bytes: bytes.len(),
        compile,
        start,
        noop_per_request,
        header_per_request,
    }
}

/// CPU time of the calling thread, to the nanosecond.
fn thread_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).expect("clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

struct Row {
    rps: f64,
    p50: f64,
    p99: f64,
    cpu: Option<f64>,
}

fn measure(
    name: &str,
    open: &(dyn Fn() -> TcpStream + Sync),
    proxy: Option<&Process>,
    scale: &Scale,
) -> Row {
    let cpu0 = proxy.map(Process::cpu);
    let (requests, elapsed) = load(open, scale.connections, Duration::from_secs(scale.seconds));
    let rps = requests as f64 / elapsed.as_secs_f64();
    let cpu = proxy
        .zip(cpu0)
        .map(|(p, c0)| (p.cpu() - c0).as_secs_f64() * 1e6 / requests as f64);
    let (p50, p99) = latency(open(), scale.rate, scale.seconds);
    let cpu_text = cpu.map_or("-".to_owned(), |c| format!("{c:.1}"));
    println!("{name:>30}  {rps:>10.0}  {p50:>12.1}  {p99:>12.1}  {cpu_text:>14}");
    Row { rps, p50, p99, cpu }
}

/// Concurrent streams of the h2c client: as many requests in flight as the HTTP/1.1 clients
/// have, times four, on one connection.
const H2_STREAMS: usize = 32;

/// Requests per second and the waypoint's CPU per request for [`H2_STREAMS`] closed-loop
/// streams on one prior-knowledge HTTP/2 connection, as a gRPC or h2 client would load it.
fn measure_h2(
    name: &str,
    open: &(dyn Fn() -> TcpStream + Sync),
    proxy: &Process,
    scale: &Scale,
) -> Row {
    let stream = open();
    stream.set_nonblocking(true).expect("nonblocking");
    let cpu0 = proxy.cpu();
    let duration = Duration::from_secs(scale.seconds);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (requests, elapsed) = runtime.block_on(async move {
        let io = tokio::net::TcpStream::from_std(stream).expect("tokio stream");
        let (client, connection) = h2::client::handshake(io).await.expect("h2c handshake");
        tokio::spawn(async move { connection.await.expect("h2 connection") });
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut streams = tokio::task::JoinSet::new();
        for _ in 0..H2_STREAMS {
            let (mut client, done) = (client.clone(), done.clone());
            streams.spawn(async move {
                while started.elapsed() < duration {
                    client = client.ready().await.expect("h2 capacity");
                    let request = http::Request::get("http://backend.bench/")
                        .body(())
                        .expect("request");
                    let (response, _) = client.send_request(request, true).expect("send");
                    let response = response.await.expect("response");
                    assert_eq!(response.status(), 200);
                    let mut body = response.into_body();
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.expect("body");
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while let Some(joined) = streams.join_next().await {
            joined.expect("stream task");
        }
        (done.load(Ordering::Relaxed), started.elapsed())
    });
    let rps = requests as f64 / elapsed.as_secs_f64();
    let cpu = (proxy.cpu() - cpu0).as_secs_f64() * 1e6 / requests as f64;
    println!(
        "{name:>30}  {rps:>10.0}  {:>12}  {:>12}  {cpu:>14.1}",
        "-", "-"
    );
    Row {
        rps,
        p50: f64::NAN,
        p99: f64::NAN,
        cpu: Some(cpu),
    }
}

fn verdict(what: &str, value: f64, target: &str, ok: bool) {
    let mark = if ok { "ok" } else { "MISSED" };
    println!("{what:>44}: {value:9.2}   target {target:>6}   {mark}");
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The mesh: client on node-a, two backends on node-b, the waypoint pod, and three services:
/// `backend` (bound to the waypoint), `l4` (same endpoints, no waypoint), `backend-1`/`-2`.
fn write_mesh(config: &Path) {
    std::fs::create_dir_all(config).expect("mkdir");
    let svc = |name: &str, vip: &str, selector: &str, waypoint: bool| {
        let labels = if waypoint {
            ", labels: {istio.io/use-waypoint: waypoint}"
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench{labels}}}\nspec: {{clusterIP: {vip}, selector: {{{selector}}}, ports: [{{name: http, port: 80, targetPort: {BACKEND_PORT}}}]}}\n---\n"
        )
    };
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: bench}\nspec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n",
    );
    yaml.push_str(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: waypoint-0, namespace: bench, labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}}}\nspec: {{nodeName: node-w, serviceAccountName: waypoint}}\nstatus: {{podIP: {WAYPOINT}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: bench}}\nspec: {{nodeName: node-a, serviceAccountName: client}}\nstatus: {{podIP: {CLIENT}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: server-1, namespace: bench, labels: {{app: server, n: \"1\"}}}}\nspec: {{nodeName: node-b, serviceAccountName: server}}\nstatus: {{podIP: {SERVER_1}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: server-2, namespace: bench, labels: {{app: server, n: \"2\"}}}}\nspec: {{nodeName: node-b, serviceAccountName: server}}\nstatus: {{podIP: {SERVER_2}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: server-3, namespace: bench, labels: {{app: l4}}}}\nspec: {{nodeName: node-b, serviceAccountName: server}}\nstatus: {{podIP: {SERVER_3}}}\n---\n"
    ));
    yaml.push_str(&svc("backend", VIA_WAYPOINT, "app: server, n: \"1\"", true));
    yaml.push_str(&svc("l4", L4_ONLY, "app: l4", false));
    yaml.push_str(&svc(
        "backend-1",
        "10.52.0.11",
        "app: server, n: \"1\"",
        false,
    ));
    yaml.push_str(&svc(
        "backend-2",
        "10.52.0.12",
        "app: server, n: \"2\"",
        false,
    ));
    std::fs::write(config.join("mesh.yaml"), yaml).expect("write");
}

/// `n` HTTPRoutes on `backend`, `/r<i>/` each, in files of 100 (as GitOps tools write them).
fn write_routes(config: &Path, n: usize, first_backend: &str) {
    let routes = config.join("routes");
    std::fs::create_dir_all(&routes).expect("mkdir");
    for file in 0..n.div_ceil(100) {
        let mut yaml = String::new();
        for i in file * 100..((file + 1) * 100).min(n) {
            let backend = if i == 0 { first_backend } else { "backend-1" };
            let _ = write!(
                yaml,
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{i}, namespace: bench}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: backend, port: 80}}]\n  rules: [{{matches: [{{path: {{type: PathPrefix, value: /r{i}/}}}}], backendRefs: [{{name: {backend}, port: 80}}]}}]\n---\n"
            );
        }
        let tmp = routes.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(tmp, routes.join(format!("{file:04}.yaml"))).expect("rename");
    }
}

async fn start_ztunnels(config: &Path, ca: MeshCa) -> Vec<Ztunnel> {
    let mut dir = ConfigDir::new(config, Options::default());
    let store = Store::open(&mut dir).expect("config");
    let snapshot = store.load();
    let ca = Arc::new(ca);
    let nodes: BTreeSet<String> = snapshot
        .workloads()
        .iter()
        .filter(|w| w.protocol == Protocol::Hbone)
        .filter_map(|w| w.node.as_deref().map(str::to_owned))
        .collect();
    let live = Arc::new(LiveConnections::default());
    let metrics = Arc::new(ztunnel::metrics::Metrics::default());
    let mut out = Vec::new();
    for node in nodes {
        let ctx = Arc::new(Ctx {
            node: node.as_str().into(),
            store: store.clone(),
            certs: Arc::new(CertManager::new(ca.clone())),
            metrics: metrics.clone(),
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
        out.push(Ztunnel::start(ctx).await.expect("ztunnel"));
    }
    out
}

struct Process {
    child: Child,
}

impl Process {
    fn waypoint(dir: &Path, config: &Path, address: &str, admin_ip: &str) -> Self {
        // `WAYPOINT_BENCH_LOG=info` shows what the waypoint did (reload timings included).
        let log = std::env::var("WAYPOINT_BENCH_LOG").ok();
        let child = Command::new(env!("CARGO_BIN_EXE_waypoint"))
            .args(["--log", log.as_deref().unwrap_or("error")])
            .args(["--admin", &format!("{admin_ip}:15000")])
            .args(["--metrics", &format!("{admin_ip}:15020")])
            .args(["--readiness", &format!("{admin_ip}:15021")])
            .arg("run")
            .args(["--config", &path(config)])
            .args(["--gateway", "bench/waypoint"])
            .args(["--ca-cert", &path(&dir.join("ca.pem"))])
            .args(["--ca-key", &path(&dir.join("ca.key"))])
            .args(["--address", address])
            .stdout(if log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start waypoint");
        let ready = SocketAddr::new(ip(admin_ip), 15021);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut s) = TcpStream::connect(ready) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(
                    b"GET /healthz/ready HTTP/1.1\r\nhost: w\r\nconnection: close\r\n\r\n",
                );
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.1 200") {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "waypoint did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child }
    }

    fn nginx(dir: &Path) -> Option<Self> {
        let binary = procfs::which("nginx")?;
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log stderr error;\npid {pid};\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n\
                 upstream backend {{ server {SERVER_1}:{BACKEND_PORT}; keepalive 32; }}\n\
                 server {{ listen {PROXIES}:8081; location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n",
                pid = path(&dir.join("nginx.pid")),
                tmp = path(dir),
            ),
        )
        .ok()?;
        let child = Command::new(binary)
            .args(["-c", &path(&conf), "-e", "stderr"])
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        wait_listening(SocketAddr::new(ip(PROXIES), 8081));
        Some(Self { child })
    }

    fn haproxy(dir: &Path) -> Option<Self> {
        let binary = procfs::which("haproxy")?;
        let conf = dir.join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
                 frontend f\n  bind {PROXIES}:8082\n  default_backend b\n\
                 backend b\n  server s1 {SERVER_1}:{BACKEND_PORT}\n"
            ),
        )
        .ok()?;
        let child = Command::new(binary)
            .args(["-db", "-f", &path(&conf)])
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        wait_listening(SocketAddr::new(ip(PROXIES), 8082));
        Some(Self { child })
    }

    fn rss(&self) -> u64 {
        procfs::rss(self.child.id())
    }

    fn cpu(&self) -> Duration {
        procfs::cpu(self.child.id())
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    /// A failed run must not leave proxies behind.
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect_from(src: IpAddr, dst: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::new(src, 0).into()).expect("bind");
    socket.connect(&dst.into()).expect("connect");
    let s: TcpStream = socket.into();
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Through the client's SOCKS5 port, leaving from the client's address.
fn via_socks(addr: SocketAddr) -> TcpStream {
    let mut s = connect_from(ip(CLIENT), SocketAddr::new(ip(CLIENT), 15080));
    let IpAddr::V4(v4) = addr.ip() else {
        panic!("v4 only")
    };
    let mut req = vec![5, 1, 0, 5, 1, 0, 1];
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&addr.port().to_be_bytes());
    s.write_all(&req).expect("socks request");
    let mut reply = [0u8; 12];
    s.read_exact(&mut reply).expect("socks reply");
    assert_eq!(reply[3], 0, "SOCKS5 refused the benchmark connection");
    s
}

/// Requests carry a 1 KiB body (POST) instead of none (GET): for the body plugin's phase.
static WITH_BODY: AtomicBool = AtomicBool::new(false);
const BODY: [u8; 1024] = [b'a'; 1024];

/// One keep-alive GET (or POST, see [`WITH_BODY`]); returns the status and the body (the
/// backend's name).
fn get(s: &mut TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    if WITH_BODY.load(Ordering::Relaxed) {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: backend.bench\r\ncontent-length: {}\r\n\r\n",
            BODY.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&BODY);
        s.write_all(&request)?;
    } else {
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: backend.bench\r\n\r\n").as_bytes())?;
    }
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Requests completed by `connections` closed-loop clients in `duration`.
fn load(
    open: &(dyn Fn() -> TcpStream + Sync),
    connections: usize,
    duration: Duration,
) -> (u64, Duration) {
    let done = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..connections {
            scope.spawn(|| {
                let mut s = open();
                while started.elapsed() < duration {
                    let (status, _) = get(&mut s, "/").expect("request");
                    assert_eq!(status, 200);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    (done.load(Ordering::Relaxed), started.elapsed())
}

/// p50 and p99 in µs of GETs at `rate` per second on one connection, from each scheduled start.
fn latency(mut s: TcpStream, rate: u64, seconds: u64) -> (f64, f64) {
    for _ in 0..100 {
        get(&mut s, "/").expect("warm-up");
    }
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now();
    let mut samples = Vec::with_capacity((rate * seconds) as usize);
    for i in 0..rate * seconds {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        get(&mut s, "/").expect("request");
        samples.push(due.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.5), at(0.99))
}

/// Polls `path` until `backend` answers it.
fn wait_for(open: &dyn Fn() -> TcpStream, path: &str, backend: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = open();
    loop {
        match get(&mut s, path) {
            Ok((200, body)) if body == backend => return,
            Ok(_) => {}
            Err(_) => s = open(),
        }
        assert!(Instant::now() < deadline, "{path} never reached {backend}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Changes `/r0/` from backend-1 to backend-2 while clients keep requesting; returns how long
/// until the change was seen, how many requests failed, and how many were served.
fn route_change(
    config: &Path,
    routes: usize,
    open: &(dyn Fn() -> TcpStream + Sync),
) -> (Duration, u64, u64) {
    let stop = AtomicBool::new(false);
    let (failed, served) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (stop, failed, served) = (&stop, &failed, &served);
            scope.spawn(move || {
                let mut s = open();
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i = (i * 7919 + 1) % routes;
                    match get(&mut s, &format!("/r{i}/x")) {
                        Ok((200, _)) => served.fetch_add(1, Ordering::Relaxed),
                        _ => {
                            s = open();
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut probe = open();
        let changed = Instant::now();
        write_routes(config, routes.min(100), "backend-2");
        let apply = loop {
            if let Ok((200, body)) = get(&mut probe, "/r0/") {
                if body == "server-2" {
                    break changed.elapsed();
                }
            } else {
                probe = open();
            }
            assert!(
                changed.elapsed() < Duration::from_secs(60),
                "change never applied"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        (
            apply,
            failed.load(Ordering::Relaxed),
            served.load(Ordering::Relaxed),
        )
    })
}

/// A keep-alive HTTP/1.1 backend that answers every request with its name.
fn spawn_backend(addr: SocketAddr, name: &'static str) {
    let listener = std::net::TcpListener::bind(addr).expect("bind backend");
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || serve(s, name));
        }
    });
}

fn serve(mut s: TcpStream, name: &str) {
    let _ = s.set_nodelay(true);
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{name}",
        name.len()
    );
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = Vec::new();
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        // Each head, plus its content-length worth of body, is one request.
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if pending.len() < end + 4 + length {
                break;
            }
            pending.drain(..end + 4 + length);
            if s.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }
}
