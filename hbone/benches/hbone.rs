//! HBONE against its baselines, measured in one run on loopback, printed as figures and ratios.
//!
//! Data flows (every path is one TCP connection on 127.0.0.1, client and server in this process,
//! on a 2-worker tokio runtime, as ztunnel runs by default):
//! * raw TCP:  writer → TcpStream → TcpStream → reader
//! * TLS only: writer → rustls (TLS 1.3, AES-GCM, same certificates) → rustls → reader
//! * HBONE:    writer → H2Stream (CONNECT on a pooled mTLS HTTP/2 connection) → Server → reader
//!
//! Bulk transfers move bytes through [`ChunkIo`], as the proxies' copy loop does: a socket or TLS
//! stream reads into a reused buffer and writes from a slice, an HBONE tunnel hands its chunks to
//! and from HTTP/2 without copying them. Each path so pays the copies its transport makes.
//!
//! Figures: single-stream bulk throughput, 1-byte echo round trip (p50, p99), new CONNECT streams
//! per second on a pooled connection, and RSS per idle stream. Run with `cargo bench -p hbone`;
//! `HBONE_BENCH_QUICK=1` shortens every phase (a smoke run, not figures to quote);
//! `HBONE_BENCH_PROFILE=hbone` (or `tcp`, `tls`) runs only that path's bulk transfer, for profilers.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hbone::{
    Authority, CertHandle, CertManager, ChunkIo, Config, ConnectHeaders, ConnectRequest, Handler,
    Identity, InboundRequest, MeshCa, Pool, Server,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The allocator our proxies ship with: large per-frame buffers are recycled instead of being
/// mapped and unmapped (glibc's mmap threshold makes every 128 KiB frame a page-fault storm).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Measurement rounds; each runs every path's bulk transfer and a share of its echo round trips.
/// A multiple of the number of paths, so each path starts as many rounds as the others.
const ROUNDS: usize = 6;

const SINK: u16 = 1;
const ECHO: u16 = 2;
const IDLE: u16 = 3;

trait Io: ChunkIo + Send + 'static {}
impl<T: ChunkIo + Send + 'static> Io for T {}
type BoxIo = Box<dyn Io>;
type Dial = Box<dyn Fn(u16) -> Pin<Box<dyn Future<Output = BoxIo> + Send>> + Send + Sync>;

struct Scale {
    bulk_bytes: u64,
    echo_rounds: usize,
    connects: usize,
    idle_streams: usize,
}

fn main() {
    let quick = std::env::var_os("HBONE_BENCH_QUICK").is_some();
    let scale = if quick {
        Scale {
            bulk_bytes: 64 << 20,
            echo_rounds: 2_000,
            connects: 500,
            idle_streams: 1_000,
        }
    } else {
        Scale {
            bulk_bytes: 2 << 30,
            echo_rounds: 20_000,
            connects: 5_000,
            idle_streams: 10_000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(scale));
}

async fn run(scale: Scale) {
    let ca = Arc::new(MeshCa::generate("cluster.local").unwrap());
    let certs = Arc::new(CertManager::new(ca));
    let server_id = Identity::new("cluster.local", "default", "server").unwrap();
    let client_id = Identity::new("cluster.local", "default", "client").unwrap();
    let server_cert = certs.fetch(&server_id).await.unwrap();
    let client_cert = certs.fetch(&client_id).await.unwrap();

    let tcp = serve_tcp().await;
    let tls = serve_tls(server_cert.clone(), client_cert.clone(), server_id.clone()).await;
    // Dropping the trigger would drain the server mid-run.
    let (hbone, pool, hbone_addr, _drain) =
        serve_hbone(server_cert, certs, client_id.clone(), server_id).await;

    if let Ok(path) = std::env::var("HBONE_BENCH_PROFILE") {
        let dial = match path.as_str() {
            "tcp" => &tcp,
            "tls" => &tls,
            _ => &hbone,
        };
        println!(
            "{path}: bulk {:.2} Gbit/s",
            bulk(dial, scale.bulk_bytes * 4).await
        );
        return;
    }
    println!(
        "HBONE benchmark (loopback, 2 tokio workers; {ROUNDS} interleaved rounds: bulk figures \
         are medians, echo percentiles are over all rounds' samples)"
    );
    println!();
    let paths = [("raw TCP", &tcp), ("TLS only", &tls), ("HBONE", &hbone)];
    // Rounds take turns across the paths, so a noisy stretch of the machine slows all of them
    // rather than whichever path happened to run then.
    let mut echo_streams = Vec::new();
    for (_, dial) in paths {
        let mut s = dial(ECHO).await;
        echo_rounds(&mut s, scale.echo_rounds / 10, &mut Vec::new()).await;
        echo_streams.push(s);
    }
    let mut bulk_runs = vec![Vec::with_capacity(ROUNDS); paths.len()];
    let mut echo_samples = vec![Vec::with_capacity(scale.echo_rounds); paths.len()];
    for round in 0..ROUNDS {
        // Each round starts with the next path: what runs first after a bulk phase is measured
        // on a machine in another state than what runs last.
        let order = (0..paths.len()).map(|i| (i + round) % paths.len());
        for i in order.clone() {
            bulk_runs[i].push(bulk(paths[i].1, scale.bulk_bytes).await);
        }
        for i in order {
            echo_rounds(
                &mut echo_streams[i],
                scale.echo_rounds / ROUNDS,
                &mut echo_samples[i],
            )
            .await;
        }
    }
    let mut rows = Vec::new();
    for ((mut runs, mut samples), (name, _)) in bulk_runs.into_iter().zip(echo_samples).zip(paths) {
        runs.sort_by(f64::total_cmp);
        samples.sort();
        let gbps = runs[runs.len() / 2];
        let (p50, p99) = (
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100],
        );
        println!(
            "{name:>9}: bulk {gbps:6.2} Gbit/s   echo p50 {:6.1} µs   p99 {:6.1} µs",
            us(p50),
            us(p99)
        );
        rows.push((gbps, p50));
    }
    let (tcp_gbps, tcp_p50) = rows[0];
    let (tls_gbps, _) = rows[1];
    let (hbone_gbps, hbone_p50) = rows[2];
    println!();
    let added = us(hbone_p50) - us(tcp_p50);
    verdict(
        "HBONE bulk / raw TCP",
        hbone_gbps / tcp_gbps,
        ">= 0.60",
        hbone_gbps / tcp_gbps >= 0.6,
    );
    verdict(
        "HBONE bulk / TLS only",
        hbone_gbps / tls_gbps,
        ">= 0.90",
        hbone_gbps / tls_gbps >= 0.9,
    );
    verdict(
        "HBONE echo p50 added over raw TCP (µs)",
        added,
        "<= 25",
        added <= 25.0,
    );

    let rate = connect_rate(&pool, &client_id, hbone_addr, scale.connects).await;
    println!(
        "{:>44}: {rate:9.0} /s (sequential, one pooled connection)",
        "new CONNECT streams"
    );
    let rate16 = connect_rate_concurrent(&pool, &client_id, hbone_addr, scale.connects, 16).await;
    println!(
        "{:>44}: {rate16:9.0} /s (16 in flight)",
        "new CONNECT streams"
    );

    let (per_stream, conns) = idle_memory(&pool, &client_id, hbone_addr, scale.idle_streams).await;
    verdict(
        &format!("RSS per idle stream, both ends ({conns} conns) KiB"),
        per_stream / 1024.0,
        "<= 8",
        per_stream <= 8.0 * 1024.0,
    );
}

fn verdict(what: &str, value: f64, target: &str, ok: bool) {
    let mark = if ok { "meets" } else { "MISSES" };
    println!("{what:>44}: {value:9.2}   target {target:>7}   {mark}");
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Writes `total` bytes to a sink that answers one byte at EOF, 128 KiB per write on every path
/// (iperf3's default write size).
async fn bulk(dial: &Dial, total: u64) -> f64 {
    let mut s = dial(SINK).await;
    let chunk = Bytes::from(vec![0xa5u8; 128 * 1024]);
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let mut rest = chunk.clone();
        while !rest.is_empty() {
            poll_fn(|cx| s.poll_write_chunk(cx, &mut rest))
                .await
                .unwrap();
        }
        sent += chunk.len() as u64;
    }
    s.shutdown().await.unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.unwrap();
    sent as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// One-byte round trips on an open echo stream, each one's time added to `samples`.
async fn echo_rounds(s: &mut BoxIo, rounds: usize, samples: &mut Vec<Duration>) {
    let mut b = [0u8; 1];
    for i in 0..rounds {
        let start = Instant::now();
        s.write_all(&[i as u8]).await.unwrap();
        s.read_exact(&mut b).await.unwrap();
        samples.push(start.elapsed());
    }
}

fn connect_request(src: &Identity, addr: SocketAddr, port: u16) -> ConnectRequest {
    ConnectRequest {
        src: src.clone(),
        dst_identities: vec![Identity::new("cluster.local", "default", "server").unwrap()],
        next_hop: addr,
        authority: Authority::Addr(SocketAddr::new(addr.ip(), port)),
        headers: ConnectHeaders::default(),
    }
}

async fn connect_rate(pool: &Pool, src: &Identity, addr: SocketAddr, n: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let mut s = pool
            .connect(connect_request(src, addr, ECHO))
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn connect_rate_concurrent(
    pool: &Pool,
    src: &Identity,
    addr: SocketAddr,
    n: usize,
    width: usize,
) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..width)
        .map(|_| {
            let (pool, src) = (pool.clone(), src.clone());
            tokio::spawn(async move {
                for _ in 0..n / width {
                    let mut s = pool
                        .connect(connect_request(&src, addr, ECHO))
                        .await
                        .unwrap();
                    s.shutdown().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (n / width * width) as f64 / start.elapsed().as_secs_f64()
}

/// Opens `n` streams and holds them idle; returns RSS growth per stream and connections used.
async fn idle_memory(pool: &Pool, src: &Identity, addr: SocketAddr, n: usize) -> (f64, usize) {
    // Warm up allocator arenas and the pool's first connection.
    drop(
        pool.connect(connect_request(src, addr, IDLE))
            .await
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = rss();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = pool
            .connect(connect_request(src, addr, IDLE))
            .await
            .unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss();
    let conns = pool.stats().connections.get();
    drop(held);
    ((after.saturating_sub(before)) as f64 / n as f64, conns)
}

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Sink: read to EOF, answer one byte. Echo: copy back. Idle: echo through a 1 KiB buffer, the
/// size a proxy's copy loop starts with, and otherwise wait.
async fn serve_app<S: Io>(mut s: S, mode: u16) {
    match mode {
        SINK => {
            let mut buf = BytesMut::new();
            while poll_fn(|cx| s.poll_read_chunk(cx, &mut buf, 256 * 1024))
                .await
                .is_ok_and(|chunk| !chunk.is_empty())
            {}
            let _ = s.write_all(b"k").await;
            let _ = s.shutdown().await;
        }
        _ => {
            let mut buf = vec![0u8; if mode == IDLE { 1024 } else { 16 * 1024 }];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown().await;
        }
    }
}

/// Raw TCP and TLS servers learn the mode from the first byte the client sends.
async fn serve_prefixed<S: Io>(mut s: S) {
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).await.is_ok() {
        serve_app(s, mode[0] as u16).await;
    }
}

async fn serve_tcp() -> Dial {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(serve_prefixed(s));
        }
    });
    Box::new(move |mode| {
        Box::pin(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&[mode as u8]).await.unwrap();
            Box::new(s) as BoxIo
        })
    })
}

async fn serve_tls(server: CertHandle, client: CertHandle, server_id: Identity) -> Dial {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(hbone::tls::server_config(server).unwrap());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    serve_prefixed(tls).await;
                }
            });
        }
    });
    let config = hbone::tls::client_config(client, Arc::from([server_id])).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    Box::new(move |mode| {
        let connector = connector.clone();
        Box::pin(async move {
            let s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let mut tls = connector.connect(name, s).await.unwrap();
            tls.write_all(&[mode as u8]).await.unwrap();
            Box::new(tls) as BoxIo
        })
    })
}

struct App;

impl Handler for App {
    async fn handle(&self, req: InboundRequest) {
        let mode = req.target().port();
        if let Ok(s) = req.accept() {
            serve_app(s, mode).await;
        }
    }
}

async fn serve_hbone(
    server: CertHandle,
    certs: Arc<CertManager>,
    client_id: Identity,
    server_id: Identity,
) -> (Dial, Pool, SocketAddr, hbone::drain::DrainTrigger) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(server, App, Config::default()).unwrap();
    let (trigger, watch) = hbone::drain::channel();
    tokio::spawn(server.serve(listener, watch));
    let pool = Pool::new(certs, Config::default());
    let p = pool.clone();
    let dial: Dial = Box::new(move |mode| {
        let pool = p.clone();
        let req = ConnectRequest {
            src: client_id.clone(),
            dst_identities: vec![server_id.clone()],
            next_hop: addr,
            authority: Authority::Addr(SocketAddr::new(addr.ip(), mode)),
            headers: ConnectHeaders::default(),
        };
        Box::pin(async move { Box::new(pool.connect(req).await.unwrap()) as BoxIo })
    });
    (dial, pool, addr, trigger)
}
