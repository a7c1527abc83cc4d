//! The three stages end to end: client ztunnel → waypoint (HBONE in, HTTP, HBONE out) →
//! endpoint's ztunnel → pod; and what the waypoint refuses.

#[path = "../../ztunnel/tests/support/sandwich.rs"]
#[allow(dead_code)] // the PROXY header reader is for the tests that play the waypoint
mod sandwich;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use support::Mesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_bound_service_go_through_the_waypoint() {
    let mesh = Mesh::start(41, "").await;
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = mesh
            .request("GET", "/hello?x=1", &[("x-test", "yes")], "")
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("path=/hello?x=1"), "{}", r.body);
        assert!(r.body.contains("x-test: yes"), "{}", r.body);
        backends.insert(r.backend().to_owned());
    }
    // No route attached: the service's endpoints share the load.
    assert_eq!(backends.len(), 2, "{backends:?}");
    // The waypoint counted the requests with Istio's labels.
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    mesh.metrics.register(&mut registry);
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("istio_requests_total{reporter=\"waypoint\""),
        "{text}"
    );
    assert!(
        text.contains("source_principal=\"spiffe://cluster.local/ns/app/sa/client\""),
        "{text}"
    );
    assert!(
        text.contains("destination_service=\"echo.app.svc.cluster.local\""),
        "{text}"
    );
    assert!(text.contains("response_code=\"200\""), "{text}");
    mesh.shutdown().await;
}

/// A service of another namespace, ahead of `app` in every list, that declares the echo
/// service's VIP too: the client's ztunnel takes its own namespace's, and so must the waypoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_another_namespace_shares_is_served_as_the_callers() {
    let extra = r#"
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: aaa}
spec: {clusterIP: 10.78.0.1, selector: {app: nothing}, ports: [{name: http, port: 80}]}
"#;
    let mesh = Mesh::start(78, extra).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("path=/"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cannot_bypass_the_waypoint() {
    let mesh = Mesh::start(42, "").await;
    // Straight to the pod: its ztunnel refuses tunnels that did not come from the waypoint.
    let direct = mesh
        .request_to(&mesh.ip("1.2").to_string(), 8080, "GET", "/", &[], "")
        .await;
    assert!(direct.is_err(), "bypass must fail: {direct:?}");
    // Through the VIP it works.
    assert_eq!(mesh.request("GET", "/", &[], "").await.status, 200);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ports_are_copied_not_parsed() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mesh = Mesh::start(43, "").await;
    let stream = mesh.socks("10.43.0.3", 90).await.unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    let mut who = String::new();
    stream.read_line(&mut who).await.unwrap();
    assert!(who.starts_with("echo-v"), "{who}");
    // Not HTTP: the waypoint would answer 400 if it parsed this.
    stream
        .get_mut()
        .write_all(b"\x00\x01binary\n")
        .await
        .unwrap();
    let mut echoed = String::new();
    stream.read_line(&mut echoed).await.unwrap();
    assert_eq!(echoed, "\u{0}\u{1}binary\n");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_without_a_protocol_are_sniffed() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let net = 73;
    // Ports with no appProtocol and no protocol in their name: one lands on the echo pods'
    // TCP echo, one on their HTTP server.
    let services = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: any-tcp, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: 10.{net}.0.21, selector: {{app: echo}}, ports: [{{name: data, port: 91, targetPort: 9000}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: any-http, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: 10.{net}.0.22, selector: {{app: echo}}, ports: [{{port: 92, targetPort: 8080}}]}}
---
"#
    );
    let mesh = Mesh::start(net, &services).await;

    // Not HTTP: copied as bytes (the waypoint would answer 400 if it parsed them). The backend
    // greets first, but the waypoint decides on the client's first bytes, so they go first.
    let stream = mesh.socks(&format!("10.{net}.0.21"), 91).await.unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"*1\r\n$4\r\nPING\n")
        .await
        .unwrap();
    let mut who = String::new();
    stream.read_line(&mut who).await.unwrap();
    assert!(who.starts_with("echo-v"), "{who}");
    let mut echoed = String::new();
    stream.read_line(&mut echoed).await.unwrap();
    assert_eq!(echoed, "*1\r\n");

    // HTTP: routed and answered as HTTP, the request reaching the backend parsed.
    let r = mesh
        .request_to(&format!("10.{net}.0.22"), 92, "GET", "/sniffed", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("path=/sniffed"), "{}", r.body);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tunnels_are_kept_alive_between_requests() {
    let net = 74;
    let policy = |extra: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: app}}
spec:
  host: echo.app.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}{extra}}}
"#
        )
    };
    let mesh = Mesh::start(net, &policy("")).await;
    let user = [("x-user", "alice")];
    let connection = |r: &support::Response| r.header("x-connection").unwrap_or("?").to_owned();

    // Sequential requests to one endpoint ride one tunnel and one application connection,
    // even though each comes from a new client connection.
    let first = mesh.request("GET", "/", &user, "").await;
    assert_eq!(first.status, 200, "{}", first.body);
    for _ in 0..4 {
        let r = mesh.request("GET", "/", &user, "").await;
        assert_eq!(connection(&r), connection(&first));
    }
    // A body on the way up and down keeps the message boundary.
    let r = mesh
        .request("POST", "/upload", &user, &"x".repeat(10_000))
        .await;
    assert_eq!((r.status, connection(&r)), (200, connection(&first)));

    // `connection: close` from the application ends it; the next request opens another.
    let closing = mesh
        .request("GET", "/", &[("x-user", "alice"), ("x-close", "1")], "")
        .await;
    assert_eq!(connection(&closing), connection(&first));
    let after = mesh.request("GET", "/", &user, "").await;
    assert_eq!(after.status, 200, "{}", after.body);
    assert_ne!(connection(&after), connection(&first));

    // A failed exchange is not parked: the next request gets a fresh connection.
    let failed = mesh
        .request(
            "GET",
            "/",
            &[
                ("x-user", "alice"),
                ("x-fail", "echo-v1,echo-v2"),
                ("x-fail-with", "close"),
            ],
            "",
        )
        .await;
    assert_eq!(failed.status, 503, "{}", failed.body);
    let r = mesh.request("GET", "/", &user, "").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // maxRequestsPerConnection: 2 requests, then a new connection.
    mesh.set_routes(&policy(
        ", connectionPool: {http: {maxRequestsPerConnection: 2}}",
    ))
    .await;
    let seen: Vec<String> = {
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(connection(&mesh.request("GET", "/", &user, "").await));
        }
        seen
    };
    let mut uses = std::collections::BTreeMap::<&String, usize>::new();
    for c in &seen {
        *uses.entry(c).or_default() += 1;
    }
    assert!(
        uses.values().all(|&n| n <= 2),
        "at most two requests each: {seen:?}"
    );
    assert!(
        uses.values().filter(|&&n| n == 2).count() >= 2,
        "and two while allowed: {seen:?}"
    );
    mesh.shutdown().await;
}

/// An HTTP/1.1 server that answers one request per connection and then closes it, without
/// saying so (`connection: close`), as servers do with idle keep-alive connections.
async fn one_shot_server(listener: tokio::net::TcpListener, accepted: Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_tunnel_the_application_closed_is_not_reused() {
    let net = 75;
    let flaky = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: flaky, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: 10.{net}.0.6, selector: {{app: flaky}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: flaky-1, namespace: app, labels: {{app: flaky}}}}
spec: {{nodeName: node-b, serviceAccountName: flaky}}
status: {{podIP: 127.{net}.2.4}}
---
"#
    );
    let listener = tokio::net::TcpListener::bind((format!("127.{net}.2.4"), 8080))
        .await
        .unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let server = tokio::spawn(one_shot_server(listener, accepted.clone()));
    let mesh = Mesh::start(net, &flaky).await;
    let vip = format!("10.{net}.0.6");
    for _ in 0..3 {
        let r = mesh
            .request_to(&vip, 80, "GET", "/", &[], "")
            .await
            .expect("an answer");
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        // Long enough for the close to travel back through both ztunnels.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(accepted.load(Ordering::Relaxed), 3, "one connection each");

    // Back to back, the next request takes the tunnel up before the application closes it: it
    // fails there, and goes again on a fresh one.
    for _ in 0..3 {
        let r = mesh
            .request_to(&vip, 80, "GET", "/", &[], "")
            .await
            .expect("an answer");
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    }
    mesh.shutdown().await;
    server.abort();
}

#[tokio::test]
async fn a_sandwiched_gateway_is_refused_with_the_reason() {
    use hbone::{CertManager, MeshCa};
    use mesh::{ConfigDir, Options, Store};
    use sandwich::Binding;
    use waypoint::{Error, WaypointServer, WaypointSpec};

    for (i, binding) in [Binding::OnGateway, Binding::OnClassWithoutPort]
        .into_iter()
        .enumerate()
    {
        let dir =
            std::env::temp_dir().join(format!("waypoint-sandwich-{}-{i}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let yaml = sandwich::waypoint_yaml("127.49.0.9", binding);
        std::fs::write(dir.join("mesh.yaml"), yaml).expect("write");
        let store = Store::open(&mut ConfigDir::new(&dir, Options::default())).expect("valid");
        let ca = Arc::new(MeshCa::generate("cluster.local").expect("ca"));
        let refused = WaypointServer::start(
            store,
            Arc::new(CertManager::new(ca)),
            WaypointSpec::new("app", "sandwich"),
            Arc::default(),
        )
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        let Err(e) = refused else {
            panic!("a sandwiched waypoint must not terminate HBONE itself")
        };
        assert!(matches!(e, Error::Sandwiched(_)), "{e}");
        assert!(e.to_string().contains("waypoint-inbound-binding"), "{e}");
    }
}
