//! DestinationRule load balancing and outlier detection, observed through the waypoint.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use support::Mesh;

fn rule(traffic_policy: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: app}}
spec:
  host: echo.app.svc.cluster.local
  trafficPolicy: {traffic_policy}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancers_and_outlier_detection() {
    let mesh = Mesh::start(
        55,
        &rule("{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}"),
    )
    .await;

    // Consistent hash: each user sticks to one endpoint; users spread over both.
    let mut homes = BTreeMap::new();
    for user in 0..16 {
        let user = format!("user-{user}");
        for _ in 0..5 {
            let r = mesh.request("GET", "/", &[("x-user", &user)], "").await;
            let home = homes.entry(user.clone()).or_insert(r.backend().to_owned());
            assert_eq!(*home, r.backend(), "{user} moved");
        }
    }
    let used: BTreeSet<&String> = homes.values().collect();
    assert_eq!(used.len(), 2, "{homes:?}");

    // Round robin alternates.
    mesh.set_routes(&rule("{loadBalancer: {simple: ROUND_ROBIN}}"))
        .await;
    let order: Vec<String> = {
        let mut out = Vec::new();
        for _ in 0..6 {
            out.push(mesh.request("GET", "/", &[], "").await.backend().to_owned());
        }
        out
    };
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "{order:?}");
    }

    // RANDOM and LEAST_REQUEST spread over both endpoints.
    for lb in ["RANDOM", "LEAST_REQUEST"] {
        mesh.set_routes(&rule(&format!("{{loadBalancer: {{simple: {lb}}}}}")))
            .await;
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            seen.insert(mesh.request("GET", "/", &[], "").await.backend().to_owned());
        }
        assert_eq!(seen.len(), 2, "{lb}: {seen:?}");
    }

    // Outlier detection: two 503s in a row eject echo-v1; everything then goes to echo-v2,
    // even requests that would not fail.
    mesh.set_routes(&rule(
        "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 50}}",
    ))
    .await;
    let fail_v1 = [("x-fail", "echo-v1"), ("x-fail-with", "503")];
    let mut failures = 0;
    for _ in 0..6 {
        if mesh.request("GET", "/", &fail_v1, "").await.status == 503 {
            failures += 1;
        }
    }
    assert_eq!(failures, 2, "ejected after the second consecutive 503");
    for _ in 0..10 {
        let r = mesh.request("GET", "/", &[], "").await;
        assert_eq!((r.status, r.backend()), (200, "echo-v2"));
    }
    mesh.shutdown().await;
}
