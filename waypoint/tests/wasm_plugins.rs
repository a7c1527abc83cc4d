//! WasmPlugins in the waypoint: SDK-built example plugins run on real requests through ztunnels
//! and HBONE, ordered by phase and priority around L7 authorization, reloaded live.

mod support;

use support::{Mesh, example_plugin};

fn plugin(name: &str, module: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}, namespace: app}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  url: file://{}
{extra}
---
"#,
        example_plugin(module)
    )
}

const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_run_in_phase_order_around_authorization() {
    let config = [
        plugin(
            "api-key",
            "api_key",
            "  phase: AUTHN\n  pluginConfig: {keys: [k1]}",
        ),
        plugin(
            "add-header",
            "add_header",
            "  pluginConfig: {headers: {x-wasm: added}}",
        ),
        plugin(
            "rewrite",
            "rewrite_path",
            "  phase: STATS\n  priority: 5\n  pluginConfig: {prefix: /old, replacement: /new}",
        ),
        DENY_ADMIN.to_owned(),
    ]
    .concat();
    let mesh = Mesh::start(57, &config).await;

    // AUTHN runs before authorization: no key is a 401 from the plugin even on a denied path,
    // and the add-header plugin (after authorization) saw nothing, so adds nothing.
    let r = mesh.request("GET", "/admin", &[], "").await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.body, "missing or invalid API key\n");
    assert!(r.headers.get("x-wasm").is_none());

    // With the key, authorization denies /admin; the 403 passes back through the api-key
    // plugin only.
    let r = mesh
        .request("GET", "/admin", &[("x-api-key", "k1")], "")
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body, "RBAC: access denied");
    assert!(r.headers.get("x-wasm").is_none());

    // Allowed: the key is stripped before the backend, the path rewritten before routing, and
    // the response header added.
    let r = mesh
        .request("GET", "/old/page", &[("x-api-key", "k1")], "")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("path=/new/page"), "{}", r.body);
    assert!(!r.body.contains("x-api-key"), "{}", r.body);
    assert!(r.body.contains("x-original-path: /old/page"), "{}", r.body);
    assert_eq!(r.headers.get("x-wasm").unwrap(), "added");

    // A live change: the add-header plugin's configuration changes without a restart.
    let changed = config.replace("x-wasm: added", "x-wasm: changed");
    mesh.set_routes(&changed).await;
    let r = mesh.request("GET", "/", &[("x-api-key", "k1")], "").await;
    assert_eq!(r.headers.get("x-wasm").unwrap(), "changed");

    // Removing the AUTHN plugin opens the service again.
    let without_key = changed.split("---").skip(1).collect::<Vec<_>>().join("---");
    mesh.set_routes(&without_key).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_cannot_load_follows_its_fail_strategy() {
    let missing = |name: &str, strategy: &str| {
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  url: file:///nonexistent/{name}.wasm\n  failStrategy: {strategy}\n---\n"
        )
    };
    let mesh = Mesh::start(58, &missing("broken", "FAIL_OPEN")).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "FAIL_OPEN skips the plugin: {}", r.body);

    mesh.set_routes(&missing("broken", "FAIL_CLOSE")).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 503, "FAIL_CLOSE refuses: {}", r.body);
    assert_eq!(r.backend(), "");

    // A wrong sha256 is a load failure too.
    let bad_digest = plugin(
        "digest",
        "add_header",
        &format!("  sha256: {}", "0".repeat(64)),
    );
    mesh.set_routes(&bad_digest).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 503, "{}", r.body);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_plugin_buffers_and_refuses_bodies() {
    let config = plugin(
        "body",
        "body_inspect",
        "  pluginConfig: {deny: [DROP TABLE]}",
    );
    let mesh = Mesh::start(59, &config).await;
    let r = mesh.request("POST", "/", &[], "hello world").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers.get("x-body-bytes").unwrap(), "11");
    let r = mesh.request("POST", "/", &[], "x'; DROP TABLE users").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body, "request body refused\n");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_calls_a_mesh_service_and_waits_for_its_answer() {
    let auth = |upstream: &str| {
        plugin(
            "auth",
            "auth_call",
            &format!(
                "  pluginConfig: {{upstream: \"{upstream}\", authority: shadow.app.svc.cluster.local, path: /check}}"
            ),
        )
    };
    let mesh = Mesh::start(60, &auth("outbound|80||shadow.app.svc.cluster.local")).await;
    // The call reaches the shadow pod over HBONE; its 200 lets the request through.
    let r = mesh
        .request("GET", "/page", &[("authorization", "Bearer t")], "")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.backend().is_empty());
    let calls = mesh.seen_by("shadow-1");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].path, "/check");
    assert_eq!(calls[0].host, "shadow.app.svc.cluster.local");

    // A plain host:port upstream (the VIP) works too.
    mesh.set_routes(&auth(&format!("10.{}.0.2:80", mesh.net)))
        .await;
    let r = mesh.request("GET", "/page", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(mesh.seen_by("shadow-1").len(), 2);

    // A port the service does not have: the dispatch is refused and the plugin answers 503.
    mesh.set_routes(&auth("outbound|81||shadow.app.svc.cluster.local"))
        .await;
    let r = mesh.request("GET", "/page", &[], "").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.backend(), "");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_metrics_are_exported_with_the_waypoints() {
    let config = plugin("counter", "counter", "  pluginConfig: {metric: hits_total}");
    let mesh = Mesh::start(61, &config).await;
    for n in 1..=2 {
        let r = mesh.request("GET", "/", &[], "").await;
        assert_eq!(r.headers.get("x-request-count").unwrap(), &n.to_string());
    }
    let mut registry = prometheus_client::registry::Registry::default();
    mesh.metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("wasmcustom_hits_total 2"), "{text}");
    mesh.shutdown().await;
}
