//! The DNS proxy on loopback, over real UDP and TCP sockets: mesh names answered from the mesh
//! model (services, short names, a ServiceEntry host behind a search domain), everything else
//! forwarded to an upstream resolver this test runs, failures answered `SERVFAIL`, garbage
//! answered `FORMERR`, and each counted; overload and idle connections contained.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use ztunnel::dns::Forwarder;
use ztunnel::socket::Loopback;

#[path = "support/dns.rs"]
mod dns;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/scratch.rs"]
mod scratch;
use dns::{Resolver, answers, over_tcp, over_udp, query};
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
status: {podIP: 127.93.1.1}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.93.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: node-b, hostname: db-0, subdomain: db}
status: {podIP: 127.93.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {nodeName: node-b, hostname: db-1, subdomain: db}
status: {podIP: 127.93.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-2, namespace: shop, labels: {app: db}}
spec: {nodeName: node-b, hostname: db-2, subdomain: db}
status: {podIP: 127.93.2.3, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Service
metadata: {name: peers, namespace: shop}
spec: {clusterIP: None, publishNotReadyAddresses: true, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [240.0.93.1]
  ports: [{number: 443, name: tls, protocol: TLS}]
"#;

/// The client's DNS proxy.
const PROXY: &str = "127.93.1.1:15053";
/// The upstream resolver this test plays.
const UPSTREAM: &str = "127.93.9.53:10053";
/// The client workload, whose DNS proxy is [`PROXY`].
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 93, 1, 1));

fn metric(nodes: &Nodes, line_start: &str) -> f64 {
    nodes
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_names_answered_others_forwarded_failures_and_garbage_answered() {
    let resolver = Resolver::start(UPSTREAM, &[("example.org", "192.0.2.7")], Duration::ZERO).await;
    let mut nodes = Nodes::new(MESH);
    let upstream_addr: SocketAddr = UPSTREAM.parse().expect("addr");
    nodes.dns = Some(Arc::new(Forwarder::new(
        vec![upstream_addr],
        Duration::from_secs(2),
    )));
    let _a = nodes.start("node-a", Arc::new(Loopback)).await;

    // A service's hostname and its short name: its VIP, authoritative, for 30 s.
    let a = over_udp(
        CLIENT,
        PROXY,
        &query(1, "cart.shop.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!((a.id(), a.response_code()), (1, ResponseCode::NoError));
    assert!(a.authoritative());
    assert_eq!(answers(&a), ["cart.shop.svc.cluster.local. 10.96.93.1"]);
    assert_eq!(a.answers()[0].ttl(), 30);
    let a = over_udp(CLIENT, PROXY, &query(2, "cart.", RecordType::A)).await;
    assert_eq!(answers(&a), ["cart. 10.96.93.1"]);

    // A ServiceEntry host with the pod's first search domain appended: a CNAME to the host.
    let a = over_udp(
        CLIENT,
        PROXY,
        &query(3, "api.example.com.shop.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(
        answers(&a),
        [
            "api.example.com.shop.svc.cluster.local. api.example.com.",
            "api.example.com. 240.0.93.1"
        ]
    );

    // A StatefulSet pod by its own name behind the headless service: that pod alone.
    let a = over_udp(
        CLIENT,
        PROXY,
        &query(31, "db-1.db.shop.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(answers(&a), ["db-1.db.shop.svc.cluster.local. 127.93.2.2"]);
    let a = over_udp(CLIENT, PROXY, &query(32, "db-0.db.", RecordType::A)).await;
    assert_eq!(answers(&a), ["db-0.db. 127.93.2.1"]);
    // A pod that is not ready yet: only a headless service that publishes not-ready addresses
    // names it, as a StatefulSet's peers need to find each other before they are ready.
    let sorted = |mut answers: Vec<String>| {
        answers.sort();
        answers
    };
    let a = over_udp(CLIENT, PROXY, &query(34, "db.", RecordType::A)).await;
    assert_eq!(sorted(answers(&a)), ["db. 127.93.2.1", "db. 127.93.2.2"]);
    let a = over_udp(CLIENT, PROXY, &query(35, "peers.", RecordType::A)).await;
    assert_eq!(
        sorted(answers(&a)),
        [
            "peers. 127.93.2.1",
            "peers. 127.93.2.2",
            "peers. 127.93.2.3"
        ]
    );
    let a = over_udp(CLIENT, PROXY, &query(36, "db-2.peers.", RecordType::A)).await;
    assert_eq!(answers(&a), ["db-2.peers. 127.93.2.3"]);

    // A Kubernetes short name with the first search domain appended: a CNAME to the short name.
    let a = over_udp(
        CLIENT,
        PROXY,
        &query(33, "cart.shop.shop.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(
        answers(&a),
        [
            "cart.shop.shop.svc.cluster.local. cart.shop.",
            "cart.shop. 10.96.93.1"
        ]
    );

    // A mesh name without an IPv6 address: an empty answer, not a question for upstream.
    let a = over_udp(
        CLIENT,
        PROXY,
        &query(4, "cart.shop.svc.cluster.local.", RecordType::AAAA),
    )
    .await;
    assert_eq!(
        (a.response_code(), a.answers().len()),
        (ResponseCode::NoError, 0)
    );
    assert_eq!(resolver.asked().len(), 0, "mesh names never reach upstream");

    // Other names, and other record types of mesh names, are the upstream resolver's.
    let a = over_udp(CLIENT, PROXY, &query(5, "example.org.", RecordType::A)).await;
    assert_eq!((a.id(), a.response_code()), (5, ResponseCode::NoError));
    assert_eq!(answers(&a), ["example.org. 192.0.2.7"]);
    let a = over_udp(
        CLIENT,
        PROXY,
        &query(6, "cart.shop.svc.cluster.local.", RecordType::MX),
    )
    .await;
    assert_eq!(a.response_code(), ResponseCode::NXDomain);
    assert_eq!(resolver.asked().len(), 2);

    // TCP: several queries on one connection, forwarded over TCP when forwarded.
    let mut tcp = TcpStream::connect(PROXY).await.expect("connect");
    let a = over_tcp(
        &mut tcp,
        &query(7, "cart.shop.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(answers(&a), ["cart.shop.svc.cluster.local. 10.96.93.1"]);
    let a = over_tcp(&mut tcp, &query(8, "example.org.", RecordType::A)).await;
    assert_eq!(
        (a.id(), answers(&a)),
        (8, vec!["example.org. 192.0.2.7".to_owned()])
    );
    // Forwarded from the asking workload's own address, as its own query would have left, and
    // over the transport it came in.
    let asked: Vec<(IpAddr, bool)> = (resolver.asked().into_iter())
        .map(|q| (q.from, q.tcp))
        .collect();
    assert_eq!(asked, [(CLIENT, false), (CLIENT, false), (CLIENT, true)]);

    // Not DNS: FORMERR with the id it carried.
    let socket = UdpSocket::bind("127.93.1.1:0").await.expect("bind");
    socket
        .send_to(&[0x12, 0x34, 0xff], PROXY)
        .await
        .expect("send");
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
        .await
        .expect("answered")
        .expect("recv");
    let a = Message::from_vec(&buf[..n]).expect("an answer");
    assert_eq!((a.id(), a.response_code()), (0x1234, ResponseCode::FormErr));

    // An answer sent to the proxy is ignored, never forwarded; an update is not implemented.
    let mut answer = query(0x4242, "example.org.", RecordType::A);
    answer.set_message_type(MessageType::Response);
    socket
        .send_to(&answer.to_vec().expect("encode"), PROXY)
        .await
        .expect("send");
    let ignored = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await;
    assert!(ignored.is_err(), "no answer to an answer");
    let mut update = query(11, "cart.shop.svc.cluster.local.", RecordType::A);
    update.set_op_code(OpCode::Update);
    let a = over_udp(CLIENT, PROXY, &update).await;
    assert_eq!((a.id(), a.response_code()), (11, ResponseCode::NotImp));
    assert_eq!(resolver.asked().len(), 3, "neither reached upstream");

    // The upstream resolver gone: SERVFAIL, and the proxy still answers mesh names.
    resolver.stop().await;
    let a = over_udp(CLIENT, PROXY, &query(9, "example.org.", RecordType::A)).await;
    assert_eq!((a.id(), a.response_code()), (9, ResponseCode::ServFail));
    let a = over_udp(
        CLIENT,
        PROXY,
        &query(10, "cart.shop.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(answers(&a), ["cart.shop.svc.cluster.local. 10.96.93.1"]);
    // A record type the proxy does not know: forwarded, and labelled `other`.
    let a = over_udp(
        CLIENT,
        PROXY,
        &query(12, "example.org.", RecordType::Unknown(65280)),
    )
    .await;
    assert_eq!((a.id(), a.response_code()), (12, ResponseCode::ServFail));

    // Labelled as upstream's: the record type, the transport and the asking workload. Messages
    // that are not questions (garbage, an answer, an update) are not requests.
    let labels = |kind: &str, protocol: &str| {
        format!(
            "{{request_query_type=\"{kind}\",request_protocol=\"{protocol}\",\
             source_canonical_service=\"client\",source_canonical_revision=\"latest\"}}"
        )
    };
    let requests = |kind, protocol| {
        let line = format!("istio_dns_requests_total{}", labels(kind, protocol));
        metric(&nodes, &line)
    };
    assert_eq!(requests("a", "udp"), 12.0);
    assert_eq!(requests("aaaa", "udp"), 1.0);
    assert_eq!(requests("mx", "udp"), 1.0);
    assert_eq!(requests("a", "tcp"), 2.0);
    assert_eq!(requests("other", "udp"), 1.0);
    assert_eq!(metric(&nodes, "istio_dns_requests_total{"), 17.0);
    let forwarded = |kind, protocol| {
        let line = format!(
            "istio_dns_upstream_requests_total{}",
            labels(kind, protocol)
        );
        metric(&nodes, &line)
    };
    assert_eq!(forwarded("a", "udp"), 2.0);
    assert_eq!(forwarded("mx", "udp"), 1.0);
    assert_eq!(forwarded("a", "tcp"), 1.0);
    assert_eq!(forwarded("other", "udp"), 1.0);
    assert_eq!(metric(&nodes, "istio_dns_upstream_requests_total{"), 5.0);
    let failed = format!("istio_dns_upstream_failures_total{}", labels("a", "udp"));
    assert_eq!(metric(&nodes, &failed), 1.0);
    assert_eq!(metric(&nodes, "istio_dns_upstream_failures_total{"), 2.0);
    // Every forwarded query's time is recorded, the failed one's too.
    let timed = "istio_dns_upstream_request_duration_seconds_count{";
    assert_eq!(metric(&nodes, timed), 5.0);
    assert_eq!(metric(&nodes, "ztunnel_dns_malformed_requests_total"), 1.0);
}

/// A resolver that takes queries and never answers.
const SILENT: &str = "127.93.9.54:10053";

/// Overload and idleness are contained: with a resolver that never answers, at most 256 UDP
/// queries of one workload wait for it (each answered `SERVFAIL` once the resolver's time is
/// up) and the rest are dropped and counted; a TCP connection that sends no whole query is
/// closed after 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_beyond_the_in_flight_cap_are_dropped_and_idle_tcp_closed() {
    let _silent = UdpSocket::bind(SILENT)
        .await
        .expect("bind the silent resolver");
    let mut nodes = Nodes::new(&MESH.replace("127.93.1.1", "127.93.3.1"));
    nodes.dns = Some(Arc::new(Forwarder::new(
        vec![SILENT.parse().expect("addr")],
        Duration::from_secs(3),
    )));
    let _a = nodes.start("node-a", Arc::new(Loopback)).await;
    let proxy = "127.93.3.1:15053";

    let mut idle = TcpStream::connect(proxy).await.expect("connect");
    let mut partial = TcpStream::connect(proxy).await.expect("connect");
    partial.write_all(&[0]).await.expect("write");
    let opened = tokio::time::Instant::now();

    let socket = UdpSocket::bind("127.93.3.1:0").await.expect("bind");
    for id in 0..300u16 {
        let q = query(id, "example.org.", RecordType::A);
        socket
            .send_to(&q.to_vec().expect("encode"), proxy)
            .await
            .expect("send");
        if id % 5 == 4 {
            // Paced, so that the proxy's socket buffer cannot overflow unless the proxy stalls
            // for over 50 ms.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let (forwarded, dropped) = (
        "istio_dns_upstream_requests_total{",
        "ztunnel_dns_dropped_requests_total",
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while metric(&nodes, forwarded) + metric(&nodes, dropped) < 300.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "every query forwarded or dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&nodes, forwarded), 256.0);
    assert_eq!(metric(&nodes, dropped), 44.0);

    // The queries that waited are answered SERVFAIL once the resolver's time is up; the
    // dropped ones not at all. (Counted by the proxy: the test's own socket may not hold all
    // 256 answers of the burst.)
    let failures = "istio_dns_upstream_failures_total{";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&nodes, failures) < 256.0 {
        assert!(tokio::time::Instant::now() < deadline, "all 256 failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&nodes, failures), 256.0);
    let mut buf = [0u8; 512];
    let mut answered = 0;
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await
    {
        let a = Message::from_vec(&buf[..n]).expect("a DNS answer");
        assert_eq!(a.response_code(), ResponseCode::ServFail);
        answered += 1;
    }
    assert!((1..=256).contains(&answered), "{answered} answers");

    // Both idle connections closed, after the idle time and not before.
    for stream in [&mut idle, &mut partial] {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0)), "closed without an answer: {read:?}");
    }
    let idled = opened.elapsed();
    assert!(
        idled >= Duration::from_millis(4500),
        "closed after {idled:?}, before the idle time"
    );
}
