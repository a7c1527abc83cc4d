//! ServiceEntries resolved by DNS, end to end on loopback: a connection to such a service's VIP
//! (or to its host by name, through SOCKS5) reaches what the host's name resolves to, asked of
//! a resolver this test runs and kept for the answer's TTL, whether or not the DNS proxy is on;
//! a name that does not resolve is refused and logged. A ServiceEntry that declares no address
//! gets one allocated: the DNS proxy answers with it and a connection to it reaches the host.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::dns::Forwarder;
use ztunnel::socket::Loopback;

#[path = "support/dns.rs"]
mod dns;
#[path = "support/logs.rs"]
mod logs;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/scratch.rs"]
mod scratch;
#[path = "support/socks.rs"]
mod socks;
use dns::{Resolver, addresses, over_udp, query};
use nodes::Nodes;
use socks::Dst;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 127.95.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: egress-client, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: client}
status: {podIP: 127.95.1.2}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: auto, namespace: shop}
spec:
  hosts: [auto.example.test]
  ports: [{number: 80, name: tcp, protocol: TCP, targetPort: 7080}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backend, namespace: shop}
spec:
  hosts: [backend.example.test]
  addresses: [240.0.95.1]
  ports: [{number: 80, name: tcp, protocol: TCP, targetPort: 7080}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: gone, namespace: shop}
spec:
  hosts: [gone.internal]
  addresses: [240.0.95.2]
  ports: [{number: 80, name: tcp, protocol: TCP}]
  resolution: DNS
  endpoints: [{address: gone.example.test}]
"#;

/// The first test's client, and the second's.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 95, 1, 1));
const EGRESS_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 95, 1, 2));
/// The resolver the first test plays.
const RESOLVER: &str = "127.95.9.53:10053";
/// What `backend.example.test` resolves to.
const BACKEND: &str = "127.95.5.1";

/// A backend at `at` that echoes, noting each connection's source.
async fn echo_backend(at: SocketAddr) -> Arc<Mutex<Vec<IpAddr>>> {
    let backend = TcpListener::bind(at).await.expect("bind the backend");
    let sources = Arc::new(Mutex::new(Vec::<IpAddr>::new()));
    let seen = sources.clone();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = backend.accept().await {
            seen.lock().expect("lock").push(peer.ip());
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    sources
}

async fn echo_through(mut s: TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("an answer in time")
        .expect("read");
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_entry_resolved_by_dns_reaches_what_its_name_resolves_to() {
    let log = logs::log();
    let resolver = Resolver::start(
        RESOLVER,
        &[
            ("backend.example.test", BACKEND),
            ("outside.example.test", BACKEND),
            ("alias.example.test", "240.0.95.1"),
        ],
        Duration::ZERO,
    )
    .await;
    let sources = echo_backend(SocketAddr::new(BACKEND.parse().expect("ip"), 7080)).await;
    let mut nodes = Nodes::new(MESH);
    nodes.dns = Some(Arc::new(Forwarder::new(
        vec![RESOLVER.parse().expect("addr")],
        Duration::from_secs(2),
    )));
    // Names resolve without the DNS proxy (`ztunnel run --no-dns`), which is not listening.
    nodes.dns_proxy = false;
    let _a = nodes.start("node-a", Arc::new(Loopback)).await;
    assert!(
        TcpStream::connect("127.95.1.1:15053").await.is_err(),
        "no DNS proxy"
    );

    // The VIP, twice: the name is asked once (its address for IPv4, which the VIP is) and kept.
    for msg in [&b"one"[..], b"two"] {
        let (code, s) =
            socks::connect(CLIENT, Dst::Addr("240.0.95.1:80".parse().expect("addr"))).await;
        assert_eq!(code, 0, "SOCKS5 succeeded");
        assert_eq!(echo_through(s, msg).await, msg);
    }
    assert_eq!(
        resolver.questions(),
        [("backend.example.test.".to_owned(), RecordType::A)]
    );
    // Plain TCP from the client's own address, as a passthrough is.
    assert_eq!(*sources.lock().expect("lock"), [CLIENT; 2]);

    // The host by name, through SOCKS5: the same endpoint.
    let (code, s) = socks::connect(CLIENT, Dst::Name("backend.example.test", 80)).await;
    assert_eq!(code, 0);
    assert_eq!(echo_through(s, b"three").await, b"three");

    // A name that does not exist: refused as unreachable (SOCKS5 4) and logged with the
    // reason; one question (no such name has no other family either), whose answer is kept.
    for _ in 0..2 {
        let (code, _) =
            socks::connect(CLIENT, Dst::Addr("240.0.95.2:80".parse().expect("addr"))).await;
        assert_eq!(code, 4, "host unreachable");
    }
    let gone: Vec<_> = (resolver.questions().into_iter())
        .filter(|(name, _)| name == "gone.example.test.")
        .map(|(_, kind)| kind)
        .collect();
    assert_eq!(gone, [RecordType::A]);
    log.line(&[
        "gone.example.test did not resolve: no such name",
        "response_flags=DF",
        "dst.service=gone.internal",
    ])
    .await;
    // A resolved connection's log names the address it reached.
    log.line(&[
        "dst.addr=127.95.5.1:7080",
        "dst.service=backend.example.test",
    ])
    .await;
    // Every connection that looked a name up is counted, answered from the cache or not.
    let text = nodes.metrics_text();
    for (host, count) in [("backend.example.test", 3), ("gone.example.test", 2)] {
        let line = (text.lines())
            .find(|l| {
                l.starts_with("istio_on_demand_dns_total{")
                    && l.contains("source_workload=\"client\"")
                    && l.contains(&format!("hostname=\"{host}\""))
            })
            .unwrap_or_else(|| panic!("no count for {host}:\n{text}"));
        assert!(line.ends_with(&format!(" {count}")), "{line}");
    }

    // Names the mesh does not know, through SOCKS5, are looked up as upstream's SOCKS5 does: an
    // address outside the mesh is reached in plain TCP; the address of a mesh service is routed
    // as that service (nothing listens on the VIP); a name no resolver knows is unreachable.
    let (code, s) = socks::connect(CLIENT, Dst::Name("outside.example.test", 7080)).await;
    assert_eq!(code, 0, "outside.example.test");
    assert_eq!(echo_through(s, b"four").await, b"four");
    let (code, s) = socks::connect(CLIENT, Dst::Name("alias.example.test", 80)).await;
    assert_eq!(code, 0, "alias.example.test");
    assert_eq!(echo_through(s, b"five").await, b"five");
    let (code, _) = socks::connect(CLIENT, Dst::Name("nowhere.example.test", 80)).await;
    assert_eq!(code, 4, "host unreachable");
}

/// Egress as ambient does it: a ServiceEntry with no address gets one of its own, which the DNS
/// proxy answers; a connection to it, in either family, reaches what the host resolves to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocated_address_is_answered_and_reaches_the_host() {
    const AT: &str = "127.95.9.54:10053";
    const HOST: &str = "127.95.5.2";
    let resolver = Resolver::start(
        AT,
        &[("auto.example.test", HOST)],
        Duration::from_millis(300),
    )
    .await;
    let sources = echo_backend(SocketAddr::new(HOST.parse().expect("ip"), 7080)).await;
    let mut nodes = Nodes::new(MESH);
    nodes.dns = Some(Arc::new(Forwarder::new(
        vec![AT.parse().expect("addr")],
        Duration::from_secs(2),
    )));
    let _b = nodes.start("node-b", Arc::new(Loopback)).await;

    let ask = |kind| async move {
        let q = query(7, "auto.example.test.", kind);
        let a = over_udp(EGRESS_CLIENT, "127.95.1.2:15053", &q).await;
        assert_eq!(a.response_code(), ResponseCode::NoError);
        addresses(&a)
    };
    let v4 = ask(RecordType::A).await;
    let v6 = ask(RecordType::AAAA).await;
    let (&[IpAddr::V4(a)], &[IpAddr::V6(aaaa)]) = (&v4[..], &v6[..]) else {
        panic!("one address of each family: {v4:?} {v6:?}");
    };
    assert_eq!(a.octets()[..2], [240, 240], "{a}");
    assert_eq!(aaaa.segments()[..3], [0x2001, 2, 0], "{aaaa}");
    assert!(resolver.asked().is_empty(), "answered by the mesh");

    // Eight connections at once, while the name is not yet known: one question for all.
    let burst = (0..8).map(|i| async move {
        let (code, s) =
            socks::connect(EGRESS_CLIENT, Dst::Addr(SocketAddr::new(IpAddr::V4(a), 80))).await;
        assert_eq!(code, 0, "SOCKS5 to {a}");
        let msg = format!("burst {i}");
        assert_eq!(echo_through(s, msg.as_bytes()).await, msg.as_bytes());
    });
    futures_util::future::join_all(burst).await;
    let (code, s) = socks::connect(
        EGRESS_CLIENT,
        Dst::Addr(SocketAddr::new(IpAddr::V6(aaaa), 80)),
    )
    .await;
    assert_eq!(code, 0, "SOCKS5 to {aaaa}");
    assert_eq!(echo_through(s, b"six").await, b"six");
    // The IPv6 address asked for the host's IPv6 addresses first, found none, and took the
    // IPv4 one the first connections had kept.
    assert_eq!(
        resolver.questions(),
        [
            ("auto.example.test.".to_owned(), RecordType::A),
            ("auto.example.test.".to_owned(), RecordType::AAAA),
        ]
    );
    assert_eq!(sources.lock().expect("lock").len(), 9);
}
