//! Real transparent capture, end to end: network namespaces for pods on a bridge, istio-cni's
//! iptables rules inside each captured pod, two ztunnels (one per node) fed their pods over ZDS
//! by this test playing the node agent, and ordinary TCP clients that know nothing of the mesh.
//!
//! Needs root (CI runs as root); without it the test fails and says so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hbone::MeshCa;
use mesh::{ConfigDir, Options, Store};
use prometheus_client::registry::Registry;
use ztunnel::inpod::NetNs;
use ztunnel::metrics::Metrics;

#[path = "support/fabric.rs"]
mod fabric;
#[path = "support/poll.rs"]
mod poll;
#[path = "support/sandwich.rs"]
mod sandwich;
use fabric::{Child, Fabric, Mesh, assert_root, start_node, sum};
use poll::poll;
use sandwich::read_proxy_header;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec: {clusterIP: 198.18.250.1, selector: {app: echo}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 198.19.7.1}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-a, namespace: app, labels: {app: echo}}
spec: {nodeName: node-a, serviceAccountName: echo}
status: {podIP: 198.19.7.2}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-b, namespace: app, labels: {app: echo}}
spec: {nodeName: node-b, serviceAccountName: echo}
status: {podIP: 198.19.7.3}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: legacy}
spec: {nodeName: node-a}
status: {podIP: 198.19.7.9}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: legacy}
spec:
  hosts: [db.legacy.test]
  ports: [{number: 5432, name: tcp, protocol: TCP, targetPort: 8080}]
  resolution: STATIC
  endpoints: [{address: 198.19.7.9}]
"#;

/// The addresses an echo server's connections came from, in order.
type Peers = Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>;

/// An echo server inside `netns` on port 8080 (IPv4 and IPv6) that prefixes its answer with
/// `name`; it notes each connection's peer address.
fn echo_server(netns: &NetNs, name: &'static str) -> Peers {
    echo_on(netns, name, 8080)
}

/// [`echo_server`] on `port`.
fn echo_on(netns: &NetNs, name: &'static str, port: u16) -> Peers {
    let listener = netns
        .run_in(|| std::net::TcpListener::bind(("::", port)))
        .expect("enter netns")
        .expect("bind echo");
    let peers = Peers::default();
    let noted = peers.clone();
    std::thread::spawn(move || {
        for (stream, peer) in std::iter::from_fn(|| Some(listener.accept())).flatten() {
            noted.lock().expect("lock").push(peer.ip().to_canonical());
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).is_err() {
                        break;
                    }
                }
            });
        }
    });
    peers
}

/// The peers `peers` has seen since the last call, which forgets them.
fn taken(peers: &Peers) -> Vec<String> {
    let mut seen = peers.lock().expect("lock");
    seen.drain(..).map(|ip| ip.to_string()).collect()
}

/// Connects from inside `netns` (an ordinary, unmarked socket), sends `msg` and returns the
/// answer, or the error.
async fn exchange(
    netns: Arc<NetNs>,
    dst: &str,
    msg: impl AsRef<[u8]> + Send + 'static,
) -> std::io::Result<String> {
    let dst: SocketAddr = dst.parse().expect("addr");
    tokio::task::spawn_blocking(move || {
        let mut s = netns.run_in(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))??;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(msg.as_ref())?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "closed without an answer",
            ));
        }
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .await
    .expect("join")
}

/// Asks `name`'s IPv4 addresses from inside `netns`, over UDP or TCP, of a resolver at
/// 198.18.0.53 (which does not exist: only capture can answer); the addresses and where the
/// answer came from.
fn dns_query(netns: &NetNs, name: &str, tcp: bool) -> (Vec<String>, SocketAddr) {
    let resolver = "198.18.0.53:53".parse().unwrap();
    dns_ask(netns, resolver, name, hickory_proto::rr::RecordType::A, tcp)
}

/// Asks `name`'s records of type `kind` of `resolver` from inside `netns`, over UDP or TCP; the
/// answers and where they came from.
fn dns_ask(
    netns: &NetNs,
    resolver: SocketAddr,
    name: &str,
    kind: hickory_proto::rr::RecordType,
    tcp: bool,
) -> (Vec<String>, SocketAddr) {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::Name;
    let mut query = Message::new();
    query
        .set_id(0x5353)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    let query = query.to_vec().expect("encode");
    let (answer, from) = netns
        .run_in(|| {
            if tcp {
                let mut s = TcpStream::connect_timeout(&resolver, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let len = u16::try_from(query.len()).expect("short query");
                s.write_all(&len.to_be_bytes())?;
                s.write_all(&query)?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len)?;
                let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut answer)?;
                return Ok((answer, s.peer_addr()?));
            }
            let any: SocketAddr = match resolver {
                SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
                SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
            };
            let socket = std::net::UdpSocket::bind(any)?;
            socket.set_read_timeout(Some(Duration::from_secs(5)))?;
            socket.send_to(&query, resolver)?;
            let mut buf = [0u8; 512];
            let (n, from) = socket.recv_from(&mut buf)?;
            Ok::<_, std::io::Error>((buf[..n].to_vec(), from))
        })
        .expect("enter netns")
        .expect("a DNS answer");
    let answer = Message::from_vec(&answer).expect("a DNS message");
    assert_eq!(answer.id(), 0x5353);
    let ips = answer
        .answers()
        .iter()
        .map(|r| r.data().to_string())
        .collect();
    (ips, from)
}

/// The resolver the DNS proxies forward to: in the uncaptured pod, reachable only from the
/// pods' network (not from the namespace the test and its ztunnels run in).
const RESOLVER: &str = "198.19.7.9:53";

/// A resolver inside `netns` on port 53, over UDP and TCP: every `A` question gets 192.0.2.7.
/// Returns how each question came (over TCP or not) and from where, as it saw them.
fn resolver(netns: &NetNs) -> Arc<std::sync::Mutex<Vec<(bool, SocketAddr)>>> {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::{RData, Record, rdata::A};
    let answer = |query: &[u8]| {
        let q = Message::from_vec(query).expect("a query");
        let mut r = Message::new();
        r.set_id(q.id())
            .set_message_type(MessageType::Response)
            .add_queries(q.queries().iter().cloned());
        let name = q.queries()[0].name().clone();
        let ip = "192.0.2.7".parse().expect("ip");
        r.add_answer(Record::from_rdata(name, 60, RData::A(A(ip))));
        r.to_vec().expect("encode")
    };
    let (udp, tcp) = netns
        .run_in(|| {
            Ok::<_, std::io::Error>((
                std::net::UdpSocket::bind("0.0.0.0:53")?,
                std::net::TcpListener::bind("0.0.0.0:53")?,
            ))
        })
        .expect("enter netns")
        .expect("bind the resolver");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let udp_seen = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            udp_seen.lock().expect("lock").push((false, peer));
            let _ = udp.send_to(&answer(&buf[..n]), peer);
        }
    });
    let tcp_seen = seen.clone();
    std::thread::spawn(move || {
        for mut s in tcp.incoming().flatten() {
            let peer = s.peer_addr().expect("peer");
            tcp_seen.lock().expect("lock").push((true, peer));
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).is_err() {
                continue;
            }
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if s.read_exact(&mut q).is_err() {
                continue;
            }
            let a = answer(&q);
            let framed = [&(a.len() as u16).to_be_bytes()[..], &a].concat();
            let _ = s.write_all(&framed);
        }
    });
    seen
}

/// Everything logged in this test binary, to check the access log like an operator would.
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> String {
    String::from_utf8_lossy(
        &LOGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned()
}

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_pods_talk_through_hbone() {
    assert_root();
    tracing_subscriber::fmt()
        .with_writer(|| LogWriter)
        .with_ansi(false)
        // Access events at debug too, as an operator asks for `connection opened`.
        .with_env_filter("info,access=debug")
        .init();
    let mut fabric = Fabric::new(std::process::id() % 10_000);
    let client = Arc::new(fabric.pod(1));
    let echo_a = fabric.pod(2);
    let echo_b = fabric.pod(3);
    let outsider = Arc::new(fabric.pod(9));
    let peers_a = echo_server(&echo_a, "echo-a");
    let peers_b = echo_server(&echo_b, "echo-b");
    echo_server(&outsider, "outsider");
    let seen = resolver(&outsider);

    let dir = std::env::temp_dir().join(format!("ztunnel-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("mesh.yaml"), MESH).expect("write");
    let mut config = ConfigDir::new(&dir, Options::default());
    let store = Store::open(&mut config).expect("config");
    let _watch = store
        .watch(config, Duration::from_millis(50))
        .expect("watch");
    let ca = Arc::new(MeshCa::generate("cluster.local").expect("ca"));
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);

    // One ztunnel per node, each with its own node agent (this test) over ZDS.
    let shared = Mesh {
        store: store.clone(),
        ca: ca.clone(),
        metrics: metrics.clone(),
        dns_upstreams: vec![RESOLVER.parse().expect("addr")],
    };
    let node_a = start_node(
        &dir,
        "node-a",
        &shared,
        &[("client", &client), ("echo-a", &echo_a)],
    )
    .await;
    let node_b = start_node(&dir, "node-b", &shared, &[("echo-b", &echo_b)]).await;
    assert_eq!(node_a.0.workloads().await.len(), 2);
    assert_eq!(node_b.0.workloads().await.len(), 1);

    // DNS: a query to port 53 of any resolver leaves the pod for ztunnel's DNS proxy, which
    // answers mesh names itself, the answer coming back from the resolver's address.
    for (name, tcp) in [
        ("echo.app.svc.cluster.local.", false),
        ("echo.", false),
        ("echo.app.svc.cluster.local.", true),
    ] {
        let (answer, from) = dns_query(&client, name, tcp);
        assert_eq!(from, "198.18.0.53:53".parse::<SocketAddr>().unwrap());
        assert_eq!(answer, ["198.18.250.1"], "{name}");
    }
    // Other names go to the resolver from the pod's own namespace and address, as the pod's
    // query would have (from ztunnel's namespace the resolver is out of reach).
    assert!(
        seen.lock().expect("lock").is_empty(),
        "mesh names forwarded"
    );
    for tcp in [false, true] {
        let (answer, from) = dns_query(&client, "example.org.", tcp);
        assert_eq!(from, "198.18.0.53:53".parse::<SocketAddr>().unwrap());
        assert_eq!(
            answer,
            ["192.0.2.7"],
            "forwarded over {}",
            ["UDP", "TCP"][tcp as usize]
        );
    }
    let pod: std::net::IpAddr = "198.19.7.1".parse().unwrap();
    let sources: Vec<_> = (seen.lock().expect("lock").iter())
        .map(|(tcp, a)| (*tcp, a.ip()))
        .collect();
    assert_eq!(sources, [(false, pod), (true, pod)]);

    // A ServiceEntry that declares no address: the DNS proxy answers with the one allocated to
    // its host, and a pod's connection to it is captured and reaches the entry's endpoint (out
    // of the mesh, so as plain TCP).
    let (answer, _) = dns_query(&client, "db.legacy.test.", false);
    let [allocated] = &answer[..] else {
        panic!("one address: {answer:?}");
    };
    assert!(allocated.starts_with("240.240."), "{allocated}");
    let answer = exchange(client.clone(), &format!("{allocated}:5432"), "egress")
        .await
        .expect("egress");
    assert_eq!(answer, "outsider:egress");

    // SOCKS5 opens connections as the pod: it listens on the pod's loopback only.
    let listening = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            fabric.pod_name(1),
            "ss",
            "-Hltn",
            "sport = :15080",
        ])
        .output()
        .expect("ss");
    let listening = String::from_utf8_lossy(&listening.stdout);
    assert!(
        listening.contains("127.0.0.1:15080") && listening.lines().count() == 1,
        "{listening}"
    );

    // Pod → service VIP: captured by 15001, carried over HBONE, reaches both endpoints.
    taken(&peers_a);
    taken(&peers_b);
    let mut seen = std::collections::BTreeSet::new();
    let mut sent = 0;
    let mut received = 0;
    for _ in 0..20 {
        let answer = exchange(client.clone(), "198.18.250.1:80", "ping")
            .await
            .expect("through the VIP");
        assert!(answer.ends_with(":ping"), "{answer}");
        sent += 4;
        received += answer.len();
        seen.insert(answer.split(':').next().unwrap_or_default().to_owned());
    }
    assert_eq!(seen.len(), 2, "both endpoints, on both nodes: {seen:?}");
    // Each application sees the client pod as its peer, as upstream's original source makes it
    // (the connection from ztunnel in the destination pod binds the caller's address).
    let mut callers = taken(&peers_a);
    callers.extend(taken(&peers_b));
    assert_eq!(callers, ["198.19.7.1"; 20], "the applications' peers");
    // Pod → pod IP on the other node.
    let answer = exchange(client.clone(), "198.19.7.3:8080", "direct")
        .await
        .expect("pod IP");
    assert_eq!(answer, "echo-b:direct");
    assert_eq!(taken(&peers_b), ["198.19.7.1"], "the application's peer");
    // The destination's ztunnel labels pod-IP traffic with the service whose target port it
    // hit (as Istio does); the source's cannot know a service was involved.
    let direct = ("direct".len(), answer.len());
    // An uncaptured pod reaches a captured one as plaintext (through 15006).
    let answer = exchange(outsider.clone(), "198.19.7.2:8080", "plain")
        .await
        .expect("plaintext");
    assert_eq!(answer, "echo-a:plain");
    assert_eq!(
        taken(&peers_a),
        ["198.19.7.9"],
        "the plaintext caller, as the peer"
    );

    // Each ztunnel counts a connection when it closes, after the client has its answer: wait for
    // both reporters (the 20 VIP connections, and at the destination the pod-IP one too).
    let closed = |reporter: &str| {
        sum(
            &metrics_text(&registry),
            "istio_tcp_connections_closed_total",
            &[
                reporter,
                "destination_service=\"echo.app.svc.cluster.local\"",
            ],
        )
    };
    poll(
        || closed("reporter=\"source\"") >= 20.0 && closed("reporter=\"destination\"") >= 21.0,
        |done| *done,
    )
    .await;
    let t = metrics_text(&registry);
    let vip = [
        "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"",
        "destination_service=\"echo.app.svc.cluster.local\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    for (reporter, extra) in [
        ("reporter=\"source\"", (0, 0)),
        ("reporter=\"destination\"", direct),
    ] {
        let labels: Vec<&str> = vip.iter().copied().chain([reporter]).collect();
        let (up, down) = ((sent + extra.0) as f64, (received + extra.1) as f64);
        assert_eq!(
            sum(&t, "istio_tcp_received_bytes_total", &labels),
            up,
            "{reporter}\n{t}"
        );
        assert_eq!(
            sum(&t, "istio_tcp_sent_bytes_total", &labels),
            down,
            "{reporter}\n{t}"
        );
    }
    let plaintext = [
        "reporter=\"destination\"",
        "connection_security_policy=\"unknown\"",
        "destination_workload=\"echo-a\"",
        // Guessed from the port, as for the pod-IP connection over HBONE.
        "destination_service=\"echo.app.svc.cluster.local\"",
    ];
    let counted = poll(
        || {
            sum(
                &metrics_text(&registry),
                "istio_tcp_connections_closed_total",
                &plaintext,
            )
        },
        |counted| *counted >= 1.0,
    )
    .await;
    assert_eq!(
        counted,
        1.0,
        "plaintext counted at the destination\n{}",
        metrics_text(&registry)
    );
    // Plaintext straight to ztunnel's inbound port in the pod: refused once, not relayed back
    // to the same listener again and again.
    assert!(
        exchange(outsider.clone(), "198.19.7.2:15006", "loop")
            .await
            .is_err(),
        "ztunnel's own port refuses"
    );
    let refused = |t: &str| {
        sum(
            t,
            "istio_tcp_connections_closed_total",
            &[plaintext[0], plaintext[2], "response_flags=\"NR\""],
        )
    };
    // The refusal is counted before the client sees its connection close; a loop would go on
    // refusing (or relaying) for as long as this waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = metrics_text(&registry);
    assert_eq!(refused(&t), 1.0, "one refusal, no loop\n{t}");

    // A plaintext connection that lives across the change to STRICT below.
    let held = {
        let outsider = outsider.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<TcpStream> {
            let dst = "198.19.7.2:8080".parse().expect("addr");
            let mut s =
                outsider.run_in(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))??;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"held")?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf)?;
            assert_eq!(&buf[..n], b"echo-a:held");
            Ok(s)
        })
    }
    .await
    .expect("join")
    .expect("a plaintext connection before STRICT");

    // L4 DENY for the client, and STRICT mTLS: both refused. Written whole (a temporary file
    // renamed into place), so no reload can see half of it.
    let version = store.snapshot().version();
    std::fs::write(
        dir.join(".policy.yaml.tmp"),
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: app}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/client]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: app}
spec: {mtls: {mode: STRICT}}
"#,
    )
    .expect("write policy");
    std::fs::rename(dir.join(".policy.yaml.tmp"), dir.join("policy.yaml")).expect("rename");
    poll(|| store.snapshot().version(), |now| *now > version).await;
    assert!(
        exchange(client.clone(), "198.19.7.3:8080", "denied")
            .await
            .is_err(),
        "L4 DENY refuses"
    );
    assert!(
        exchange(outsider.clone(), "198.19.7.2:8080", "plain")
            .await
            .is_err(),
        "STRICT refuses plaintext"
    );
    // ... and closes the plaintext connection that was already open.
    let closed = tokio::task::spawn_blocking(move || {
        let mut held = held;
        let mut buf = [0u8; 64];
        match held.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    })
    .await
    .expect("join");
    assert!(closed, "STRICT closes a live plaintext connection");
    // Counted when the handlers are done, just after the callers saw the ends.
    let denied = || {
        let t = metrics_text(&registry);
        sum(
            &t,
            "istio_tcp_connections_closed_total",
            &["reporter=\"destination\"", "response_flags=\"DENY\""],
        )
    };
    poll(
        || metrics.late_rejections.get() >= 1 && denied() >= 2.0,
        |done| *done,
    )
    .await;
    assert!(
        metrics.late_rejections.get() >= 1,
        "counted as a late rejection"
    );
    let t = metrics_text(&registry);
    assert!(
        sum(
            &t,
            "istio_tcp_connections_closed_total",
            &["reporter=\"destination\"", "response_flags=\"DENY\""]
        ) >= 2.0,
        "{t}"
    );

    let log = logs();
    assert!(
        log.lines().any(|l| l.contains("connection complete")
            && l.contains("direction=\"inbound\"")
            && l.contains("refused with 401: RBAC: access denied by app/deny-client")
            && l.contains("src.identity=spiffe://cluster.local/ns/app/sa/client")),
        "the destination's access log shows the 401 and who was refused:\n{log}"
    );
    assert!(
        log.contains("plaintext refused: PeerAuthentication requires mTLS (STRICT)"),
        "{log}"
    );
    // As upstream logs a tunnel at its destination: where it arrived, and what it asked for.
    assert!(
        log.lines().any(|l| l.contains("connection complete")
            && l.contains("direction=\"inbound\"")
            && l.contains("dst.addr=198.19.7.3:15008")
            && l.contains("dst.hbone_addr=198.19.7.3:8080")),
        "{log}"
    );
    // Each is logged as it opens too, at debug level, as upstream logs it.
    assert!(
        log.lines().any(|l| l.contains(" DEBUG ")
            && l.contains("connection opened")
            && l.contains("direction=\"inbound\"")
            && l.contains("src.identity=spiffe://cluster.local/ns/app/sa/client")
            && l.contains("dst.hbone_addr=198.19.7.3:8080")),
        "{log}"
    );
    // Identities are logged for mTLS only: the client's plain TCP out of the mesh has none.
    let egress = (log.lines())
        .find(|l| {
            l.contains("connection complete")
                && l.contains("direction=\"outbound\"")
                && l.contains("dst.addr=198.19.7.9:8080")
        })
        .unwrap_or_else(|| panic!("the egress connection's log line:\n{log}"));
    assert!(
        egress
            .contains("src.workload=client src.namespace=app src.identity= src.cluster=Kubernetes"),
        "{egress}"
    );
    drop((node_a, node_b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connection from the pod `client` to the echo service's VIP that has had its answer and
/// stays open.
async fn hold(client: Arc<NetNs>) -> TcpStream {
    tokio::task::spawn_blocking(move || {
        let vip: SocketAddr = "198.18.250.1:80".parse().unwrap();
        let mut s = client
            .run_in(|| TcpStream::connect_timeout(&vip, Duration::from_secs(3)))
            .expect("in the pod")
            .expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"held").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"echo:held");
        s
    })
    .await
    .expect("held open")
}

/// The body of `GET path` from `addr` (HTTP/1.0, so the server closes).
fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    http(addr, "GET", path)
}

/// The body of the answer to `method path` on `addr`.
fn http(addr: &str, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nhost: {addr}\r\ncontent-length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// The shipped binaries, as an operator runs them: `ztunnel run --inpod-uds` for the node, and
/// `ztunnel cni` playing istio-cni (rules installed in each pod, pods announced over ZDS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_capture_pods_announced_by_the_cni_tool() {
    assert_root();
    let mut fabric = Fabric::new(std::process::id() % 10_000 + 10_000);
    let client = Arc::new(fabric.pod(1));
    let echo = fabric.pod(2);
    echo_server(&echo, "echo");
    let (client_ns, echo_ns) = (fabric.pod_path(1), fabric.pod_path(2));

    let dir = std::env::temp_dir().join(format!("ztunnel-binaries-{}", std::process::id()));
    let config = dir.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    let node_a_only: String = MESH
        .split("---")
        .filter(|doc| !doc.contains("echo-b"))
        .collect::<Vec<_>>()
        .join("---")
        .replace("name: echo-a", "name: echo");
    std::fs::write(config.join("mesh.yaml"), node_a_only).expect("write");
    let ca = MeshCa::generate("cluster.local").expect("ca");
    std::fs::write(dir.join("ca.pem"), ca.root_pem()).expect("write");
    std::fs::write(dir.join("ca.key"), ca.key_pem()).expect("write");
    let uds = dir.join("zds.sock");
    let path = |p: &std::path::Path| p.display().to_string();

    let binary = env!("CARGO_BIN_EXE_ztunnel");
    let cni = Child(
        Command::new(binary)
            .args(["cni", "--uds", &path(&uds)])
            .args(["--pod", &format!("app/client={client_ns}")])
            .args(["--pod", &format!("app/echo={echo_ns}")])
            .spawn()
            .expect("ztunnel cni"),
    );
    // A client that connects and goes away without a word: the agent carries on for the next.
    poll(|| uds.exists(), |exists| *exists).await;
    let mute = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)
        .expect("socket");
    mute.connect(&socket2::SockAddr::unix(&uds).expect("addr"))
        .expect("the agent listens");
    drop(mute);
    // One worker, as on a small node: the data plane on a current-thread runtime.
    let mut ztunnel = Child(
        Command::new(binary)
            .env("ZTUNNEL_WORKER_THREADS", "1")
            .env("TERMINATION_GRACE_PERIOD_SECONDS", "2")
            .args(["--log", "info"])
            .args(["--admin", "127.77.0.1:15000"])
            .args(["--metrics", "127.77.0.1:15020"])
            .args(["--readiness", "127.77.0.1:15021"])
            .args(["run", "--node", "node-a"])
            .args(["--config", &path(&config)])
            .args(["--ca-cert", &path(&dir.join("ca.pem"))])
            .args(["--ca-key", &path(&dir.join("ca.key"))])
            .args(["--inpod-uds", &path(&uds)])
            .spawn()
            .expect("ztunnel run"),
    );

    // Once the node agent has announced both pods, the client's traffic to the service VIP is
    // captured and carried over HBONE to the echo pod.
    let mut answer = Err(std::io::Error::other("not tried"));
    for _ in 0..100 {
        answer = exchange(client.clone(), "198.18.250.1:80", "ping").await;
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer.expect("through the VIP"), "echo:ping");
    let answer = exchange(client.clone(), "198.19.7.2:8080", "direct")
        .await
        .expect("pod IP");
    assert_eq!(answer, "echo:direct");

    // The operator's view: readiness once the agent's snapshot is in, and Istio's metrics on
    // the Prometheus endpoint, which answers nothing else.
    let readiness = || http_get("127.77.0.1:15021", "/healthz/ready").expect("readiness");
    assert_eq!(poll(readiness, |r| r == "ready\n").await, "ready\n");
    assert_eq!(
        http_get("127.77.0.1:15020", "/config_dump").expect("metrics port"),
        "endpoints: /stats/prometheus /metrics\n",
        "the configuration stays on the admin port"
    );
    // There it shows the pods' certificates, and when each was issued, expires and renews.
    let dump = http_get("127.77.0.1:15000", "/config_dump").expect("admin port");
    for field in [
        "\"identity\": \"spiffe://cluster.local/ns/app/sa/echo\"",
        "\"validFrom\": \"20",
        "\"expirationTime\": \"20",
        "\"refreshAt\": \"20",
    ] {
        assert!(dump.contains(field), "{field} in {dump}");
    }
    // And each pod's connections, as `istioctl ztunnel-config connections` reads them: one
    // held open through the VIP is the client's outbound and the echo pod's inbound.
    let held = hold(client.clone()).await;
    let app = held.local_addr().expect("addr").to_string();
    // Read once the earlier exchanges' connections have left the lists, as each hop closes.
    let dump = || -> serde_json::Value {
        serde_json::from_str(&http_get("127.77.0.1:15000", "/config_dump").expect("admin port"))
            .expect("JSON")
    };
    let settled = |d: &serde_json::Value| {
        let pods = d["workloadState"].as_object().cloned().unwrap_or_default();
        let count = |direction: &str| -> usize {
            (pods.values())
                .filter_map(|p| p["connections"][direction].as_array())
                .map(Vec::len)
                .sum()
        };
        count("outbound") == 1 && count("inbound") == 1
    };
    let dump = poll(dump, settled).await;
    let state = &dump["workloadState"];
    let pod = |name: &str| {
        let found = state.as_object().and_then(|pods| {
            (pods.values()).find(|p| p["info"]["name"] == name && p["state"] == "Up")
        });
        found
            .unwrap_or_else(|| panic!("{name} up in {state}"))
            .clone()
    };
    let outbound = pod("client")["connections"]["outbound"].clone();
    assert_eq!(
        outbound,
        serde_json::json!([{
            "src": app,
            "originalDst": "198.18.250.1:80",
            "actualDst": "198.19.7.2:15008",
            "protocol": "HBONE",
        }]),
        "{state}"
    );
    let inbound = pod("echo")["connections"]["inbound"].clone();
    let inbound = inbound.as_array().expect("a list");
    assert_eq!(inbound.len(), 1, "{state}");
    assert_eq!(inbound[0]["actualDst"], "198.19.7.2:8080", "{state}");
    assert_eq!(
        inbound[0]["originalDst"], "echo.app.svc.cluster.local",
        "{state}"
    );
    assert_eq!(inbound[0]["protocol"], "HBONE", "{state}");
    let caller = inbound[0]["src"].as_str().unwrap_or_default();
    assert!(caller.starts_with("198.19.7.1:"), "{state}");
    drop(held);
    let labels = [
        "reporter=\"source\"",
        "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"",
        "destination_workload=\"echo\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let text = poll(
        || http_get("127.77.0.1:15020", "/stats/prometheus").expect("metrics"),
        |text| sum(text, "istio_tcp_connections_closed_total", &labels) >= 3.0,
    )
    .await;
    assert_eq!(
        sum(&text, "istio_tcp_connections_closed_total", &labels),
        3.0,
        "{text}"
    );

    // The node agent gone, no new pod could be announced: ztunnel is no longer ready.
    drop(cni);
    assert_eq!(
        poll(readiness, |r| r != "ready\n").await,
        "not ready: the node agent's pods are not synced\n"
    );

    // An operator's graceful stop over HTTP: the process drains and exits cleanly, closing a
    // connection still open once the drain deadline passes (1 s, ahead of a 2 s grace period).
    let mut held = hold(client.clone()).await;
    assert_eq!(
        http("127.77.0.1:15000", "POST", "/quitquitquit").expect("admin port"),
        "draining\n"
    );
    // Draining, while the held connection finishes; and still without the agent: both said.
    assert_eq!(
        poll(readiness, |r| r.contains("draining")).await,
        "not ready: draining, the node agent's pods are not synced\n"
    );
    let exited = poll(|| ztunnel.0.try_wait().expect("wait"), Option::is_some).await;
    assert!(
        exited.is_some_and(|status| status.success()),
        "exited cleanly within 5 s: {exited:?}"
    );
    let mut rest = Vec::new();
    let closed = held.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0))
            || closed
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the held connection is closed: {closed:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Dual-stack pods: IPv6 is captured as IPv4 is. The client's connection to the service's IPv6
/// VIP and to the server pod's IPv6 address go over HBONE between the two nodes' ztunnels, and
/// an uncaptured pod's plaintext reaches the server over IPv6 too; the application sees each
/// caller's own IPv6 address. IPv4 keeps working beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_is_captured_as_ipv4_is() {
    assert_root();
    let mut fabric = Fabric::new(std::process::id() % 10_000 + 40_000);
    let client = Arc::new(fabric.pod(1));
    let echo = fabric.pod(3);
    let outsider = Arc::new(fabric.pod(9));
    let peers = echo_server(&echo, "echo");
    // The server pod's application holds port 15080 itself: the pod is served all the same,
    // without a SOCKS5 port, and its callers reach that application there.
    let _own_15080 = echo_on(&echo, "own", 15080);

    let dir = std::env::temp_dir().join(format!("ztunnel-ipv6-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("mesh.yaml"), DUAL_STACK).expect("write");
    let mut config = ConfigDir::new(&dir, Options::default());
    let shared = Mesh {
        store: Store::open(&mut config).expect("config"),
        ca: Arc::new(MeshCa::generate("cluster.local").expect("ca")),
        metrics: Arc::new(Metrics::default()),
        dns_upstreams: Vec::new(),
    };
    let _node_a = start_node(&dir, "node-a", &shared, &[("client", &client)]).await;
    let _node_b = start_node(&dir, "node-b", &shared, &[("echo", &echo)]).await;

    for (dst, what) in [
        ("[fd18::250:1]:80", "the service's IPv6 VIP"),
        ("[fd19:7::3]:8080", "the pod's IPv6 address"),
        ("198.18.250.1:80", "the service's IPv4 VIP"),
    ] {
        let answer = exchange(client.clone(), dst, "ping").await;
        assert_eq!(answer.expect(what), "echo:ping", "{what}");
    }
    assert_eq!(
        taken(&peers),
        ["fd19:7::1", "fd19:7::1", "198.19.7.1"],
        "the client, as itself"
    );

    // The pod's IPv6 DNS is answered by the DNS proxy too, over UDP and TCP: a resolver that
    // does not exist answers the service's IPv6 VIP.
    for tcp in [false, true] {
        let resolver = "[fd18::53]:53".parse().unwrap();
        let name = "echo.app.svc.cluster.local.";
        let kind = hickory_proto::rr::RecordType::AAAA;
        let (answer, from) = dns_ask(&client, resolver, name, kind, tcp);
        assert_eq!(
            answer,
            ["fd18::250:1"],
            "over {}",
            ["UDP", "TCP"][tcp as usize]
        );
        assert_eq!(from, resolver);
    }
    let plaintext = exchange(outsider.clone(), "[fd19:7::3]:8080", "plain").await;
    assert_eq!(plaintext.expect("plaintext over IPv6"), "echo:plain");
    assert_eq!(taken(&peers), ["fd19:7::9"], "the uncaptured caller");

    // Each went through a ztunnel: the server's reported them all, HBONE ones as mTLS, and the
    // plaintext caller known by its IPv6 address.
    let mut registry = Registry::default();
    shared.metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let server = |security: &str| {
        let labels = [
            "reporter=\"destination\"",
            "destination_workload=\"echo\"",
            security,
        ];
        sum(&text, "istio_tcp_connections_opened_total", &labels)
    };
    assert_eq!(
        server("connection_security_policy=\"mutual_tls\""),
        3.0,
        "{text}"
    );
    assert_eq!(server("source_workload=\"outsider\""), 1.0, "{text}");

    let answer = exchange(client.clone(), "[fd19:7::3]:15080", "socks?").await;
    assert_eq!(
        answer.expect("the application's own 15080"),
        "own:socks?",
        "port 15080 is the application's"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Dual-stack pods on two nodes, a dual-stack service, and a dual-stack pod outside the mesh.
const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec:
  clusterIP: 198.18.250.1
  clusterIPs: [198.18.250.1, "fd18::250:1"]
  ipFamilies: [IPv4, IPv6]
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 198.19.7.1, podIPs: [{ip: 198.19.7.1}, {ip: "fd19:7::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: app, labels: {app: echo}}
spec: {nodeName: node-b, serviceAccountName: echo}
status: {podIP: 198.19.7.3, podIPs: [{ip: 198.19.7.3}, {ip: "fd19:7::3"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: legacy}
spec: {nodeName: node-a}
status: {podIP: 198.19.7.9, podIPs: [{ip: 198.19.7.9}, {ip: "fd19:7::9"}]}
"#;

/// A sandwiched waypoint (one that takes its tunnels over PROXY protocol) in a captured pod, bound
/// as kgateway's are: its GatewayClass says `PROXY` with no port, so each tunnel comes to the
/// port it targets. The client's ztunnel sends the service's traffic to the waypoint's pod,
/// whose ztunnel hands each tunnel over with a PROXY header; what the waypoint then sends on to
/// the service is captured in its own pod and goes to an endpoint, not back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandwiched_waypoint_in_a_captured_pod_gets_proxy_headers() {
    assert_root();
    // Tags apart from the other capture tests' (this file's and the waypoint's).
    let mut fabric = Fabric::new(std::process::id() % 10_000 + 30_000);
    let client = Arc::new(fabric.pod(1));
    let echo = fabric.pod(2);
    let waypoint = Arc::new(fabric.pod(4));
    let outsider = Arc::new(fabric.pod(9));
    let peers = echo_server(&echo, "echo-a");

    let dir = std::env::temp_dir().join(format!("ztunnel-sandwich-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mesh: String = MESH
        .split("---")
        .filter(|doc| !doc.contains("echo-b"))
        .collect::<Vec<_>>()
        .join("---")
        .replace(
            "metadata: {name: echo, namespace: app}",
            "metadata: {name: echo, namespace: app, labels: {istio.io/use-waypoint: sandwich}}",
        )
        + &sandwich::waypoint_yaml("198.19.7.4", sandwich::Binding::OnClassWithoutPort);
    std::fs::write(dir.join("mesh.yaml"), mesh).expect("write");
    let mut config = ConfigDir::new(&dir, Options::default());
    let store = Store::open(&mut config).expect("config");
    let shared = Mesh {
        store,
        ca: Arc::new(MeshCa::generate("cluster.local").expect("ca")),
        metrics: Arc::default(),
        dns_upstreams: Vec::new(),
    };

    // The waypoint: reads the header, reports it with the connection's source, and forwards to
    // the target it names with an ordinary connection from its pod (which its pod's rules
    // capture). It listens on the service's port, on every address, as a careless waypoint
    // might; ztunnel comes to it on the pod's loopback.
    let listener = waypoint
        .run_in(|| std::net::TcpListener::bind("0.0.0.0:80"))
        .expect("enter netns")
        .expect("bind the PROXY port");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let (headers_tx, mut headers) = tokio::sync::mpsc::unbounded_channel();
    {
        let waypoint = waypoint.clone();
        tokio::spawn(async move {
            while let Ok((mut downstream, from)) = listener.accept().await {
                let header = read_proxy_header(&mut downstream).await;
                let dst = header.1;
                headers_tx.send((from, header)).expect("the test listens");
                let waypoint = waypoint.clone();
                tokio::spawn(async move {
                    let upstream = tokio::task::spawn_blocking(move || {
                        waypoint.run_in(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
                    })
                    .await
                    .expect("join")
                    .expect("enter netns")
                    .expect("the waypoint's own connection to the service");
                    upstream.set_nonblocking(true).expect("nonblocking");
                    let mut upstream =
                        tokio::net::TcpStream::from_std(upstream).expect("tokio stream");
                    let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                });
            }
        });
    }

    let _node_a = start_node(
        &dir,
        "node-a",
        &shared,
        &[("client", &client), ("echo-a", &echo)],
    )
    .await;
    let _node_b = start_node(&dir, "node-b", &shared, &[("sandwich-0", &waypoint)]).await;

    let answer = exchange(client.clone(), "198.18.250.1:80", "ping")
        .await
        .expect("through the sandwiched waypoint");
    assert_eq!(answer, "echo-a:ping");
    assert_eq!(
        taken(&peers),
        ["198.19.7.4"],
        "the application's peer is the waypoint, whose connection it is"
    );
    let (from, (src, dst, tlvs)) = headers.try_recv().expect("the waypoint saw a PROXY header");
    assert_eq!(
        from.ip().to_string(),
        "127.0.0.1",
        "over the pod's loopback"
    );
    assert_eq!(src.ip().to_string(), "198.19.7.1", "the original client");
    assert_eq!(dst.to_string(), "198.18.250.1:80", "the service VIP:port");
    assert_eq!(
        tlvs,
        [(0xD0, b"spiffe://cluster.local/ns/app/sa/client".to_vec())],
        "the client's identity"
    );

    // A caller outside the mesh that reaches the pod's address in plaintext, header in hand,
    // claiming the client's identity: its ztunnel refuses it before the waypoint reads a byte.
    let identity = b"spiffe://cluster.local/ns/app/sa/client";
    let mut forged = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    forged.extend_from_slice(&((12 + 3 + identity.len()) as u16).to_be_bytes());
    forged.extend_from_slice(&[10, 1, 1, 1, 10, 2, 2, 2, 0x10, 0x10, 0x20, 0x20]);
    forged.push(0xD0);
    forged.extend_from_slice(&(identity.len() as u16).to_be_bytes());
    forged.extend_from_slice(identity);
    assert!(
        exchange(outsider.clone(), "198.19.7.4:80", forged)
            .await
            .is_err(),
        "plaintext to the PROXY port is refused"
    );
    // Nor may it reach the pod behind the waypoint directly: it would skip the waypoint.
    assert!(
        exchange(outsider, "198.19.7.2:8080", "around")
            .await
            .is_err(),
        "plaintext to a pod bound to a waypoint is refused"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        headers.try_recv().is_err(),
        "the waypoint never saw the forged header"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
