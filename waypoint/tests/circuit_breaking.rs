//! DestinationRule connection-pool limits: overflow is answered 503 at once.

mod support;

use support::Mesh;

fn limits(pool: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: app}}
spec:
  host: echo.app.svc.cluster.local
  trafficPolicy: {{connectionPool: {pool}}}
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
