//! L7 authorization at the waypoint, and route changes applied under load.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use support::Mesh;

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client-reads, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/app/sa/client"]}}]
    to: [{operation: {methods: [GET]}}]
  - to: [{operation: {methods: [PUT]}}]
    when: [{key: "request.headers[x-token]", values: [secret]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_authorization_allows_and_denies() {
    let mesh = Mesh::start(50, POLICIES).await;
    // Method, path, headers, expected status.
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16);
    let cases: &[Case<'_>] = &[
        ("GET", "/", &[], 200),
        ("GET", "/admin/users", &[], 403),
        ("POST", "/", &[], 403),
        ("PUT", "/", &[("x-token", "secret")], 200),
        ("PUT", "/", &[("x-token", "wrong")], 403),
    ];
    for &(method, path, headers, status) in cases {
        let r = mesh.request(method, path, headers, "").await;
        assert_eq!(r.status, status, "{method} {path} {headers:?}: {}", r.body);
        if status == 403 {
            assert_eq!(r.body, "RBAC: access denied");
            assert_eq!(r.backend(), "");
        }
    }
    // Policies change live: dropping the DENY opens /admin.
    mesh.set_routes(POLICIES.split("---").nth(1).unwrap()).await;
    assert_eq!(
        mesh.request("GET", "/admin/users", &[], "").await.status,
        200
    );
    mesh.shutdown().await;
}

fn route_to(version: &str) -> String {
    format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo, namespace: app}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: 80}}]
  rules: [{{backendRefs: [{{name: echo-{version}, port: 80}}]}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_under_load_fail_no_request() {
    let mesh = Mesh::start(51, &route_to("v1")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (from, vip) = (mesh.ip("1.1"), mesh.vip());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match support::request(from, &vip, 80, "GET", "/", &[], "").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for version in ["v2", "v1", "v2", "v1", "v2"] {
        support::grown(&ok, 10).await;
        mesh.set_routes(&route_to(version)).await;
        let r = mesh.request("GET", "/", &[], "").await;
        assert_eq!(r.backend(), format!("echo-{version}"), "the change applied");
    }
    support::grown(&ok, 10).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        ok.load(Ordering::Relaxed) > 50,
        "{}",
        ok.load(Ordering::Relaxed)
    );
    mesh.shutdown().await;
}
