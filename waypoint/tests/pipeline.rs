//! The three stages end to end: client ztunnel → waypoint (HBONE in, HTTP, HBONE out) →
//! endpoint's ztunnel → pod; and what the waypoint refuses.

mod support;

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
