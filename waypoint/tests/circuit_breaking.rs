//! DestinationRule connection-pool limits: overflow is answered 503 at once.
//!
//! Each case holds requests at the backends and waits until the backends have seen them
//! before it sends the ones that must overflow, so the outcome does not depend on how fast a
//! busy machine starts a burst.

mod support;

use std::time::Duration;

use support::Mesh;
use tokio::task::JoinHandle;

/// How long a held request waits at the backend: far longer than sending a few more takes.
const HOLD: &str = "1500";

fn limits(pool: &str) -> String {
    traffic_policy(&format!("{{connectionPool: {pool}}}"))
}

fn traffic_policy(policy: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: app}}
spec:
  host: echo.app.svc.cluster.local
  trafficPolicy: {policy}
"#
    )
}

/// Sends one request to the echo service in the background; its status, or 0 when it failed.
fn send(mesh: &Mesh, headers: &'static [(&'static str, &'static str)]) -> JoinHandle<u16> {
    let (from, vip) = (mesh.ip("1.1"), mesh.vip());
    tokio::spawn(async move {
        support::request(from, &vip, 80, "GET", "/", headers, "")
            .await
            .map_or(0, |r| r.status)
    })
}

/// The statuses of `requests`, sorted.
async fn statuses(requests: impl IntoIterator<Item = JoinHandle<u16>>) -> Vec<u16> {
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(r.await.unwrap());
    }
    statuses.sort_unstable();
    statuses
}

/// Requests the echo backends have seen so far, both versions.
fn seen(mesh: &Mesh) -> usize {
    mesh.seen_by("echo-v1").len() + mesh.seen_by("echo-v2").len()
}

/// Requests the waypoint has logged (`istio_requests_total`).
fn requests_logged(mesh: &Mesh) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    mesh.metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until `done`, for ten seconds at most.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen within ten seconds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_pool_limits_shed_overflow() {
    const SLOW: &[(&str, &str)] = &[("x-delay-ms", HOLD)];
    let mesh = Mesh::start(53, &limits("{http: {http2MaxRequests: 2}}")).await;
    // Two held requests take both places; three more are shed at once.
    let held = [send(&mesh, SLOW), send(&mesh, SLOW)];
    until("two requests at the backends", || seen(&mesh) == 2).await;
    let shed = (0..3).map(|_| send(&mesh, &[])).collect::<Vec<_>>();
    assert_eq!(statuses(shed).await, [503, 503, 503]);
    assert_eq!(statuses(held).await, [200, 200]);
    // Once they are over, the places are free again. The waypoint gives a place back when
    // it has logged the request, just after the client read the last byte: let it.
    until("the five requests logged", || requests_logged(&mesh) == 5).await;
    assert_eq!(
        statuses([send(&mesh, &[]), send(&mesh, &[])]).await,
        [200, 200]
    );

    // One connection and one pending request: with one request held on the connection, of
    // two more one waits its turn and the other is shed.
    mesh.set_routes(&limits(
        "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}",
    ))
    .await;
    let before = seen(&mesh);
    let first = send(&mesh, SLOW);
    until("the first request at a backend", || seen(&mesh) > before).await;
    let more = [send(&mesh, SLOW), send(&mesh, SLOW)];
    assert_eq!(statuses(more).await, [200, 503]);
    assert_eq!(first.await.unwrap(), 200);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_bounds_the_retries_in_flight() {
    // Fails with 503 on echo-v1 and is held on echo-v2; the route retries a 503 on the other
    // endpoint.
    const FAILING: &[(&str, &str)] = &[
        ("x-fail", "echo-v1"),
        ("x-fail-with", "503"),
        ("x-delay-ms", HOLD),
        ("x-delay-on", "echo-v2"),
    ];
    let route = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: app}
spec:
  hosts: [echo.app.svc.cluster.local]
  http: [{route: [{destination: {host: echo.app.svc.cluster.local}}], retries: {attempts: 2, retryOn: 5xx}}]
---
"#;
    let retries = |n: u32| {
        let policy = traffic_policy(&format!(
            "{{connectionPool: {{http: {{maxRetries: {n}}}}}, loadBalancer: {{simple: ROUND_ROBIN}}}}"
        ));
        format!("{route}{policy}")
    };
    let mesh = Mesh::start(72, &retries(10)).await;
    // Round robin sends two of four requests to echo-v1 first; both are retried.
    let burst = (0..4).map(|_| send(&mesh, FAILING)).collect::<Vec<_>>();
    assert_eq!(statuses(burst).await, [200, 200, 200, 200]);

    // One retry in flight at most.
    mesh.set_routes(&retries(1)).await;
    // Round robin's next turn is echo-v1 once a request has been answered by echo-v2.
    let mut turns = 0;
    while mesh.request("GET", "/", &[], "").await.backend() != "echo-v2" {
        turns += 1;
        assert!(
            turns < 2,
            "round robin answered from echo-v1 twice in a row"
        );
    }
    // The first failure is retried on echo-v2 and held there: its retry is in flight.
    let before = mesh.seen_by("echo-v2").len();
    let retried = send(&mesh, FAILING);
    until("the retry at echo-v2", || {
        mesh.seen_by("echo-v2").len() > before
    })
    .await;
    // The next turn is echo-v1 again (the retry took one): that failure is not retried, its
    // 503 stands.
    assert_eq!(send(&mesh, FAILING).await.unwrap(), 503);
    assert_eq!(retried.await.unwrap(), 200);
    mesh.shutdown().await;
}
