//! ServiceEntries resolved by DNS, end to end on loopback: a connection to such a service's VIP
//! (or to its host by name, through SOCKS5) reaches what the host's name resolves to, asked of
//! a resolver this test runs and kept for the answer's TTL, whether or not the DNS proxy is on;
//! a name that does not resolve is refused and logged. A ServiceEntry that declares no address
//! gets one allocated: the DNS proxy answers with it and a connection to it reaches the host.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::Query;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use ztunnel::dns::Forwarder;
use ztunnel::socket::Loopback;

#[path = "support/logs.rs"]
mod logs;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/scratch.rs"]
mod scratch;
use nodes::Nodes;

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

/// The resolver the first test plays.
const RESOLVER: &str = "127.95.9.53:10053";
/// What `backend.example.test` resolves to.
const BACKEND: &str = "127.95.5.1";

/// A resolver at `at` that answers after `delay`: each of `names` has one IPv4 address (for
/// 30 s) and no IPv6 one; any other name does not exist. Notes each question's name and type.
async fn resolver(
    at: &str,
    delay: Duration,
    names: &'static [(&'static str, &'static str)],
    asked: Arc<Mutex<Vec<(String, RecordType)>>>,
) {
    let udp = Arc::new(UdpSocket::bind(at).await.expect("bind the resolver"));
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let q = Message::from_vec(&buf[..n]).expect("a query");
            let question = &q.queries()[0];
            let name = question.name().to_ascii();
            asked
                .lock()
                .expect("lock")
                .push((name.clone(), question.query_type()));
            let mut r = Message::new();
            r.set_id(q.id())
                .set_message_type(MessageType::Response)
                .add_queries(q.queries().iter().cloned());
            let known = names
                .iter()
                .find(|(n, _)| name.strip_suffix('.') == Some(n));
            match (known, question.query_type()) {
                (Some((_, ip)), RecordType::A) => {
                    r.add_answer(Record::from_rdata(
                        question.name().clone(),
                        30,
                        RData::A(A(ip.parse().expect("ip"))),
                    ));
                }
                (Some(_), _) => {}
                (None, _) => {
                    r.set_response_code(ResponseCode::NXDomain);
                }
            }
            let udp = udp.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = udp.send_to(&r.to_vec().expect("encode"), peer).await;
            });
        }
    });
}

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

/// A SOCKS5 CONNECT from the client to `dst` (an address, or a name and port): the reply code,
/// and the stream to use once it is 0.
async fn socks(from: &str, dst: Result<SocketAddr, (&str, u16)>) -> (u8, TcpStream) {
    let mut s = TcpStream::connect((from, 15080)).await.expect("socks port");
    let mut req = vec![5, 1, 0, 5, 1, 0];
    match dst {
        Ok(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Ok(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        Err((name, port)) => {
            req.push(3);
            req.push(u8::try_from(name.len()).expect("short name"));
            req.extend_from_slice(name.as_bytes());
            req.extend_from_slice(&port.to_be_bytes());
        }
    }
    s.write_all(&req).await.expect("write");
    // The method's reply, then the request's (whose bound address is IPv4 here).
    let mut reply = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut reply))
        .await
        .expect("a reply in time")
        .expect("reply");
    (reply[3], s)
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
    let asked = Arc::new(Mutex::new(Vec::new()));
    resolver(
        RESOLVER,
        Duration::ZERO,
        &[("backend.example.test", BACKEND)],
        asked.clone(),
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
        let (code, s) = socks("127.95.1.1", Ok("240.0.95.1:80".parse().expect("addr"))).await;
        assert_eq!(code, 0, "SOCKS5 succeeded");
        assert_eq!(echo_through(s, msg).await, msg);
    }
    assert_eq!(
        *asked.lock().expect("lock"),
        [("backend.example.test.".to_owned(), RecordType::A)]
    );
    // Plain TCP from the client's own address, as a passthrough is.
    let client: IpAddr = "127.95.1.1".parse().expect("ip");
    assert_eq!(*sources.lock().expect("lock"), [client; 2]);

    // The host by name, through SOCKS5: the same endpoint.
    let (code, s) = socks("127.95.1.1", Err(("backend.example.test", 80))).await;
    assert_eq!(code, 0);
    assert_eq!(echo_through(s, b"three").await, b"three");

    // A name that does not exist: refused as unreachable (SOCKS5 4) and logged with the
    // reason; one question (no such name has no other family either), whose answer is kept.
    for _ in 0..2 {
        let (code, _) = socks("127.95.1.1", Ok("240.0.95.2:80".parse().expect("addr"))).await;
        assert_eq!(code, 4, "host unreachable");
    }
    let gone: Vec<_> = (asked.lock().expect("lock").iter())
        .filter(|(name, _)| name == "gone.example.test.")
        .map(|(_, kind)| *kind)
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
}

/// What the DNS proxy at `proxy` answers for `name`, of `kind`.
async fn ask(proxy: &str, name: &str, kind: RecordType) -> Vec<IpAddr> {
    let udp = UdpSocket::bind("127.95.1.2:0").await.expect("bind");
    let mut q = Message::new();
    q.set_id(7)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).expect("name"), kind));
    udp.send_to(&q.to_vec().expect("encode"), proxy)
        .await
        .expect("send");
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut buf))
        .await
        .expect("an answer in time")
        .expect("recv");
    let answer = Message::from_vec(&buf[..n]).expect("an answer");
    assert_eq!(answer.response_code(), ResponseCode::NoError, "{name}");
    (answer.answers().iter())
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// Egress as ambient does it: a ServiceEntry with no address gets one of its own, which the DNS
/// proxy answers; a connection to it, in either family, reaches what the host resolves to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocated_address_is_answered_and_reaches_the_host() {
    const AT: &str = "127.95.9.54:10053";
    const HOST: &str = "127.95.5.2";
    let asked = Arc::new(Mutex::new(Vec::new()));
    resolver(
        AT,
        Duration::from_millis(300),
        &[("auto.example.test", HOST)],
        asked.clone(),
    )
    .await;
    let sources = echo_backend(SocketAddr::new(HOST.parse().expect("ip"), 7080)).await;
    let mut nodes = Nodes::new(MESH);
    nodes.dns = Some(Arc::new(Forwarder::new(
        vec![AT.parse().expect("addr")],
        Duration::from_secs(2),
    )));
    let _b = nodes.start("node-b", Arc::new(Loopback)).await;

    let proxy = "127.95.1.2:15053";
    let v4 = ask(proxy, "auto.example.test.", RecordType::A).await;
    let v6 = ask(proxy, "auto.example.test.", RecordType::AAAA).await;
    let (&[IpAddr::V4(a)], &[IpAddr::V6(aaaa)]) = (&v4[..], &v6[..]) else {
        panic!("one address of each family: {v4:?} {v6:?}");
    };
    assert_eq!(a.octets()[..2], [240, 240], "{a}");
    assert_eq!(aaaa.segments()[..3], [0x2001, 2, 0], "{aaaa}");
    assert!(
        asked.lock().expect("lock").is_empty(),
        "answered by the mesh"
    );

    // Eight connections at once, while the name is not yet known: one question for all.
    let burst = (0..8).map(|i| async move {
        let (code, s) = socks("127.95.1.2", Ok(SocketAddr::new(IpAddr::V4(a), 80))).await;
        assert_eq!(code, 0, "SOCKS5 to {a}");
        let msg = format!("burst {i}");
        assert_eq!(echo_through(s, msg.as_bytes()).await, msg.as_bytes());
    });
    futures_util::future::join_all(burst).await;
    let (code, s) = socks("127.95.1.2", Ok(SocketAddr::new(IpAddr::V6(aaaa), 80))).await;
    assert_eq!(code, 0, "SOCKS5 to {aaaa}");
    assert_eq!(echo_through(s, b"six").await, b"six");
    // The IPv6 address asked for the host's IPv6 addresses first, found none, and took the
    // IPv4 one the first connections had kept.
    assert_eq!(
        *asked.lock().expect("lock"),
        [
            ("auto.example.test.".to_owned(), RecordType::A),
            ("auto.example.test.".to_owned(), RecordType::AAAA),
        ]
    );
    assert_eq!(sources.lock().expect("lock").len(), 9);
}
