//! End to end on loopback: real ztunnels (one per node) on per-workload 127.x addresses, real
//! HBONE between them, sample backends, and ordinary clients speaking SOCKS5.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use local::LocalMesh;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "../../ztunnel/tests/support/sandwich.rs"]
mod sandwich;
use sandwich::read_proxy_header;
#[path = "../../ztunnel/tests/support/scratch.rs"]
mod scratch;
use scratch::Dir;

/// A mesh on `127.<net>.0.0/16`: namespace `app` (ambient) with `client` and `server-1` on
/// node-a, `server-2` on node-b, service `server` (VIP 10.<net>.0.1:80 → http 8080); namespace
/// `legacy` (not captured) with `outsider` on node-a, whose port 8080 is served directly.
fn mesh_yaml(net: u8, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: app, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: app}}
spec: {{clusterIP: 10.{net}.0.1, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: http}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: app, labels: {{app: client}}}}
spec: {{nodeName: node-a, serviceAccountName: client}}
status: {{podIP: 127.{net}.1.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server-1, namespace: app, labels: {{app: server}}}}
spec: {{nodeName: node-a, serviceAccountName: server, containers: [{{name: s, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: 127.{net}.1.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server-2, namespace: app, labels: {{app: server}}}}
spec: {{nodeName: node-b, serviceAccountName: server, containers: [{{name: s, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: 127.{net}.2.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: outsider, namespace: legacy, labels: {{app: outsider}}}}
spec: {{nodeName: node-a, containers: [{{name: s, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: 127.{net}.9.1}}
{extra}"#
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Opens a SOCKS5 tunnel from the workload at `from`; returns the stream and the reply code.
async fn socks(from: IpAddr, host: &str, port: u16) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(SocketAddr::new(from, 15080))
        .await
        .expect("socks port");
    let mut req = vec![5, 1, 0, 5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.expect("write");
    let mut reply = [0u8; 12];
    s.read_exact(&mut reply).await.expect("reply");
    (s, reply[3])
}

/// Sends one HTTP/1.1 request on `s`; returns (bytes sent, the whole response).
async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, path: &str) -> (usize, String) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    s.read_to_string(&mut response).await.expect("read");
    (request.len(), response)
}

fn metrics(mesh: &LocalMesh) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &mesh.registry).expect("encode");
    text
}

/// Sums the samples of `metric` whose labels contain every `label="value"` in `labels`.
fn sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_traffic_goes_through_hbone_and_is_counted() {
    let dir = Dir::with_mesh(&mesh_yaml(31, ""));
    let mesh = LocalMesh::start(&dir.0).await.expect("mesh starts");
    assert_eq!(mesh.nodes.len(), 2);

    // By VIP and by hostname; both endpoints answer eventually (one on each node).
    let mut seen = std::collections::BTreeSet::new();
    let mut sent = 0;
    let mut received = 0;
    for i in 0..40 {
        let (s, code) = if i % 2 == 0 {
            socks(ip("127.31.1.1"), "10.31.0.1", 80).await
        } else {
            socks(ip("127.31.1.1"), "server.app.svc.cluster.local", 80).await
        };
        assert_eq!(code, 0, "SOCKS5 success");
        let (n, response) = http_get(s, "/hello").await;
        sent += n;
        received += response.len();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("you asked for GET /hello"), "{response}");
        // The backend sees the client's address, not its own ztunnel's or workload's.
        assert!(
            response.contains("(connection from 127.31.1.1:"),
            "{response}"
        );
        let who = response
            .lines()
            .find(|l| l.starts_with("hello from"))
            .expect("who")
            .to_owned();
        assert!(
            who.contains("spiffe://cluster.local/ns/app/sa/server"),
            "{who}"
        );
        seen.insert(who);
    }
    assert_eq!(seen.len(), 2, "both endpoints served: {seen:?}");

    // Both reporters count every connection and every byte, request direction as received.
    let m = &mesh;
    eventually("connections closed on both sides", || {
        let t = metrics(m);
        sum(
            &t,
            "istio_tcp_connections_closed_total",
            &["reporter=\"destination\""],
        ) == 40.0
            && sum(
                &t,
                "istio_tcp_connections_closed_total",
                &["reporter=\"source\""],
            ) == 40.0
    })
    .await;
    let t = metrics(&mesh);
    let common = [
        "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"",
        "destination_service=\"server.app.svc.cluster.local\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    for reporter in ["reporter=\"source\"", "reporter=\"destination\""] {
        let labels: Vec<&str> = common.iter().copied().chain([reporter]).collect();
        assert_eq!(
            sum(&t, "istio_tcp_received_bytes_total", &labels),
            sent as f64,
            "{reporter}"
        );
        assert_eq!(
            sum(&t, "istio_tcp_sent_bytes_total", &labels),
            received as f64,
            "{reporter}"
        );
        assert_eq!(
            sum(&t, "istio_tcp_connections_opened_total", &labels),
            40.0,
            "{reporter}"
        );
    }
    mesh.shutdown(Duration::from_secs(1)).await;
}

/// A pod that backs two services on one port: the destination reports the one the caller
/// addressed, which the source names in `forwarded; host=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_reports_the_service_the_caller_addressed() {
    let canary = r#"
---
apiVersion: v1
kind: Service
metadata: {name: canary, namespace: app}
spec: {clusterIP: 10.37.0.2, selector: {app: server}, ports: [{name: http, port: 80, targetPort: http}]}
"#;
    let dir = Dir::with_mesh(&mesh_yaml(37, canary));
    let mesh = LocalMesh::start(&dir.0).await.expect("mesh starts");
    for vip in ["10.37.0.1", "10.37.0.2"] {
        let (s, code) = socks(ip("127.37.1.1"), vip, 80).await;
        assert_eq!(code, 0, "SOCKS5 success");
        let (_, response) = http_get(s, "/").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    let m = &mesh;
    let closed = |service: &str| {
        let service = format!("destination_service=\"{service}.app.svc.cluster.local\"");
        sum(
            &metrics(m),
            "istio_tcp_connections_closed_total",
            &["reporter=\"destination\"", &service],
        )
    };
    eventually("both connections counted by the destination", || {
        closed("server") + closed("canary") == 2.0
    })
    .await;
    assert_eq!((closed("server"), closed("canary")), (1.0, 1.0));
    mesh.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_policy_denies_and_late_changes_close_live_connections() {
    let dir = Dir::with_mesh(&mesh_yaml(32, ""));
    let mesh = LocalMesh::start(&dir.0).await.expect("mesh starts");

    // A live connection, idle in the middle of a request.
    let (mut live, code) = socks(ip("127.32.1.1"), "127.32.2.1", 8080).await;
    assert_eq!(code, 0);
    live.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("partial request");

    // A DENY for the client's identity: new connections are refused with 401 upstream (SOCKS
    // "not allowed"), and the live one is closed.
    dir.write(
        "deny.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: app}
spec:
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/client]}}]}]
"#,
    );
    let m = &mesh;
    eventually("the policy to apply", || m.store.snapshot().version() > 1).await;
    let (_, code) = socks(ip("127.32.1.1"), "server.app.svc.cluster.local", 80).await;
    assert_eq!(code, 2, "connection not allowed by ruleset");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), live.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the live connection was closed");
    eventually("late rejection counted", || {
        metrics(m).contains("ztunnel_authorization_late_rejections_total 1")
    })
    .await;
    // Each is counted closed when its handler is done, just after the caller saw it end.
    eventually("both denied connections counted closed", || {
        let t = metrics(m);
        sum(
            &t,
            "istio_tcp_connections_closed_total",
            &["reporter=\"destination\"", "response_flags=\"DENY\""],
        ) >= 2.0
    })
    .await;
    mesh.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_bypass_self_calls_and_passthrough() {
    let extra = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: node-b, serviceAccountName: waypoint}
status: {podIP: 127.33.2.9}
---
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: app, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.33.0.2, selector: {app: guarded}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: guarded, namespace: app, labels: {app: guarded}}
spec: {nodeName: node-b, serviceAccountName: guarded}
status: {podIP: 127.33.2.2}
"#;
    let dir = Dir::with_mesh(&mesh_yaml(33, extra));
    let mesh = LocalMesh::start(&dir.0).await.expect("mesh starts");

    // Dialling the pod of a waypoint-bound service directly is refused by its ztunnel ...
    let (_, code) = socks(ip("127.33.1.1"), "127.33.2.2", 8080).await;
    assert_eq!(code, 2, "a caller that bypasses the waypoint is refused");
    // ... unless an ALLOW policy of the user's lets that caller in, as with istiod's implicit
    // ALLOW for the waypoint.
    dir.write(
        "allow.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: app}
spec:
  selector: {matchLabels: {app: guarded}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/client]}}]}]
"#,
    );
    let m = &mesh;
    eventually("the policy to apply", || m.store.snapshot().version() > 1).await;
    let (s, code) = socks(ip("127.33.1.1"), "127.33.2.2", 8080).await;
    assert_eq!(code, 0, "explicitly allowed");
    let (_, response) = http_get(s, "/").await;
    assert!(response.contains("hello from app/guarded"), "{response}");
    // Self call.
    let (_, code) = socks(ip("127.33.1.1"), "127.33.1.1", 15008).await;
    assert_eq!(code, 2, "ztunnel's own port");
    // Another workload's ztunnel ports: its ztunnel refuses the tunnel (through its SOCKS5 port
    // the caller would otherwise open connections as that workload).
    for port in [15001, 15006, 15008, 15080] {
        let (_, code) = socks(ip("127.33.1.1"), "127.33.2.1", port).await;
        assert_eq!(code, 5, "ztunnel's own port {port} on server-2");
    }
    eventually("the refusals to be counted at server-2", || {
        let labels = [
            "reporter=\"destination\"",
            "destination_workload=\"server-2\"",
            "response_flags=\"NR\"",
        ];
        sum(&metrics(m), "istio_tcp_connections_closed_total", &labels) == 4.0
    })
    .await;
    // The uncaptured workload is reached with plain TCP.
    let (s, code) = socks(ip("127.33.1.1"), "127.33.9.1", 8080).await;
    assert_eq!(code, 0);
    let (_, response) = http_get(s, "/").await;
    assert!(
        response.contains("hello from legacy/outsider"),
        "{response}"
    );
    eventually("the plain-TCP connection to be counted", || {
        let labels = [
            "reporter=\"source\"",
            "destination_workload=\"outsider\"",
            "connection_security_policy=\"unknown\"",
        ];
        sum(&metrics(m), "istio_tcp_connections_closed_total", &labels) == 1.0
    })
    .await;
    mesh.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_accepts_a_service_hostname_authority() {
    use std::sync::Arc;

    use hbone::{Authority, CertManager, ConnectHeaders, ConnectRequest, Identity, Pool};

    let dir = Dir::with_mesh(&mesh_yaml(34, ""));
    let mesh = LocalMesh::start(&dir.0).await.expect("mesh starts");
    let pool = Pool::new(
        Arc::new(CertManager::new(mesh.ca.clone())),
        hbone::Config::default(),
    );
    let connect = |host: &str, port: u16| ConnectRequest {
        src: Identity::new("cluster.local", "app", "client").unwrap(),
        dst_identities: vec![Identity::new("cluster.local", "app", "server").unwrap()],
        next_hop: "127.34.1.2:15008".parse().unwrap(),
        authority: Authority::Host {
            host: host.into(),
            port,
        },
        headers: ConnectHeaders::default(),
    };
    // The service port's target port, on the workload the tunnel reached.
    let tunnel = pool
        .connect(connect("server.app.svc.cluster.local", 80))
        .await
        .expect("a hostname authority is accepted");
    let (_, response) = http_get(tunnel, "/").await;
    assert!(response.contains("hello from app/server-1"), "{response}");
    let m = &mesh;
    eventually(
        "the destination to count it under the named service",
        || {
            let labels = [
                "reporter=\"destination\"",
                "destination_service=\"server.app.svc.cluster.local\"",
                "destination_workload=\"server-1\"",
            ];
            sum(&metrics(m), "istio_tcp_connections_closed_total", &labels) == 1.0
        },
    )
    .await;

    // A service this workload does not back, or a port the service does not have: 503.
    for (host, port) in [
        ("ghost.app.svc.cluster.local", 80),
        ("server.app.svc.cluster.local", 81),
    ] {
        let e = pool
            .connect(connect(host, port))
            .await
            .expect_err("no such service port here");
        assert_eq!(
            e.status(),
            Some(http::StatusCode::SERVICE_UNAVAILABLE),
            "{host}:{port}"
        );
    }
    mesh.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandwiched_waypoint_gets_its_tunnels_over_proxy_protocol() {
    let yaml = sandwich::waypoint_yaml("127.35.2.9", sandwich::Binding::OnGateway)
        + r#"
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: app, labels: {istio.io/use-waypoint: sandwich}}
spec: {clusterIP: 10.35.0.2, selector: {app: server}, ports: [{name: http, port: 9080, targetPort: http}]}
"#;
    let dir = Dir::with_mesh(&mesh_yaml(35, &yaml));
    // The sandwiched waypoint (what kgateway or an Envoy waypoint would be): it takes PROXY
    // connections on 15088, reports the header, and forwards the request to the service it was
    // meant for through its own ztunnel, which must send it to an endpoint, not back here.
    let waypoint = tokio::net::TcpListener::bind("127.35.2.9:15088")
        .await
        .expect("bind the waypoint's PROXY port");
    let (headers_tx, mut headers) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut downstream, _)) = waypoint.accept().await {
            let header = read_proxy_header(&mut downstream).await;
            let (dst, headers_tx) = (header.1, headers_tx.clone());
            headers_tx.send(header).expect("test listens");
            tokio::spawn(async move {
                let (mut upstream, code) =
                    socks(ip("127.35.2.9"), &dst.ip().to_string(), dst.port()).await;
                assert_eq!(code, 0, "the waypoint's own ztunnel forwards to {dst}");
                let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
            });
        }
    });
    let mesh = LocalMesh::start(&dir.0).await.expect("mesh starts");
    assert!(
        mesh.waypoints.is_empty(),
        "a sandwiched waypoint is not ours to run"
    );

    // Client → its ztunnel → HBONE to the waypoint's pod → that node's ztunnel → PROXY → waypoint
    // → the waypoint's ztunnel → HBONE → an endpoint.
    let (s, code) = socks(ip("127.35.1.1"), "reviews.app.svc.cluster.local", 9080).await;
    assert_eq!(code, 0, "the tunnel to the sandwiched waypoint is accepted");
    let (src, dst, tlvs) = headers.recv().await.expect("a PROXY header");
    assert_eq!(src.ip(), ip("127.35.1.1"), "the original client");
    assert_eq!(
        dst,
        "10.35.0.2:9080".parse().unwrap(),
        "the service VIP:port"
    );
    assert_eq!(
        tlvs,
        [(0xD0, b"spiffe://cluster.local/ns/app/sa/client".to_vec())],
        "the client's identity"
    );
    let (_, response) = http_get(s, "/reviews").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("you asked for GET /reviews"),
        "{response}"
    );
    assert!(response.contains("hello from app/server-"), "{response}");
    let m = &mesh;
    eventually("the waypoint's ztunnel to count the tunnel", || {
        let labels = [
            "reporter=\"destination\"",
            "destination_workload=\"sandwich-0\"",
            "destination_service=\"reviews.app.svc.cluster.local\"",
            "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"",
        ];
        sum(&metrics(m), "istio_tcp_connections_closed_total", &labels) == 1.0
    })
    .await;

    // A peer that names the service by hostname: the header carries its VIP; an unknown one
    // is refused before the waypoint sees anything.
    {
        use std::sync::Arc;

        use hbone::{Authority, CertManager, ConnectHeaders, ConnectRequest, Identity, Pool};

        let pool = Pool::new(
            Arc::new(CertManager::new(mesh.ca.clone())),
            hbone::Config::default(),
        );
        let connect = |host: &str| ConnectRequest {
            src: Identity::new("cluster.local", "app", "client").unwrap(),
            dst_identities: vec![Identity::new("cluster.local", "app", "sandwich").unwrap()],
            next_hop: "127.35.2.9:15008".parse().unwrap(),
            authority: Authority::Host {
                host: host.into(),
                port: 9080,
            },
            headers: ConnectHeaders::default(),
        };
        let tunnel = pool
            .connect(connect("reviews.app.svc.cluster.local"))
            .await
            .expect("a hostname authority is accepted");
        let (_, dst, tlvs) = headers.recv().await.expect("a PROXY header");
        assert_eq!(
            dst,
            "10.35.0.2:9080".parse().unwrap(),
            "the named service's VIP"
        );
        assert_eq!(
            tlvs,
            [
                (0xD0, b"spiffe://cluster.local/ns/app/sa/client".to_vec()),
                (0xD1, b"reviews.app.svc.cluster.local".to_vec())
            ],
            "the client's identity, then the name the tunnel gave"
        );
        let (_, response) = http_get(tunnel, "/by-name").await;
        assert!(
            response.contains("you asked for GET /by-name"),
            "{response}"
        );
        // This peer dials from no workload's address: the telemetry still names the principal
        // its certificate proved, as upstream does.
        eventually("the tunnel from an unknown address to be counted", || {
            let labels = [
                "reporter=\"destination\"",
                "source_workload=\"unknown\"",
                "source_workload_namespace=\"app\"",
                "source_principal=\"spiffe://cluster.local/ns/app/sa/client\"",
            ];
            sum(&metrics(m), "istio_tcp_connections_closed_total", &labels) == 1.0
        })
        .await;
        let e = pool
            .connect(connect("ghost.app.svc.cluster.local"))
            .await
            .expect_err("no such service");
        assert_eq!(e.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));
    }

    // ztunnel enforces the waypoint workload's L4 policies before handing a tunnel over; as
    // upstream, they see the waypoint's own port (the binding's), not the service's.
    dir.write(
        "deny.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client-at-the-waypoint, namespace: app}
spec:
  selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: sandwich}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/app/sa/client]}}]
    to: [{operation: {ports: ["15088"]}}]
"#,
    );
    eventually("the policy to apply", || m.store.snapshot().version() > 1).await;
    let (_, code) = socks(ip("127.35.1.1"), "10.35.0.2", 9080).await;
    assert_eq!(code, 2, "connection not allowed by ruleset");
    assert!(
        headers.try_recv().is_err(),
        "a denied tunnel never reaches the waypoint"
    );
    mesh.shutdown(Duration::from_secs(1)).await;
}
