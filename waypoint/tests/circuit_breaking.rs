//! DestinationRule connection-pool limits: overflow is answered 503 at once.

mod support;

use support::Mesh;

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

/// Sends `n` slow requests at once; returns their statuses, sorted.
async fn burst(mesh: &Mesh, n: usize) -> Vec<u16> {
    let (from, vip) = (mesh.ip("1.1"), mesh.vip());
    let requests = (0..n).map(|_| {
        let vip = vip.clone();
        tokio::spawn(async move {
            support::request(from, &vip, 80, "GET", "/", &[("x-delay-ms", "500")], "")
                .await
                .map(|r| r.status)
                .unwrap_or(0)
        })
    });
    let mut statuses = Vec::new();
    for r in requests.collect::<Vec<_>>() {
        statuses.push(r.await.unwrap());
    }
    statuses.sort_unstable();
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_pool_limits_shed_overflow() {
    let mesh = Mesh::start(53, &limits("{http: {http2MaxRequests: 2}}")).await;
    assert_eq!(burst(&mesh, 5).await, [200, 200, 503, 503, 503]);
    // Once the burst is over, the places are free again. The waypoint gives a place back when
    // it has logged the request, just after the client read the last byte: let it.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(burst(&mesh, 2).await, [200, 200]);

    // One connection and one pending request: the second waits its turn, the third is shed.
    mesh.set_routes(&limits(
        "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}",
    ))
    .await;
    assert_eq!(burst(&mesh, 3).await, [200, 200, 503]);
    mesh.shutdown().await;
}

/// Sends `n` requests at once that fail on `echo-v1` (503) and take 500 ms on `echo-v2`;
/// returns their statuses, sorted.
async fn failing_burst(mesh: &Mesh, n: usize) -> Vec<u16> {
    let (from, vip) = (mesh.ip("1.1"), mesh.vip());
    let headers = [
        ("x-fail", "echo-v1"),
        ("x-fail-with", "503"),
        ("x-delay-ms", "500"),
        ("x-delay-on", "echo-v2"),
    ];
    let requests = (0..n).map(|_| {
        let vip = vip.clone();
        tokio::spawn(async move {
            support::request(from, &vip, 80, "GET", "/", &headers, "")
                .await
                .map(|r| r.status)
                .unwrap_or(0)
        })
    });
    let mut statuses = Vec::new();
    for r in requests.collect::<Vec<_>>() {
        statuses.push(r.await.unwrap());
    }
    statuses.sort_unstable();
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_bounds_the_retries_in_flight() {
    // Round robin sends two of four requests to echo-v1 first; the route retries its 503 on
    // echo-v2, which holds each retry for 500 ms.
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
    assert_eq!(failing_burst(&mesh, 4).await, [200, 200, 200, 200]);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    // One retry in flight at most: the second failed attempt is not retried, its 503 stands.
    mesh.set_routes(&retries(1)).await;
    assert_eq!(failing_burst(&mesh, 4).await, [200, 200, 200, 503]);
    mesh.shutdown().await;
}
