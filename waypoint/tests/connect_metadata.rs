//! What the tunnels around the waypoint say of a request: one trace id in the access logs of
//! the client's ztunnel, the waypoint and the server's ztunnel (the waypoint carries on the
//! trace each tunnel to it brings), and a client the configuration does not know by address
//! labelled in the waypoint's metrics from the `baggage` its tunnel brought.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hbone::headers::Baggage;
use hbone::{Authority, CertManager, ConnectHeaders, ConnectRequest, Identity, Pool};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::Mesh;

/// Every log line of this test binary (both tests, each on its own addresses), as an
/// operator's collector would get them.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The binary's log, captured from the first call on (before any mesh starts its own).
fn log() -> &'static Log {
    static LOG: OnceLock<Log> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Log::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        log
    })
}

impl Log {
    /// The first access log line with every one of `fields`, waiting for it to be written.
    async fn line(&self, fields: &[&str]) -> String {
        for _ in 0..400 {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            let found = text
                .lines()
                .find(|l| l.contains(" access: ") && fields.iter().all(|f| l.contains(f)));
            if let Some(line) = found {
                return line.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no access log line with {fields:?}");
    }
}

/// The value of `trace_id=` in a log line.
fn trace_id(line: &str) -> &str {
    let at = line.find("trace_id=").expect("a trace id") + "trace_id=".len();
    &line[at..at + 32]
}

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
            &format!("dst.workload=app/{backend}"),
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
