//! Two real ztunnel processes against a direct connection, measured in one run, on two
//! topologies: loopback (every address a 127.x address of this machine), and two network
//! namespaces joined by a veth pair (each "node" its own namespace and stack, packets crossing
//! a 1500-byte-MTU link, as between pods on two nodes; needs root, skipped without it).
//!
//! Data flows (client and servers in this process, each ztunnel its own process started from
//! the `ztunnel` binary, one per "node"):
//! * direct: client → server
//! * mesh:   client → SOCKS5 on the client's ztunnel (node-a) → HBONE (mTLS, HTTP/2) → the
//!   server's ztunnel (node-b) → server
//! * relays: client → haproxy in TCP mode (node-a) → haproxy in TCP mode (node-b) → server, the
//!   same two process hops with nothing but a byte copy in them, as a production proxy does it
//!   (skipped when haproxy is not installed)
//! * copiers: the same two hops through the least a relay can be, this binary started again as a
//!   process that gives each direction of a connection a thread doing blocking reads and writes
//!   of up to 256 KiB (`copier`): no event loop, no parsing, no encryption. What it costs is
//!   about the least that two more process hops cost on this machine: a proxy in their place
//!   answers about as soon at best (haproxy does, within the noise), and one that must read the
//!   bytes (to encrypt them) cannot move them with much less work
//!
//! Figures: single-stream throughput; 1 KiB request/response latency (p50, p99) at a fixed rate
//! on one connection, measured from each request's scheduled time; new connections per second
//! (connect, one 1 KiB exchange, close); CPU time of each ztunnel process per request (from its
//! CPU-time clock, during the latency phase); RSS of each ztunnel idle and per 1,000 open connections.
//! The ztunnels run with their default two workers, then again with one worker each
//! (`--worker-threads 1`, a current-thread runtime) for throughput, latency and CPU, on their
//! own once the others are measured (they take the same addresses). As a
//! diagnostic, the ztunnels and the relays are measured again with their threads scheduled
//! `SCHED_BATCH` (through `chrt`), which takes the wake-up preemptions out of each hop (see
//! `Process::batch`).
//! For the relays and the copiers: throughput, latency and CPU per request, and what the ztunnels
//! add over them. Direct, the ztunnels, the relays and the copiers are measured in turns (each
//! transfer, and each second of exchanges, in alternation), so what else the host does falls on
//! them alike, and the client sleeps to each request's due time with a timer slack of 1 ns.
//! Run with `cargo bench -p ztunnel`; `ZTUNNEL_BENCH_QUICK=1` shortens every phase (a smoke run).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ztunnel::inpod::NetNs;

#[path = "../tests/support/fabric.rs"]
mod fabric;
#[path = "support/procfs.rs"]
mod procfs;
use fabric::sh;

const SINK: u16 = 9001;
const ECHO: u16 = 9002;
/// ztunnel's own default, stated so the figures say what they measured.
const DEFAULT_WORKERS: u16 = 2;
/// The relays' ports: node-a's haproxy listens on `RELAY + port` and forwards to node-b's on
/// `RELAY + 100 + port`, which forwards to the server's `port`.
const RELAY: u16 = 1000;
/// The copiers' ports, laid out as the relays'.
const COPIER: u16 = 2000;
/// When set, this binary is a copier: `listen>next` pairs, comma-separated.
const COPIER_ROUTES: &str = "ZTUNNEL_BENCH_COPIER";

struct Scale {
    bulk: u64,
    seconds: u64,
    rate: u64,
    connects: usize,
    open: usize,
}

/// Where the client and the server are, and the namespaces their nodes live in (none: this
/// machine's, on loopback).
struct Topology {
    name: &'static str,
    client: IpAddr,
    server: IpAddr,
    /// Admin addresses of the two ztunnels (in their nodes' namespaces).
    admin: [IpAddr; 2],
    nodes: Option<[Node; 2]>,
}

fn main() {
    if let Ok(routes) = std::env::var(COPIER_ROUTES) {
        return copier(&routes);
    }
    let quick = std::env::var_os("ZTUNNEL_BENCH_QUICK").is_some();
    let scale = if quick {
        Scale {
            bulk: 64 << 20,
            seconds: 1,
            rate: 1000,
            connects: 200,
            open: 200,
        }
    } else {
        Scale {
            bulk: 1 << 30,
            seconds: 5,
            rate: 1000,
            connects: 2000,
            open: 1000,
        }
    };
    println!("ztunnel benchmark (two ztunnel processes, 2-core machine)");
    let loopback = Topology {
        name: "loopback",
        client: ip("127.40.1.1"),
        server: ip("127.40.2.1"),
        admin: [ip("127.40.0.1"), ip("127.40.0.2")],
        nodes: None,
    };
    measure(&loopback, &scale);
    if is_root() {
        let tag = std::process::id() % 10_000;
        let veth = Topology {
            name: "veth pair between two namespaces",
            client: ip("10.77.0.1"),
            server: ip("10.77.0.2"),
            admin: [ip("127.0.0.1"), ip("127.0.0.1")],
            nodes: Some(Node::pair(tag, "10.77.0.1", "10.77.0.2")),
        };
        measure(&veth, &scale);
    } else {
        println!("\n(not root: the veth topology needs network namespaces; skipped)");
    }
    if quick {
        println!("\n(quick run: short phases; figures are not comparable)");
    }
}

/// Every figure on one topology, printed with its verdicts.
fn measure(top: &Topology, scale: &Scale) {
    let dir = std::env::temp_dir().join(format!("ztunnel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    write_config(&dir, top);
    // Server threads live until the process exits.
    spawn_sink(top);
    spawn_echo(top);
    let node = |i: usize| top.nodes.as_ref().map(|n| &n[i]);
    let ztunnels = |workers: u16| {
        (
            Process::ztunnel(&dir, "node-a", top.admin[0], node(0), workers),
            Process::ztunnel(&dir, "node-b", top.admin[1], node(1), workers),
        )
    };
    let (mut a, mut b) = ztunnels(DEFAULT_WORKERS);
    let relays = Process::relays(&dir, top, Relay::Haproxy);
    let copiers = Process::relays(&dir, top, Relay::Copier);
    std::thread::sleep(Duration::from_millis(300));
    let idle = (a.rss(), b.rss());

    let direct_to = |port| direct(top, SocketAddr::new(top.server, port));
    let mesh_to = |port| via_mesh(top, SocketAddr::new(top.server, port));
    let haproxy_to = |port| via_relays(top, Relay::Haproxy, port);
    let copier_to = |port| via_relays(top, Relay::Copier, port);
    // Direct, the ztunnels, the relays if there are, and `copiers` if given, compared in turns:
    // the figures of each, in that order.
    let compared = |copiers: Option<&(Process, Process)>| {
        let mut ways = vec![Way::direct(&direct_to), Way::through((&a, &b), &mesh_to)];
        ways.extend((relays.as_ref()).map(|(ra, rb)| Way::through((ra, rb), &haproxy_to)));
        ways.extend(copiers.map(|(ca, cb)| Way::through((ca, cb), &copier_to)));
        let mut figures = compare(&ways, scale).into_iter();
        let (direct, mesh) = (figures.next(), figures.next());
        let relayed = relays.as_ref().and_then(|_| figures.next());
        let copied = copiers.and_then(|_| figures.next());
        (
            direct.expect("direct"),
            mesh.expect("mesh"),
            relayed,
            copied,
        )
    };
    let (direct, mesh, relayed, copied) = compared(copiers.as_ref());

    let direct_cps = connects(|| direct_to(ECHO), scale.connects);
    let mesh_cps = connects(|| mesh_to(ECHO), scale.connects);

    // A diagnostic of what the wake-ups cost: the same processes with every thread scheduled
    // SCHED_BATCH (see `batch`).
    let batch = procfs::which("chrt").and_then(|chrt| {
        let mut all = vec![&a, &b];
        all.extend(relays.iter().flat_map(|(ra, rb)| [ra, rb]));
        let batched = all.iter().all(|p| p.batch(&chrt));
        let measured = batched.then(|| {
            let (direct, mesh, relayed, _) = compared(None);
            (direct, mesh, relayed)
        });
        for p in &all {
            p.unbatch(&chrt);
        }
        measured
    });

    let before = (a.rss(), b.rss());
    let mut held = Vec::with_capacity(scale.open);
    for _ in 0..scale.open {
        let mut s = mesh_to(ECHO);
        exchange(&mut s, &[1u8; 16]);
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = (a.rss(), b.rss());
    drop(held);
    let per_conn =
        |before: u64, after: u64| (after.saturating_sub(before)) as f64 / scale.open as f64;
    a.stop();
    b.stop();

    // The same ztunnels with one worker each, in their places.
    let (mut a, mut b) = ztunnels(1);
    let one = compare(&[Way::through((&a, &b), &mesh_to)], scale).remove(0);
    a.stop();
    b.stop();

    println!();
    println!("{}:", top.name);
    println!(
        "{:>44}: {:9.2} Gbit/s direct, {:.2} Gbit/s through two ztunnels",
        "single-stream throughput", direct.bulk, mesh.bulk
    );
    println!(
        "{:>44}: direct p50 {:.1} µs p99 {:.1} µs; mesh p50 {:.1} µs p99 {:.1} µs",
        "1 KiB request/response latency", direct.p50, direct.p99, mesh.p50, mesh.p99
    );
    println!(
        "{:>44}: {:9.0} /s direct, {:.0} /s through two ztunnels",
        "new connections (one exchange each)", direct_cps, mesh_cps
    );
    one.print("one worker each (ZTUNNEL_WORKER_THREADS=1)");
    if let Some(relayed) = relayed {
        relayed.print("two haproxy TCP relays instead");
        println!(
            "{:>44}: {:9.1} µs by the relays, {:.1} µs more by the ztunnels (mTLS, HTTP/2)",
            "added p50, split",
            relayed.p50 - direct.p50,
            mesh.p50 - relayed.p50
        );
        println!(
            "{:>44}: {:9.1} / {:.1} µs by the relays, {:.1} / {:.1} µs more by the ztunnels",
            "CPU per request, split (client / server)",
            relayed.cpu.0,
            relayed.cpu.1,
            mesh.cpu.0 - relayed.cpu.0,
            mesh.cpu.1 - relayed.cpu.1
        );
    }
    if let Some(copied) = copied {
        copied.print("two copiers instead (the floor)");
        println!(
            "{:>44}: {:9.2} of direct; added p50 {:.1} µs by the copiers, {:.1} µs more by the ztunnels",
            "the floor two more hops set",
            copied.bulk / direct.bulk,
            copied.p50 - direct.p50,
            mesh.p50 - copied.p50
        );
    }
    if batch.is_none() {
        println!(
            "{:>44}",
            "(SCHED_BATCH diagnostic skipped: no chrt, or it was refused)"
        );
    }
    if let Some((batch_direct, mesh, relayed)) = &batch {
        mesh.print("SCHED_BATCH (diagnostic, not for use)");
        if let Some(relayed) = relayed {
            relayed.print("the relays, SCHED_BATCH");
        }
        println!(
            "{:>44}: {:9.1} µs",
            "added p50 for two hops, SCHED_BATCH",
            mesh.p50 - batch_direct.p50
        );
    }
    verdict(
        "throughput ratio, mesh / direct",
        mesh.bulk / direct.bulk,
        "≥ 0.30",
        mesh.bulk / direct.bulk >= 0.3,
    );
    verdict(
        "added p50 latency for two hops (µs)",
        mesh.p50 - direct.p50,
        "≤ 60",
        mesh.p50 - direct.p50 <= 60.0,
    );
    verdict(
        "CPU per request, client ztunnel (µs)",
        mesh.cpu.0,
        "≤ 60",
        mesh.cpu.0 <= 60.0,
    );
    verdict(
        "CPU per request, server ztunnel (µs)",
        mesh.cpu.1,
        "≤ 60",
        mesh.cpu.1 <= 60.0,
    );
    verdict(
        "idle RSS, client ztunnel (MB)",
        idle.0 as f64 / 1e6,
        "≤ 15",
        idle.0 <= 15_000_000,
    );
    verdict(
        "idle RSS, server ztunnel (MB)",
        idle.1 as f64 / 1e6,
        "≤ 15",
        idle.1 <= 15_000_000,
    );
    let (pa, pb) = (per_conn(before.0, after.0), per_conn(before.1, after.1));
    verdict(
        "RSS per open connection, client side (KiB)",
        pa / 1024.0,
        "≤ 8",
        pa <= 8192.0,
    );
    verdict(
        "RSS per open connection, server side (KiB)",
        pb / 1024.0,
        "≤ 8",
        pb <= 8192.0,
    );
    for (mut ra, mut rb) in relays.into_iter().chain(copiers) {
        ra.stop();
        rb.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What one way costs: direct, or through a pair of processes in the path (the two ztunnels,
/// the two relays, the two copiers), whose CPU time it counts.
struct Hops {
    /// Single-stream throughput, Gbit/s.
    bulk: f64,
    /// 1 KiB request/response latency, µs.
    p50: f64,
    p99: f64,
    /// CPU time per request of each process during the latency phase, µs (zero for direct).
    cpu: (f64, f64),
}

/// A way from the client to the server's ports: direct, or through a pair of processes whose
/// CPU time is counted.
struct Way<'a> {
    pair: Option<(&'a Process, &'a Process)>,
    open: &'a dyn Fn(u16) -> TcpStream,
}

impl<'a> Way<'a> {
    fn direct(open: &'a dyn Fn(u16) -> TcpStream) -> Self {
        Self { pair: None, open }
    }

    fn through(pair: (&'a Process, &'a Process), open: &'a dyn Fn(u16) -> TcpStream) -> Self {
        Self {
            pair: Some(pair),
            open,
        }
    }
}

/// The CPU time so far of each process of `pair`; none for the direct way.
fn cpu_of(pair: Option<(&Process, &Process)>) -> (Duration, Duration) {
    pair.map_or((Duration::ZERO, Duration::ZERO), |(a, b)| {
        (a.cpu(), b.cpu())
    })
}

/// Throughput, then latency with each pair's CPU time, of every way, in turns: the ways take
/// their transfers and each second of their exchanges in alternation, so that what else the
/// machine does in the meantime falls on all of them alike rather than on whichever was
/// measured then.
fn compare(ways: &[Way<'_>], scale: &Scale) -> Vec<Hops> {
    let mut bulk = vec![0f64; ways.len()];
    for _ in 0..3 {
        for (way, best) in ways.iter().zip(&mut bulk) {
            *best = best.max(transfer((way.open)(SINK), scale.bulk));
        }
    }
    let mut conns: Vec<TcpStream> = ways.iter().map(|way| warm((way.open)(ECHO))).collect();
    let pairs: Vec<_> = ways.iter().map(|way| way.pair).collect();
    let (samples, cpu) = std::thread::scope(|scope| {
        let client = scope.spawn(move || {
            // This thread alone sleeps with a timer slack of 1 ns: with the default, 50 µs, it
            // wakes up to that late after each due time, and every sample would count it as
            // the path's. (Set here, not for the process, whose children would inherit it.)
            nix::sys::prctl::set_timerslack(1).expect("timer slack");
            let mut samples = vec![Vec::new(); pairs.len()];
            let mut cpu = vec![(Duration::ZERO, Duration::ZERO); pairs.len()];
            for _ in 0..scale.seconds {
                for (i, pair) in pairs.iter().enumerate() {
                    let before = cpu_of(*pair);
                    exchanges(&mut conns[i], scale.rate, &mut samples[i]);
                    let after = cpu_of(*pair);
                    cpu[i].0 += after.0 - before.0;
                    cpu[i].1 += after.1 - before.1;
                }
            }
            (samples, cpu)
        });
        client.join().expect("the latency phase")
    });
    let requests = (scale.rate * scale.seconds) as f64;
    let per_request = |d: Duration| d.as_secs_f64() * 1e6 / requests;
    bulk.into_iter()
        .zip(samples)
        .zip(cpu)
        .map(|((bulk, mut samples), cpu)| {
            let (p50, p99) = percentiles(&mut samples);
            Hops {
                bulk,
                p50,
                p99,
                cpu: (per_request(cpu.0), per_request(cpu.1)),
            }
        })
        .collect()
}

impl Hops {
    fn print(&self, what: &str) {
        println!(
            "{:>44}: {:9.2} Gbit/s, p50 {:.1} µs p99 {:.1} µs, CPU {:.1} / {:.1} µs per request",
            what, self.bulk, self.p50, self.p99, self.cpu.0, self.cpu.1
        );
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A node's network namespace, deleted on drop.
struct Node {
    name: String,
    netns: NetNs,
}

impl Node {
    /// Two namespaces joined by a veth pair, addressed `a` and `b` (a /24 between them).
    fn pair(tag: u32, a: &str, b: &str) -> [Node; 2] {
        let names = [format!("zb-a-{tag}"), format!("zb-b-{tag}")];
        for name in &names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            sh(&["ip", "netns", "add", name]);
            sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
        }
        let (va, vb) = (format!("zba{tag}"), format!("zbb{tag}"));
        sh(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ]);
        for ((dev, name), addr) in [(&va, &names[0]), (&vb, &names[1])].into_iter().zip([a, b]) {
            sh(&["ip", "link", "set", dev, "netns", name]);
            sh(&[
                "ip",
                "-n",
                name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]);
            sh(&["ip", "-n", name, "link", "set", dev, "up"]);
        }
        names.map(|name| {
            let netns = NetNs::open(format!("/var/run/netns/{name}")).expect("open netns");
            Node { name, netns }
        })
    }

    /// Runs `f` on a thread inside the namespace: sockets made there belong to it.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.netns.run_in(f).expect("enter the node's namespace")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` where `node` lives: in its namespace, or here.
fn at<R: Send>(node: Option<&Node>, f: impl FnOnce() -> R + Send) -> R {
    match node {
        Some(node) => node.run(f),
        None => f(),
    }
}

fn verdict(what: &str, value: f64, target: &str, ok: bool) {
    let mark = if ok { "ok" } else { "MISSED" };
    println!("{what:>44}: {value:9.2}   target {target:>6}   {mark}");
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Two nodes, one ambient namespace, a client and a server workload.
fn write_config(dir: &Path, top: &Topology) {
    let (client, server) = (top.client, top.server);
    let ca = hbone::MeshCa::generate("cluster.local").expect("ca");
    std::fs::write(dir.join("ca.pem"), ca.root_pem()).expect("write");
    std::fs::write(dir.join("ca.key"), ca.key_pem()).expect("write");
    let config = dir.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(
        config.join("mesh.yaml"),
        format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: bench, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: bench}}
spec: {{nodeName: node-a, serviceAccountName: client}}
status: {{podIP: {client}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: bench}}
spec: {{nodeName: node-b, serviceAccountName: server}}
status: {{podIP: {server}}}
"#
        ),
    )
    .expect("write");
}

/// A ztunnel or a relay, each its own process in its node.
struct Process {
    child: Child,
}

/// `program`, run in `netns` if there is one.
fn command_at(netns: Option<&Node>, program: impl AsRef<OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Process {
    /// Starts the ztunnel of `node` (in its namespace, if it has one) and waits until ready.
    fn ztunnel(
        dir: &Path,
        node: &str,
        admin_ip: IpAddr,
        netns: Option<&Node>,
        workers: u16,
    ) -> Self {
        let child = command_at(netns, env!("CARGO_BIN_EXE_ztunnel"))
            .args(["--worker-threads", &workers.to_string()])
            .args(["--log", "warn"])
            .args(["--admin", &format!("{admin_ip}:15000")])
            .args(["--metrics", &format!("{admin_ip}:15020")])
            .args(["--readiness", &format!("{admin_ip}:15021")])
            .arg("run")
            .args(["--config", &path(&dir.join("config"))])
            .args(["--node", node])
            .args(["--ca-cert", &path(&dir.join("ca.pem"))])
            .args(["--ca-key", &path(&dir.join("ca.key"))])
            .stdout(Stdio::null())
            .spawn()
            .expect("start ztunnel");
        let ready = SocketAddr::new(admin_ip, 15021);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !at(netns, || is_ready(ready)) {
            assert!(
                Instant::now() < deadline,
                "ztunnel for {node} did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child }
    }

    /// node-a's and node-b's relays of `kind`, started in their nodes, or none when haproxy is
    /// not installed.
    fn relays(dir: &Path, top: &Topology, kind: Relay) -> Option<(Self, Self)> {
        let haproxy = match kind {
            Relay::Haproxy => Some(procfs::which("haproxy")?),
            Relay::Copier => None,
        };
        let node = |i: usize| top.nodes.as_ref().map(|n| &n[i]);
        let at_a = |port: u16| SocketAddr::new(top.client, kind.base() + port);
        let at_b = |port: u16| SocketAddr::new(top.server, kind.base() + 100 + port);
        let server = |port: u16| SocketAddr::new(top.server, port);
        let start = |i: usize, name: &str, routes: [(SocketAddr, SocketAddr); 2]| {
            let relay = match &haproxy {
                Some(haproxy) => Self::haproxy(dir, haproxy, node(i), name, &routes),
                None => Self::copier(node(i), &routes),
            };
            relay.listening(node(i), name, &routes);
            relay
        };
        let a = start(0, "a", [SINK, ECHO].map(|p| (at_a(p), at_b(p))));
        let b = start(1, "b", [SINK, ECHO].map(|p| (at_b(p), server(p))));
        Some((a, b))
    }

    /// haproxy in TCP mode, one thread, forwarding each `(listen, next)` pair's connections.
    fn haproxy(
        dir: &Path,
        haproxy: &Path,
        netns: Option<&Node>,
        name: &str,
        routes: &[(SocketAddr, SocketAddr)],
    ) -> Self {
        let mut conf = String::from(
            "global\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
        );
        for (i, (listen, next)) in routes.iter().enumerate() {
            conf += &format!("listen l{i}\n  bind {listen}\n  server s {next}\n");
        }
        let file = dir.join(format!("haproxy-{name}.cfg"));
        std::fs::write(&file, conf).expect("write haproxy config");
        let child = command_at(netns, haproxy)
            .args(["-db", "-f", &path(&file)])
            .stdout(Stdio::null())
            .spawn()
            .expect("start haproxy");
        Self { child }
    }

    /// This binary again, as a copier (see `copier`) of each `(listen, next)` pair.
    fn copier(netns: Option<&Node>, routes: &[(SocketAddr, SocketAddr)]) -> Self {
        let routes: Vec<String> = routes.iter().map(|(l, n)| format!("{l}>{n}")).collect();
        let child = command_at(netns, std::env::current_exe().expect("this binary"))
            .env(COPIER_ROUTES, routes.join(","))
            .stdout(Stdio::null())
            .spawn()
            .expect("start a copier");
        Self { child }
    }

    /// Waits until the relay `name` listens on every route.
    fn listening(&self, netns: Option<&Node>, name: &str, routes: &[(SocketAddr, SocketAddr)]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for (listen, _) in routes {
            while at(netns, || TcpStream::connect(listen).is_err()) {
                assert!(
                    Instant::now() < deadline,
                    "relay {name} never listened on {listen}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Schedules every thread `SCHED_BATCH`: a woken thread then never preempts the running
    /// one, so each hop takes the request over when the waker blocks, on the same core. Only a
    /// diagnostic of how much of a request's cost is the wake-ups this machine charges: with
    /// other work on the cores such threads wait behind it (with two busy loops running, a
    /// 1 KiB exchange's p99 went past one second), so no proxy should run so.
    /// Whether it took.
    fn batch(&self, chrt: &Path) -> bool {
        self.set_policy(chrt, "--batch")
    }

    /// Back to `SCHED_OTHER`.
    fn unbatch(&self, chrt: &Path) {
        self.set_policy(chrt, "--other");
    }

    fn set_policy(&self, chrt: &Path, policy: &str) -> bool {
        Command::new(chrt)
            .args([policy, "--all-tasks", "--pid", "0"])
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
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

fn is_ready(ready: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(ready) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: z\r\nconnection: close\r\n\r\n");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn direct(top: &Topology, addr: SocketAddr) -> TcpStream {
    let s = connect_from(top, addr);
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Through the client's SOCKS5 port, leaving from the client's address.
fn via_mesh(top: &Topology, addr: SocketAddr) -> TcpStream {
    let mut s = connect_from(top, SocketAddr::new(top.client, 15080));
    s.set_nodelay(true).expect("nodelay");
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

/// Through node-a's relay of `kind` for the server's `port`.
fn via_relays(top: &Topology, kind: Relay, port: u16) -> TcpStream {
    direct(top, SocketAddr::new(top.client, kind.base() + port))
}

/// What stands in the ztunnels' places as a baseline.
#[derive(Clone, Copy)]
enum Relay {
    Haproxy,
    Copier,
}

impl Relay {
    /// The port node-a's relay adds the server's port to (node-b's adds 100 more).
    fn base(self) -> u16 {
        match self {
            Relay::Haproxy => RELAY,
            Relay::Copier => COPIER,
        }
    }
}

/// The copier's whole life: forwards the connections of each `listen>next` route in `routes`
/// until killed, each direction of each connection on a thread of its own.
fn copier(routes: &str) {
    // Killed with the benchmark, also one that panicked: a copier left over would serve the
    // next run's connections in place of its own (whose bind then fails).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).expect("parent-death signal");
    let listeners: Vec<_> = routes
        .split(',')
        .map(|route| {
            let (listen, next) = route.split_once('>').expect("listen>next");
            let listen: SocketAddr = listen.parse().expect("listen address");
            let next: SocketAddr = next.parse().expect("next address");
            let listener = std::net::TcpListener::bind(listen).expect("bind");
            std::thread::spawn(move || {
                for inbound in listener.incoming().flatten() {
                    let Ok(outbound) = TcpStream::connect(next) else {
                        continue;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let back = (inbound.try_clone(), outbound.try_clone());
                    let (Ok(inbound_back), Ok(outbound_back)) = back else {
                        continue;
                    };
                    std::thread::spawn(move || copy_half(inbound, outbound));
                    std::thread::spawn(move || copy_half(outbound_back, inbound_back));
                }
            })
        })
        .collect();
    for listener in listeners {
        let _ = listener.join();
    }
}

/// One direction of a copied connection: each read written whole, the end passed on as a
/// half-close.
fn copy_half(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A connection from the client's address (in the client's node).
fn connect_from(top: &Topology, dst: SocketAddr) -> TcpStream {
    let src = top.client;
    at(top.nodes.as_ref().map(|n| &n[0]), move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.bind(&SocketAddr::new(src, 0).into()).expect("bind");
        socket.connect(&dst.into()).expect("connect");
        TcpStream::from(socket)
    })
}

/// Gbit/s of one stream carrying `bytes` to the sink, until the sink acknowledges all of it.
fn transfer(mut s: TcpStream, bytes: u64) -> f64 {
    let chunk = vec![0x5au8; 128 * 1024];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).expect("write");
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).expect("ack");
    assert_eq!(u64::from_be_bytes(ack), bytes);
    bytes as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9
}

fn exchange(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("read");
}

/// `s` after 100 exchanges, so the measured ones find its path warm.
fn warm(mut s: TcpStream) -> TcpStream {
    for _ in 0..100 {
        exchange(&mut s, &[7u8; 1024]);
    }
    s
}

/// One second of 1 KiB exchanges at `rate` per second, each sample in µs from its scheduled
/// start (so a late answer delays the next start without hiding its own lateness).
fn exchanges(s: &mut TcpStream, rate: u64, samples: &mut Vec<f64>) {
    let msg = [7u8; 1024];
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now();
    for i in 0..rate {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        exchange(s, &msg);
        samples.push(due.elapsed().as_secs_f64() * 1e6);
    }
}

/// p50 and p99 of `samples`.
fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.5), at(0.99))
}

/// Connections per second, each opened, used for one 1 KiB exchange and closed.
fn connects(open: impl Fn() -> TcpStream, n: usize) -> f64 {
    let msg = [3u8; 1024];
    let started = Instant::now();
    for _ in 0..n {
        let mut s = open();
        exchange(&mut s, &msg);
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// A listener on the server's address (in the server's node).
fn listen(top: &Topology, port: u16) -> std::net::TcpListener {
    let addr = SocketAddr::new(top.server, port);
    at(top.nodes.as_ref().map(|n| &n[1]), move || {
        std::net::TcpListener::bind(addr).expect("bind")
    })
}

/// Reads everything, then answers with the byte count.
fn spawn_sink(top: &Topology) -> std::thread::JoinHandle<()> {
    let listener = listen(top, SINK);
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes());
            });
        }
    })
}

/// Echoes every byte back.
fn spawn_echo(top: &Topology) -> std::thread::JoinHandle<()> {
    let listener = listen(top, ECHO);
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut s = s;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })
}
