//! WasmPlugins in the waypoint: SDK-built example plugins run on real requests through ztunnels
//! and HBONE, ordered by phase and priority around L7 authorization, reloaded live.

#[path = "../../plugins/host/tests/support/registry.rs"]
mod registry;
mod support;

use registry::{RealRegistry, push_wasm_image};
use support::{Mesh, example_plugin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A test plugin compiled from WAT: `fields`, its imports and callbacks (the fields of an ABI
/// 0.2.1 module after `(module`), with what every module has: its memory, from which the host
/// gets room by a bump allocator that never frees (each test's requests are few).
fn compile(fields: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
{fields}
  (memory (export "memory") 2)
  (global $next (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $size)))
    (local.get $p)))"#
    );
    wat::parse_str(text).expect("a valid module")
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

    // AUTHN runs before authorization: no key is a 401 from the plugin even on a denied path.
    // The request never reached the add-header plugin (after authorization), but the answer
    // passes every plugin's response callbacks, as local replies pass Envoy's encoder chain.
    let r = mesh.request("GET", "/admin", &[], "").await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.body, "missing or invalid API key\n");
    assert_eq!(r.header("x-wasm"), Some("added"));

    // With the key, authorization denies /admin; the 403 passes the response callbacks too.
    let r = mesh
        .request("GET", "/admin", &[("x-api-key", "k1")], "")
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body, "RBAC: access denied");
    assert_eq!(r.header("x-wasm"), Some("added"));

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
    // A body that arrives in many chunks is held whole until the plugin has seen the end,
    // then reaches the backend intact.
    let big = "0123456789".repeat(20_000);
    let r = mesh.request("POST", "/big", &[], &big).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.headers.get("x-body-bytes").unwrap(),
        "65536",
        "inspected up to max_bytes"
    );
    let seen = mesh.seen_by(r.backend());
    let last = seen
        .iter()
        .rfind(|s| s.path == "/big")
        .expect("the backend saw it");
    assert_eq!(last.body.len(), big.len());
    assert_eq!(last.body, big);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_calls_a_mesh_service_and_waits_for_its_answer() {
    // The calls' timeout leaves the first HBONE handshake to the shadow pod time on a busy
    // machine.
    let auth = |upstream: &str| {
        plugin(
            "auth",
            "auth_call",
            &format!(
                "  pluginConfig: {{upstream: \"{upstream}\", authority: shadow.app.svc.cluster.local, path: /check, timeout_ms: 10000}}"
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
async fn a_plugin_holds_a_response_body_until_a_call_answers() {
    let scan = |headers: &str| {
        plugin(
            "scan",
            "response_scan",
            &format!(
                "  pluginConfig: {{upstream: \"outbound|80||shadow.app.svc.cluster.local\", authority: shadow.app.svc.cluster.local, timeout_ms: 10000, headers: {{{headers}}}}}"
            ),
        )
    };
    let mesh = Mesh::start(67, &scan("")).await;
    // The scanner (the shadow pod) saw the whole body and answered 200: it goes on unchanged.
    let r = mesh.request("GET", "/page", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("backend=echo-v"), "{}", r.body);
    let scans = mesh.seen_by("shadow-1");
    assert_eq!(scans.len(), 1, "{scans:?}");
    assert_eq!((&*scans[0].method, &*scans[0].path), ("POST", "/scan"));
    assert_eq!(
        scans[0].body, r.body,
        "the scanner got the body the client got"
    );
    // Responses without a body (to a HEAD, a 204) end with their headers: as in Envoy, the
    // plugin's body callback is not called, so it scans nothing.
    let r = mesh.request("HEAD", "/page", &[], "").await;
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    let no_content = [("x-fail", "echo-v1,echo-v2"), ("x-fail-with", "204")];
    let r = mesh.request("GET", "/page", &no_content, "").await;
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    // Nor do the waypoint's own answers without one: a redirect, and a 404 for no route.
    let redirect = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /moved}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.com, statusCode: 301}
"#;
    mesh.set_routes(&format!("{}{redirect}---{DENY_ADMIN}", scan("")))
        .await;
    let r = mesh.request("GET", "/moved", &[], "").await;
    assert_eq!((r.status, r.body.as_str()), (301, ""));
    let r = mesh.request("GET", "/page", &[], "").await;
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    // Nor does the answer to a HEAD, though the waypoint's own has a text it does not send.
    let r = mesh.request("HEAD", "/admin", &[], "").await;
    assert_eq!((r.status, r.body.as_str()), (403, ""));
    assert_eq!(mesh.seen_by("shadow-1").len(), 1, "scanned no empty body");

    // The scanner refuses (the echo pod answers 451 when asked to): the body is withheld.
    mesh.set_routes(&scan("x-fail: shadow-1, x-fail-with: \"451\""))
        .await;
    let r = mesh.request("GET", "/page", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "response withheld\n");
    assert_eq!(mesh.seen_by("shadow-1").len(), 2);
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

/// A plugin that traps (`unreachable`) on requests carrying `x-trap`, loops forever on requests
/// carrying `x-loop`, and adds `x-alive: 1` to every request it lets through. Its module's
/// fields in WAT (see `compile`).
const TRAPPER: &str = r#"
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (data (i32.const 16) "x-trap")
  (data (i32.const 32) "x-alive")
  (data (i32.const 48) "1")
  (data (i32.const 80) "x-loop")
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 64) (i32.const 68)))
      (then unreachable))
    (if (i32.eqz (call $get (i32.const 0) (i32.const 80) (i32.const 6) (i32.const 64) (i32.const 68)))
      (then (loop $forever (br $forever))))
    (drop (call $add (i32.const 0) (i32.const 32) (i32.const 7) (i32.const 48) (i32.const 1)))
    (i32.const 0))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pull_keeps_the_running_plugin() {
    let dir = std::env::temp_dir().join(format!("wasm-pull-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("add_header.wasm");
    std::fs::copy(example_plugin("add_header"), &module).unwrap();
    let config = |value: &str| {
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: pulled, namespace: app}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  url: file://{}\n  imagePullPolicy: Always\n  pluginConfig: {{headers: {{x-pulled: {value}}}}}\n",
            module.display()
        )
    };
    let mesh = Mesh::start(68, &config("one")).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.header("x-pulled"), Some("one"));

    // The module is gone when the resource changes: the pull fails, and the plugin that was
    // running keeps running as it was (Envoy keeps its last accepted filter).
    std::fs::remove_file(&module).unwrap();
    mesh.set_routes(&config("two")).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-pulled"), Some("one"));

    // Back in place, the next change pulls it again.
    std::fs::copy(example_plugin("add_header"), &module).unwrap();
    mesh.set_routes(&config("three")).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.header("x-pulled"), Some("three"));
    mesh.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `oci://` as Istio users publish plugins: the SDK-built example pushed to a real registry as a
/// Wasm image, pulled by the waypoint by tag and by digest, with `sha256` checked against the
/// image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_pulled_from_an_oci_registry_runs_in_the_waypoint() {
    let registry = RealRegistry::start().await;
    let module = std::fs::read(example_plugin("add_header")).unwrap();
    let repo = "plugins/add-header";
    let digest = push_wasm_image(&registry.base(), repo, "v1", &module).await;
    let hex = digest.trim_start_matches("sha256:").to_owned();
    let config = |reference: &str, sha256: &str, value: &str| {
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: pulled, namespace: app}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  url: oci://{}/{repo}{reference}\n  sha256: {sha256}\n  pluginConfig: {{headers: {{x-pulled: {value}}}}}\n",
            registry.addr
        )
    };
    let mesh = Mesh::start(77, &config(":v1", &hex, "by-tag")).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(
        (r.status, r.header("x-pulled")),
        (200, Some("by-tag")),
        "{}",
        r.body
    );

    mesh.set_routes(&config(&format!("@{digest}"), &hex, "by-digest"))
        .await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.header("x-pulled"), Some("by-digest"));

    // A digest that is not the image's is a failed pull: the running plugin stays.
    let wrong = "0".repeat(64);
    mesh.set_routes(&config(":v1", &wrong, "wrong")).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(
        (r.status, r.header("x-pulled")),
        (200, Some("by-digest")),
        "{}",
        r.body
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_plugin_fails_only_its_request_per_fail_strategy() {
    let dir = std::env::temp_dir().join(format!("wasm-trapper-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("trapper.wasm");
    std::fs::write(&module, compile(TRAPPER)).unwrap();
    let config = |strategy: &str| {
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: trapper, namespace: app}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  url: file://{}\n  failStrategy: {strategy}\n",
            module.display()
        )
    };
    let mesh = Mesh::start(62, &config("FAIL_CLOSE")).await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("x-alive: 1"), "{}", r.body);
    let r = mesh.request("GET", "/", &[("x-trap", "1")], "").await;
    assert_eq!(r.status, 503, "FAIL_CLOSE: {}", r.body);
    assert_eq!(r.backend(), "");
    // The trap poisoned one instance; the next request runs on a fresh one.
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("x-alive: 1"), "{}", r.body);

    // A plugin that never returns is stopped at its callback deadline: the same as a trap.
    let started = std::time::Instant::now();
    let r = mesh.request("GET", "/", &[("x-loop", "1")], "").await;
    assert_eq!(r.status, 503, "FAIL_CLOSE on a runaway loop: {}", r.body);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "the waypoint keeps serving: {}", r.body);
    assert!(r.body.contains("x-alive: 1"), "{}", r.body);

    mesh.set_routes(&config("FAIL_OPEN")).await;
    let r = mesh.request("GET", "/", &[("x-trap", "1")], "").await;
    assert_eq!(r.status, 200, "FAIL_OPEN skips the plugin: {}", r.body);
    assert!(!r.body.contains("x-alive"), "{}", r.body);
    let r = mesh.request("GET", "/", &[("x-loop", "1")], "").await;
    assert_eq!(
        r.status, 200,
        "FAIL_OPEN skips a runaway plugin: {}",
        r.body
    );
    assert!(!r.body.contains("x-alive"), "{}", r.body);
    let r = mesh.request("GET", "/", &[], "").await;
    assert!(
        r.body.contains("x-alive: 1"),
        "a fresh instance serves: {}",
        r.body
    );
    mesh.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_plugins_under_load_fails_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let header = |value: &str| {
        plugin(
            "hdr",
            "add_header",
            &format!("  pluginConfig: {{headers: {{x-wasm: {value}}}}}"),
        )
    };
    let mesh = Mesh::start(63, &header("a")).await;
    let (from, vip) = (mesh.ip("1.1"), mesh.vip());
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (vip, stop, served, failed) =
            (vip.clone(), stop.clone(), served.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = support::request(from, &vip, 80, "GET", "/", &[], "").await;
                if r.is_ok_and(|r| r.status == 200) {
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Reconfigure, swap modules, remove and re-add while requests flow.
    for config in [
        header("b"),
        plugin(
            "hdr",
            "rewrite_path",
            "  pluginConfig: {prefix: /x, replacement: /y}",
        ),
        String::new(),
        header("c"),
    ] {
        mesh.set_routes(&config).await;
        support::grown(&served, 8).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert!(
        served.load(Ordering::Relaxed) > 20,
        "too few requests to tell"
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.headers.get("x-wasm").unwrap(), "c");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_orders_plugins_within_a_phase_and_targets_select_them() {
    // Two path rewrites chained: /a → /b, then /b → /c. Which runs first decides the result.
    let rewrite = |name: &str, from: &str, to: &str, priority: i32| {
        plugin(
            name,
            "rewrite_path",
            &format!(
                "  priority: {priority}\n  pluginConfig: {{prefix: {from}, replacement: {to}}}"
            ),
        )
    };
    let first_ab = [rewrite("ab", "/a", "/b", 10), rewrite("bc", "/b", "/c", 5)].concat();
    let mesh = Mesh::start(64, &first_ab).await;
    let r = mesh.request("GET", "/a", &[], "").await;
    assert!(
        r.body.contains("path=/c"),
        "higher priority first: {}",
        r.body
    );

    let first_bc = [rewrite("ab", "/a", "/b", 5), rewrite("bc", "/b", "/c", 10)].concat();
    mesh.set_routes(&first_bc).await;
    let r = mesh.request("GET", "/a", &[], "").await;
    assert!(
        r.body.contains("path=/b"),
        "the /b rewrite ran before /b existed: {}",
        r.body
    );

    // A plugin that targets the Service runs for it; one whose `match` names another port does
    // not.
    let on_service = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: svc, namespace: app}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: echo}}]\n  url: file://{}\n  pluginConfig: {{headers: {{x-service-plugin: yes}}}}\n---\n",
        example_plugin("add_header")
    );
    let other_port = plugin(
        "port",
        "add_header",
        "  match: [{ports: [{number: 8443}]}]\n  pluginConfig: {headers: {x-port-plugin: yes}}",
    );
    // Istio 1.30's TrafficExtension carries the same module under `wasm`.
    let extension = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: TrafficExtension\nmetadata: {{name: ext, namespace: app}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  match: [{{mode: SERVER}}]\n  wasm:\n    url: file://{}\n    failStrategy: FAIL_RELOAD\n    pluginConfig: {{headers: {{x-extension: yes}}}}\n---\n",
        example_plugin("add_header")
    );
    mesh.set_routes(&[on_service, other_port, extension].concat())
        .await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers.get("x-service-plugin").unwrap(), "yes");
    assert!(r.headers.get("x-port-plugin").is_none());
    assert_eq!(r.headers.get("x-extension").unwrap(), "yes");
    mesh.shutdown().await;
}

/// A plugin that replaces the upstream's response when the request carried `x-replace`, closes
/// the stream when it carried `x-close`, and copies the response's `grpc-status` trailer into an
/// `x-seen-grpc-status` trailer. Requests in these tests are sequential, so one flag per
/// instance is enough to carry `x-replace` from the request to its response.
const RESPONDER: &str = r#"
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (global $replace (mut i32) (i32.const 0))
  (data (i32.const 16) "x-replace")
  (data (i32.const 32) "x-close")
  (data (i32.const 48) "replaced by plugin\n")
  (data (i32.const 80) "grpc-status")
  (data (i32.const 96) "x-seen-grpc-status")
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 0) (i32.const 32) (i32.const 7) (i32.const 200) (i32.const 204)))
      (then (drop (call $close (i32.const 0))) (return (i32.const 1))))
    (global.set $replace
      (i32.eqz (call $get (i32.const 0) (i32.const 16) (i32.const 9) (i32.const 200) (i32.const 204))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (global.get $replace)
      (then
        (global.set $replace (i32.const 0))
        (drop (call $local (i32.const 418) (i32.const 0) (i32.const 0)
          (i32.const 48) (i32.const 19) (i32.const 0) (i32.const 0) (i32.const -1)))
        (return (i32.const 1))))
    (i32.const 0))
  (func (export "proxy_on_response_trailers") (param i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 3) (i32.const 80) (i32.const 11) (i32.const 200) (i32.const 204)))
      (then
        (drop (call $add (i32.const 3) (i32.const 96) (i32.const 18)
          (i32.load (i32.const 200)) (i32.load (i32.const 204))))))
    (i32.const 0))
"#;

fn responder(dir: &std::path::Path) -> String {
    let module = dir.join("responder.wasm");
    std::fs::write(&module, compile(RESPONDER)).unwrap();
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: responder, namespace: app}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  url: file://{}\n---\n",
        module.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_replaces_a_response_or_closes_the_stream() {
    let dir = std::env::temp_dir().join(format!("wasm-responder-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mesh = Mesh::start(65, &responder(&dir)).await;

    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.backend().starts_with("echo-v"), "{r:?}");

    // The upstream answered, but the plugin's reply replaced it whole: status, body and length.
    let r = mesh.request("GET", "/", &[("x-replace", "1")], "").await;
    assert_eq!(r.status, 418, "{}", r.body);
    assert_eq!(r.body, "replaced by plugin\n");
    assert_eq!(r.header("content-length"), Some("19"));
    assert_eq!(r.backend(), "", "no upstream header survives: {r:?}");
    assert_eq!(mesh.seen.lock().unwrap().len(), 2, "the upstream was asked");

    // proxy_close_stream: no answer at all, and the backend never sees the request.
    let e = mesh
        .request_to(&mesh.vip(), 80, "GET", "/", &[("x-close", "1")], "")
        .await
        .expect_err("a closed stream has no response");
    assert!(!e.is_empty());
    assert_eq!(mesh.seen.lock().unwrap().len(), 2);

    // Over HTTP/2 the close is a stream reset, and the connection's other streams carry on.
    let stream = mesh.socks(&mesh.vip(), 80).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let request = |close: bool| {
        let mut b = http::Request::get("http://echo.app.svc.cluster.local/");
        if close {
            b = b.header("x-close", "1");
        }
        b.body(()).unwrap()
    };
    let (closed, _) = client.send_request(request(true), true).unwrap();
    let e = closed.await.expect_err("reset");
    assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}");
    let mut client = client.ready().await.unwrap();
    let (ok, _) = client.send_request(request(false), true).unwrap();
    assert_eq!(ok.await.unwrap().status(), 200);
    mesh.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gRPC-style HTTP/2 backend: one DATA frame, then trailers with `grpc-status: 7`.
async fn grpc_backend(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(stream).await else {
                return;
            };
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                let Ok(mut send) = respond.send_response(response, false) else {
                    continue;
                };
                let _ = send.send_data(bytes::Bytes::from_static(b"\0\0\0\0\0"), false);
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "7".parse().unwrap());
                let _ = send.send_trailers(trailers);
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_and_change_response_trailers() {
    let dir = std::env::temp_dir().join(format!("wasm-trailers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let net = 66;
    let grpc = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: grpc, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec: {{clusterIP: 10.{net}.0.5, selector: {{app: grpc}}, ports: [{{name: grpc, port: 50051, appProtocol: grpc}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: grpc-1, namespace: app, labels: {{app: grpc}}}}
spec: {{nodeName: node-b, serviceAccountName: grpc}}
status: {{podIP: 127.{net}.2.3}}
---
"#
    );
    let listener = tokio::net::TcpListener::bind((format!("127.{net}.2.3"), 50051))
        .await
        .unwrap();
    let backend = tokio::spawn(grpc_backend(listener));
    let mesh = Mesh::start(net, &[grpc, responder(&dir)].concat()).await;

    let stream = mesh.socks(&format!("10.{net}.0.5"), 50051).await.unwrap();
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post("http://grpc.app.svc.cluster.local:50051/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    body.send_data(bytes::Bytes::from_static(b"\0\0\0\0\0"), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = Vec::new();
    while let Some(chunk) = body.data().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(received, b"\0\0\0\0\0");
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "7");
    assert_eq!(
        trailers.get("x-seen-grpc-status").unwrap(),
        "7",
        "the plugin read the upstream's trailer and added its own: {trailers:?}"
    );
    mesh.shutdown().await;
    backend.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plugin that observes every response, the waypoint's own answers included: it copies
/// `:status` into `x-observed-status`, reports what it can read of the request as properties
/// (`request.protocol`, `route_name`, `cluster_name`, `upstream.address`) as response headers,
/// and sets `:status` to the value of the request's `x-rewrite-status`, if any.
const OBSERVER: &str = r#"
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (data (i32.const 16) ":status")
  (data (i32.const 32) "x-observed-status")
  (data (i32.const 64) "request\00protocol")
  (data (i32.const 96) "x-protocol")
  (data (i32.const 112) "route_name")
  (data (i32.const 128) "x-route")
  (data (i32.const 144) "cluster_name")
  (data (i32.const 160) "x-cluster")
  (data (i32.const 176) "upstream\00address")
  (data (i32.const 200) "x-upstream")
  (data (i32.const 224) "x-rewrite-status")
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $copy (param $p i32) (param $pl i32) (param $h i32) (param $hl i32)
    (if (i32.eqz (call $prop (local.get $p) (local.get $pl) (i32.const 8) (i32.const 12)))
      (then (drop (call $add (i32.const 2) (local.get $h) (local.get $hl)
        (i32.load (i32.const 8)) (i32.load (i32.const 12)))))))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get (i32.const 2) (i32.const 16) (i32.const 7) (i32.const 8) (i32.const 12)))
      (then (drop (call $add (i32.const 2) (i32.const 32) (i32.const 17)
        (i32.load (i32.const 8)) (i32.load (i32.const 12))))))
    (call $copy (i32.const 64) (i32.const 16) (i32.const 96) (i32.const 10))
    (call $copy (i32.const 112) (i32.const 10) (i32.const 128) (i32.const 7))
    (call $copy (i32.const 144) (i32.const 12) (i32.const 160) (i32.const 9))
    (call $copy (i32.const 176) (i32.const 16) (i32.const 200) (i32.const 10))
    (if (i32.eqz (call $get (i32.const 0) (i32.const 224) (i32.const 16) (i32.const 8) (i32.const 12)))
      (then (drop (call $replace (i32.const 2) (i32.const 16) (i32.const 7)
        (i32.load (i32.const 8)) (i32.load (i32.const 12))))))
    (i32.const 0))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_passes_the_response_callbacks_and_plugins_read_the_request() {
    let dir = std::env::temp_dir().join(format!("wasm-observer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("observer.wasm");
    std::fs::write(&module, compile(OBSERVER)).unwrap();
    let observer = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: observer, namespace: app}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  url: file://{}\n  priority: 100\n---\n",
        module.display()
    );
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: pages, namespace: app}
spec:
  parentRefs: [{kind: Service, group: "", name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: echo, port: 80}]
---
"#;
    let config = [
        observer,
        plugin(
            "body",
            "body_inspect",
            "  pluginConfig: {deny: [DROP TABLE]}",
        ),
        route.to_owned(),
        DENY_ADMIN.to_owned(),
    ]
    .concat();
    let net = 69;
    let mesh = Mesh::start(net, &config).await;

    // An upstream answer, and what the plugin read of the request that led to it.
    let r = mesh.request("GET", "/page", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-observed-status"), Some("200"));
    assert_eq!(r.header("x-protocol"), Some("HTTP/1.1"));
    assert_eq!(r.header("x-route"), Some("HTTPRoute app/pages rules[0]"));
    assert_eq!(
        r.header("x-cluster"),
        Some("inbound-vip|80|http|echo.app.svc.cluster.local")
    );
    let upstream = r.header("x-upstream").expect("the endpoint is known");
    assert!(
        [format!("127.{net}.1.2:8080"), format!("127.{net}.2.1:8080")]
            .contains(&upstream.to_owned()),
        "{upstream}"
    );

    // The waypoint's own answers: an RBAC denial, a body a plugin refused, and an upstream
    // that closes every connection (503 after the retries).
    let r = mesh.request("GET", "/admin", &[], "").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.header("x-observed-status"), Some("403"));
    assert!(r.header("x-upstream").is_none(), "no upstream was chosen");
    let r = mesh
        .request("POST", "/page", &[], "x'; DROP TABLE users")
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body, "request body refused\n");
    assert_eq!(r.header("x-observed-status"), Some("403"));
    let r = mesh
        .request(
            "GET",
            "/page",
            &[("x-fail", "echo-v1,echo-v2"), ("x-fail-with", "close")],
            "",
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("x-observed-status"), Some("503"));

    // A plugin sets the status of an upstream's answer.
    let r = mesh
        .request("GET", "/page", &[("x-rewrite-status", "299")], "")
        .await;
    assert_eq!(r.status, 299, "{}", r.body);
    assert!(r.backend().starts_with("echo-v"), "{r:?}");
    mesh.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_before_authorization_are_authorized_and_after_it_are_not() {
    let rewrite = |name: &str, phase: &str, from: &str| {
        plugin(
            name,
            "rewrite_path",
            &format!("  phase: {phase}\n  pluginConfig: {{prefix: {from}, replacement: /admin}}"),
        )
    };
    let config = [
        rewrite("authz", "AUTHZ", "/hidden"),
        rewrite("stats", "STATS", "/late"),
        DENY_ADMIN.to_owned(),
    ]
    .concat();
    let mesh = Mesh::start(70, &config).await;
    // An AUTHZ plugin runs before authorization: the path it makes is the one authorized.
    let r = mesh.request("GET", "/hidden", &[], "").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body, "RBAC: access denied");
    // A STATS plugin runs after it: its rewrite reaches the backend, authorized as it came.
    let r = mesh.request("GET", "/late", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("path=/admin"), "{}", r.body);
    mesh.shutdown().await;
}

/// What a plugin that counts the ends of a request's body it is given (in `$ends`) adds to its
/// module: the count, reset for each request, and `x-body-ends: <n>` on the response. The
/// module imports `proxy_add_header_map_value` as `$add` and leaves memory 32..59 to this.
const COUNTS_ENDS: &str = r#"
  (global $ends (mut i32) (i32.const 0))
  (data (i32.const 32) "x-body-ends")
  (func (export "proxy_on_context_create") (param i32 i32)
    (global.set $ends (i32.const 0)))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (i32.store8 (i32.const 48) (i32.add (i32.const 48) (global.get $ends)))
    (drop (call $add (i32.const 2) (i32.const 32) (i32.const 11) (i32.const 48) (i32.const 1)))
    (i32.const 0))
"#;

/// A plugin that holds the request body to its end, then puts `<` before it (dropping the
/// request's `content-length`, as a plugin that changes a body's length does), and answers with
/// `x-body-ends: <n>`, how many times it was given the end of this request's body
/// (`COUNTS_ENDS`).
const BODY_ONCE: &str = r#"
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (data (i32.const 16) "<")
  (data (i32.const 64) "content-length")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $remove (i32.const 0) (i32.const 64) (i32.const 14)))
    (i32.const 0))
  (func (export "proxy_on_request_body") (param i32) (param i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (global.set $ends (i32.add (global.get $ends) (i32.const 1)))
    (drop (call $set (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 1)))
    (i32.const 0))
"#;

/// A retried request's body is what the plugins made of it, given to them once, as Envoy's
/// filters see a body once and its router replays what they passed: the retry is sent what
/// went to the first upstream, not the body as it was read. A body a plugin refused is never
/// retried past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_replays_the_body_the_plugins_made_without_running_them_again() {
    let dir = std::env::temp_dir().join(format!("wasm-body-once-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("body_once.wasm");
    std::fs::write(&module, compile(&[BODY_ONCE, COUNTS_ENDS].concat())).unwrap();
    let config = format!(
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: body-once, namespace: app}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  url: file://{}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: app}}
spec:
  hosts: [echo.app.svc.cluster.local]
  http:
  - retries: {{attempts: 2, retryOn: 5xx}}
    route: [{{destination: {{host: echo.app.svc.cluster.local}}}}]
---
{}"#,
        module.display(),
        plugin(
            "body",
            "body_inspect",
            "  pluginConfig: {deny: [DROP TABLE]}",
        ),
    );
    let mesh = Mesh::start(87, &config).await;
    let fail_v1 = [("x-fail", "echo-v1"), ("x-fail-with", "503")];
    // Until two requests tried echo-v1 first (the balancer picks either) and were retried.
    let mut retried = 0;
    for i in 0..40 {
        if retried == 2 {
            break;
        }
        let path = format!("/once/{i}");
        let r = mesh.request("POST", &path, &fail_v1, "hello world").await;
        assert_eq!((r.status, r.backend()), (200, "echo-v2"), "{}", r.body);
        assert!(r.body.contains("body=<hello world\n"), "{}", r.body);
        assert_eq!(r.header("x-body-ends"), Some("1"), "request {i}");
        let tried = mesh.seen_by("echo-v1");
        if let Some(first) = tried.iter().find(|s| s.path == path) {
            assert_eq!(first.body, "<hello world", "the first attempt's body");
            retried += 1;
        }
    }
    assert_eq!(retried, 2, "requests retried");

    // A request without a body, retried: its headers ended it, so, as in Envoy, the plugins'
    // body callback is never called for it, on the first attempt or the retry.
    let mut retried = 0;
    for i in 0..40 {
        if retried == 2 {
            break;
        }
        let path = format!("/bodiless/{i}");
        let r = mesh.request("GET", &path, &fail_v1, "").await;
        assert_eq!((r.status, r.backend()), (200, "echo-v2"), "{}", r.body);
        assert_eq!(r.header("x-body-ends"), Some("0"), "request {i}");
        retried += mesh
            .seen_by("echo-v1")
            .iter()
            .filter(|s| s.path == path)
            .count();
    }
    assert_eq!(retried, 2, "requests retried");

    // A retry while the body is still arriving, the plugin holding all of it so far: nothing
    // of it went, so nothing is replayed, and the rest follows through the plugin as before.
    let mut retried = 0;
    for i in 0..40 {
        if retried == 2 {
            break;
        }
        let path = format!("/midway/{i}");
        let (response, tried) = mesh.post_retried_midway(&path, "first;", "second").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("body=<first;second\n"), "{response}");
        assert!(response.contains("x-body-ends: 1\r\n"), "{response}");
        retried += usize::from(tried);
    }
    assert_eq!(retried, 2, "requests retried");

    // A body a plugin refuses (after its head went upstream) is answered 403, and not tried
    // on another upstream (a retry policy for 5xx notwithstanding).
    for i in 0..4 {
        let r = mesh
            .request(
                "POST",
                &format!("/refused/{i}"),
                &[("x-record-head", "1")],
                "x'; DROP TABLE users",
            )
            .await;
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.body, "request body refused\n");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for i in 0..4 {
        let path = format!("/refused/{i}");
        let heads = (mesh.seen.lock().unwrap().iter())
            .filter(|s| s.path == path && s.body == "(head)")
            .count();
        assert!(heads <= 1, "{path} went to {heads} upstreams");
    }
    mesh.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plugin that puts `<` before every chunk of a request's body it is given, and `.` after the
/// body's end, and answers with `x-body-ends: <n>`, how many ends it was given by then
/// (`COUNTS_ENDS`).
const TAG_CHUNKS: &str = r#"
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (data (i32.const 16) "<.")
  (func (export "proxy_on_request_body") (param i32) (param $size i32) (param $eos i32) (result i32)
    (if (local.get $size)
      (then (drop (call $set (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 1)))))
    (if (local.get $eos)
      (then
        (global.set $ends (i32.add (global.get $ends) (i32.const 1)))
        (drop (call $set (i32.const 0) (i32.const 2147483647) (i32.const 0) (i32.const 17) (i32.const 1)))))
    (i32.const 0))
"#;

/// An upgraded connection (a WebSocket) through the waypoint with plugins in its chain: what
/// the client sends after the `101` is carried both ways for as long as the connection lasts,
/// given to the plugins' request body callback as Envoy gives an upgrade's bytes, with one end,
/// the client's close, which reaches the server after those bytes and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_is_carried_with_plugins_in_the_chain() {
    let net = 86;
    let dir = std::env::temp_dir().join(format!("wasm-upgraded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join("tag_chunks.wasm");
    std::fs::write(&module, compile(&[TAG_CHUNKS, COUNTS_ENDS].concat())).unwrap();
    let config = format!(
        r#"{}
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: tag-chunks, namespace: app}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  url: file://{}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ws, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [ws.external.test]
  addresses: [127.{net}.9.20]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints: [{{address: 127.{net}.9.21, labels: {{istio.io/dataplane-mode: none}}}}]
"#,
        plugin(
            "add-header",
            "add_header",
            "  pluginConfig: {headers: {x-wasm: added}}"
        ),
        module.display(),
    );
    let mesh = Mesh::start(net, &config).await;
    // A server that switches protocols on any request, then echoes what it is sent, and says
    // all it received once the client closes.
    let server = tokio::net::TcpListener::bind((mesh.ip("9.21"), 8080))
        .await
        .expect("bind");
    let (closed, received) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut closed = Some(closed);
        while let Ok((mut s, _)) = server.accept().await {
            let closed = closed.take();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                // Not at once: Pingora 0.9.1 closes an upgraded connection whose `101` it read
                // before it passed on the end of the request's head (its upstream half takes
                // that end for the upgraded connection's), which a plugin in the chain makes
                // likelier. The wait is the server's, not the waypoint's.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let switched = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
                if s.write_all(switched.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                let mut all = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                }
                if let Some(closed) = closed {
                    let _ = closed.send(all);
                }
            });
        }
    });

    let mut s = mesh
        .socks(&format!("127.{net}.9.20"), 80)
        .await
        .expect("socks");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: ws.external.test\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("the response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("x-wasm: added"), "through the plugin: {head}");
    // The request's empty body before the `101` is not an end: the upgraded bytes follow.
    assert!(head.contains("x-body-ends: 0"), "{head}");
    // Each message is one chunk, which the tagging plugin marks on its way to the server.
    for message in [&b"ping"[..], b"and again", b"and once more"] {
        s.write_all(message).await.expect("write");
        let mut echoed = vec![0u8; message.len() + 1];
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut echoed))
            .await
            .expect("echoed in time")
            .expect("echoed");
        assert_eq!(echoed, [b"<", message].concat());
    }
    // The client closes its side: the server sees the end after what was sent, nothing more.
    s.shutdown().await.expect("shutdown");
    let all = tokio::time::timeout(std::time::Duration::from_secs(5), received)
        .await
        .expect("the close reached the server in time")
        .expect("the server's account");
    assert_eq!(
        String::from_utf8_lossy(&all),
        "<ping<and again<and once more.",
        "nothing sent twice, and the end once, at the close"
    );
    mesh.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
