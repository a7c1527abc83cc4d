//! What the tunnels around the waypoint say of a request: one trace id in the access logs of
//! the client's ztunnel, the waypoint and the server's ztunnel (the waypoint carries on the
//! trace each tunnel to it brings), and a client the configuration does not know by address
//! labelled in the waypoint's metrics from the `baggage` its tunnel brought; and the bytes of
//! an opaque TCP connection in the waypoint's line, counted from the caller's side.

#[path = "../../ztunnel/tests/support/logs.rs"]
mod logs;
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hbone::headers::Baggage;
use hbone::{Authority, CertManager, ConnectHeaders, ConnectRequest, Identity, Pool};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use logs::{log, trace_id};
use support::Mesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_follows_a_request_through_both_ztunnels_and_the_waypoint() {
    let log = log();
    let mesh = Mesh::start(39, "").await;
    let response = mesh.request("GET", "/", &[], "").await;
    assert_eq!(response.status, 200);
    let backend = response.backend().to_owned();
    // The waypoint's upstream tunnel is parked for the next request; ending the mesh closes it,
    // which writes the server ztunnel's line.
    mesh.shutdown().await;

    let outbound = log
        .line(&["direction=\"outbound\"", "dst.hbone_addr=10.39.0.1:80"])
        .await;
    let trace = trace_id(&outbound).to_owned();
    assert!(
        trace.bytes().all(|b| b.is_ascii_hexdigit()) && trace != "0".repeat(32),
        "{outbound}"
    );
    let waypoint = log
        .line(&["request", "dst.addr=10.39.0.1:80", "status=200"])
        .await;
    assert_eq!(trace_id(&waypoint), trace, "the waypoint: {waypoint}");
    let inbound = log
        .line(&[
            "direction=\"inbound\"",
            "src.identity=spiffe://cluster.local/ns/app/sa/waypoint",
            "dst.addr=127.39.",
            &format!("dst.workload={backend} dst.namespace=app"),
        ])
        .await;
    assert_eq!(trace_id(&inbound), trace, "the server's ztunnel: {inbound}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_unknown_by_address_is_labelled_from_its_baggage() {
    log();
    let mesh = Mesh::start(52, "").await;
    // A caller from 127.0.0.1, which no workload has, tunnelling straight to the waypoint with
    // what a ztunnel in another cluster would say of it.
    let pool = Pool::new(
        Arc::new(CertManager::new(mesh.ca.clone())),
        hbone::Config::default(),
    );
    let id = |ns: &str, sa: &str| Identity::new("cluster.local", ns, sa).unwrap();
    let tunnel = pool
        .connect(ConnectRequest {
            src: id("batch", "cron"),
            dst_identities: vec![id("app", "waypoint")],
            next_hop: "127.52.3.1:15008".parse().unwrap(),
            authority: Authority::Addr("10.52.0.1:80".parse().unwrap()),
            headers: ConnectHeaders {
                baggage: Some(Baggage::parse(
                    "k8s.cluster.name=east,k8s.namespace.name=spoofed,k8s.cronjob.name=backup,\
                     service.name=backup,service.version=v9",
                )),
                ..ConnectHeaders::default()
            },
        })
        .await
        .expect("the waypoint takes the tunnel");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
        .await
        .expect("HTTP/1.1");
    tokio::spawn(conn);
    let request = http::Request::get("/")
        .header("host", "echo.app.svc.cluster.local")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    let _ = response.into_body().collect().await;

    let mut registry = prometheus_client::registry::Registry::default();
    mesh.metrics.register(&mut registry);
    let mut text = String::new();
    for _ in 0..400 {
        text.clear();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        if text.contains("istio_requests_total{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .unwrap_or_else(|| panic!("the request was not counted:\n{text}"));
    for label in [
        "source_workload=\"backup\"",
        "source_canonical_service=\"backup\"",
        "source_canonical_revision=\"v9\"",
        "source_cluster=\"east\"",
        // The identity's namespace, not the one the baggage claims.
        "source_workload_namespace=\"batch\"",
        "source_principal=\"spiffe://cluster.local/ns/batch/sa/cron\"",
    ] {
        assert!(line.contains(label), "{label} in {line}");
    }
    mesh.shutdown().await;
}

/// As Envoy's access log counts them: `bytes_received` from the caller, `bytes_sent` back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connections_bytes_are_counted_from_the_callers_side() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let log = log();
    let mesh = Mesh::start(58, "").await;
    let stream = mesh
        .socks("10.58.0.3", 90)
        .await
        .expect("through the waypoint");
    let mut stream = tokio::io::BufReader::new(stream);
    let mut greeting = String::new();
    stream.read_line(&mut greeting).await.expect("greeting");
    let request = b"0123456789abcdef\n";
    stream.get_mut().write_all(request).await.expect("write");
    let mut echoed = vec![0; request.len()];
    stream.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(echoed, request);
    drop(stream);

    let line = log
        .line(&[
            "protocol=\"tcp\"",
            "dst.addr=10.58.0.3:90",
            "connection complete",
        ])
        .await;
    let received = format!("bytes_received={}", request.len());
    let sent = format!("bytes_sent={}", greeting.len() + request.len());
    assert!(line.contains(&received), "{received} in {line}");
    assert!(line.contains(&sent), "{sent} in {line}");
    mesh.shutdown().await;
}
