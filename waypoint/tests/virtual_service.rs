//! VirtualService and DestinationRule features through the waypoint: subsets, header
//! changes, faults, retries (status, reset with body replay, per-try timeout), the overall
//! timeout, rewrite, redirect, mirror and CORS.

mod support;

use std::time::{Duration, Instant};

use support::Mesh;

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: app}
spec:
  host: echo.app.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: app}
spec:
  hosts: [echo.app.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /vs2}}]
    headers: {request: {set: {x-vs: "yes"}}, response: {add: {x-vs-resp: "1"}}}
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v2}}]
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: echo.app.svc.cluster.local}}]
  - match: [{uri: {prefix: /delay}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v1}}]
  - match: [{uri: {prefix: /retry}}]
    retries: {attempts: 2, retryOn: "503"}
    route: [{destination: {host: echo.app.svc.cluster.local}}]
  - match: [{uri: {prefix: /noretry}}]
    route: [{destination: {host: echo.app.svc.cluster.local}}]
  - match: [{uri: {prefix: /replay-shadowed}}]
    retries: {attempts: 2, retryOn: reset}
    mirror: {host: shadow.app.svc.cluster.local}
    route: [{destination: {host: echo.app.svc.cluster.local}}]
  - match: [{uri: {prefix: /replay}}]
    retries: {attempts: 2, retryOn: reset}
    route: [{destination: {host: echo.app.svc.cluster.local}}]
  - match: [{uri: {prefix: /pertry}}]
    retries: {attempts: 2, perTryTimeout: 1s, retryOn: 5xx}
    route: [{destination: {host: echo.app.svc.cluster.local}}]
  - match: [{uri: {prefix: /timeout}}]
    timeout: 300ms
    route: [{destination: {host: echo.app.svc.cluster.local}}]
  - match: [{uri: {prefix: /vsold}}]
    rewrite: {uri: /vsnew}
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v1}}]
  - match: [{uri: {exact: /vsredirect}}]
    redirect: {uri: /elsewhere}
  - match: [{uri: {prefix: /shadowed}}]
    mirror: {host: shadow.app.svc.cluster.local}
    mirrorPercentage: {value: 100}
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v1}}]
  - match: [{uri: {prefix: /cors}}]
    corsPolicy:
      allowOrigins: [{exact: "https://good.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      maxAge: 60s
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v1}}]
  - match: [{uri: {prefix: /split}}]
    route:
    - {destination: {host: echo.app.svc.cluster.local, subset: v1}, weight: 50}
    - {destination: {host: echo.app.svc.cluster.local, subset: v2}, weight: 50}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_subsets_headers_faults_rewrite_redirect() {
    let mesh = Mesh::start(46, ROUTES).await;

    let r = mesh.request("GET", "/vs2/a", &[], "").await;
    assert_eq!((r.status, r.backend()), (200, "echo-v2"));
    assert!(r.body.contains("x-vs: yes"), "{}", r.body);
    assert_eq!(r.header("x-vs-resp"), Some("1"));

    // Both subsets of a split get traffic.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(
            mesh.request("GET", "/split", &[], "")
                .await
                .backend()
                .to_owned(),
        );
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // First match wins; nothing matches → 404.
    assert_eq!(mesh.request("GET", "/nothing", &[], "").await.status, 404);

    // Faults.
    let r = mesh.request("GET", "/abort", &[], "").await;
    assert_eq!(r.status, 418);
    assert_eq!(r.backend(), "");
    let started = Instant::now();
    let r = mesh.request("GET", "/delay", &[], "").await;
    assert_eq!((r.status, r.backend()), (200, "echo-v1"));
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Rewrite and redirect.
    let r = mesh.request("GET", "/vsold/x?q=1", &[], "").await;
    assert!(r.body.contains("path=/vsnew/x?q=1"), "{}", r.body);
    let r = mesh.request("GET", "/vsredirect", &[], "").await;
    assert_eq!(r.status, 301);
    let location = r.header("location").unwrap_or_default();
    assert!(location.ends_with("/elsewhere"), "{location}");

    // Mirror.
    assert_eq!(
        mesh.request("POST", "/shadowed", &[], "copy me")
            .await
            .status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !mesh
        .seen_by("shadow-1")
        .iter()
        .any(|s| s.path == "/shadowed" && s.body == "copy me")
    {
        assert!(Instant::now() < deadline, "mirror never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_timeouts() {
    let mesh = Mesh::start(47, ROUTES).await;
    let fail_v1_503 = [("x-fail", "echo-v1"), ("x-fail-with", "503")];

    // Without a retry policy for 503, a failing endpoint's answer reaches the client.
    let mut failures = 0;
    for _ in 0..20 {
        if mesh
            .request("GET", "/noretry", &fail_v1_503, "")
            .await
            .status
            == 503
        {
            failures += 1;
        }
    }
    assert!(failures > 0, "the failing endpoint was never chosen");

    // With retryOn 503, every request succeeds on the other endpoint.
    for _ in 0..20 {
        let r = mesh.request("GET", "/retry", &fail_v1_503, "").await;
        assert_eq!((r.status, r.backend()), (200, "echo-v2"), "{}", r.body);
    }

    // A POST whose first upstream closes before answering is replayed, body and all.
    let close_v1 = [("x-fail", "echo-v1"), ("x-fail-with", "close")];
    for i in 0..10 {
        let body = format!("payload-{i}");
        let r = mesh.request("POST", "/replay", &close_v1, &body).await;
        assert_eq!((r.status, r.backend()), (200, "echo-v2"), "{}", r.body);
        assert!(r.body.contains(&format!("body={body}")), "{}", r.body);
    }
    assert!(
        mesh.seen_by("echo-v1")
            .iter()
            .any(|s| s.method == "POST" && s.path == "/replay"),
        "echo-v1 never got the first attempt"
    );

    // Per-try timeout: a slow endpoint is abandoned after 1 s and the retry succeeds. (The
    // timeout leaves the healthy endpoint's attempt time on a busy machine.)
    let slow_v1 = [("x-delay-ms", "30000"), ("x-delay-on", "echo-v1")];
    for _ in 0..5 {
        let started = Instant::now();
        let r = mesh.request("GET", "/pertry", &slow_v1, "").await;
        assert_eq!((r.status, r.backend()), (200, "echo-v2"), "{}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    // Overall timeout: 504 at the deadline.
    let started = Instant::now();
    let r = mesh
        .request("GET", "/timeout", &[("x-delay-ms", "30000")], "")
        .await;
    assert_eq!(r.status, 504, "{}", r.body);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(10),
        "{took:?}"
    );

    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_and_responses() {
    let mesh = Mesh::start(48, ROUTES).await;
    let preflight = [
        ("origin", "https://good.example"),
        ("access-control-request-method", "POST"),
    ];
    let r = mesh.request("OPTIONS", "/cors", &preflight, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), "", "answered by the waypoint");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://good.example")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(r.header("access-control-max-age"), Some("60"));

    // A preflight from another origin goes to the application (VirtualService default).
    let other = [
        ("origin", "https://evil.example"),
        ("access-control-request-method", "POST"),
    ];
    let r = mesh.request("OPTIONS", "/cors", &other, "").await;
    assert_eq!(r.backend(), "echo-v1");
    assert_eq!(r.header("access-control-allow-origin"), None);

    // A simple request from an allowed origin gets the header on the upstream's answer.
    let r = mesh
        .request("GET", "/cors", &[("origin", "https://good.example")], "")
        .await;
    assert_eq!(r.backend(), "echo-v1");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://good.example")
    );
    mesh.shutdown().await;
}

const MATCHES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: app}
spec:
  host: echo.app.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: app}
spec:
  hosts: [echo.app.svc.cluster.local]
  http:
  - match: [{authority: {prefix: canary.}}]
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v2}}]
  - match: [{queryParams: {tier: {exact: gold}}}]
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v2}}]
  - match: [{method: {exact: DELETE}}]
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v2}}]
  - match: [{uri: {regex: "/api/v[0-9]+/.*"}, headers: {x-team: {prefix: pay}}}]
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v2}}]
  - match: [{withoutHeaders: {x-anon: {}}}]
    route: [{destination: {host: echo.app.svc.cluster.local, subset: v1}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_conditions() {
    let mesh = Mesh::start(56, MATCHES).await;
    // (method, path, headers, expected backend; "" = no rule matched, 404)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        ("GET", "/", &[("host", "canary.echo:80")], "echo-v2"),
        ("GET", "/x?tier=gold", &[], "echo-v2"),
        ("GET", "/x?tier=silver", &[], "echo-v1"),
        ("DELETE", "/x", &[], "echo-v2"),
        ("GET", "/api/v2/items", &[("x-team", "payments")], "echo-v2"),
        ("GET", "/api/v2/items", &[("x-team", "search")], "echo-v1"),
        ("GET", "/api/vx/items", &[("x-team", "payments")], "echo-v1"),
        ("GET", "/x", &[("x-anon", "1")], ""),
    ];
    for &(method, path, headers, backend) in cases {
        let r = mesh.request(method, path, headers, "").await;
        let status = if backend.is_empty() { 404 } else { 200 };
        assert_eq!(
            (r.status, r.backend()),
            (status, backend),
            "{method} {path} {headers:?}"
        );
    }
    mesh.shutdown().await;
}

/// A VirtualService for `echo` in `namespace`, exported to `export_to`, answering 418 itself.
fn teapot(namespace: &str, export_to: &str) -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: teapot, namespace: {namespace}}}
spec:
  hosts: [echo.app.svc.cluster.local]
  exportTo: {export_to}
  http: [{{directResponse: {{status: 418}}}}]
"#
    )
}

/// The waypoint (in `app`) applies the VirtualServices of its service's namespace and of its
/// own, where they are exported to it; one in another namespace cannot reroute `app`'s service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_virtual_services_exported_to_the_waypoints_namespace_apply() {
    let mesh = Mesh::start(76, &teapot("app", "[]")).await;
    assert_eq!(mesh.request("GET", "/", &[], "").await.status, 418);
    for (namespace, export_to) in [("other", "[\"*\"]"), ("app", "[other]")] {
        mesh.set_routes(&teapot(namespace, export_to)).await;
        let r = mesh.request("GET", "/", &[], "").await;
        assert_eq!(r.status, 200, "{namespace} {export_to}");
    }
    mesh.set_routes(&teapot("app", "[\".\"]")).await;
    assert_eq!(mesh.request("GET", "/", &[], "").await.status, 418);
    mesh.shutdown().await;
}

/// A request whose first upstream closes before its body is all sent is retried with the body
/// replayed from what the waypoint kept, then the rest as it arrives; the mirror has each byte
/// once, as the retried upstream does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_replayed_by_a_retry_is_mirrored_once() {
    let mesh = Mesh::start(89, ROUTES).await;
    // Until two requests tried echo-v1 first (the balancer picks either) and were retried.
    let mut retried = 0;
    for i in 0..40 {
        if retried == 2 {
            break;
        }
        let path = format!("/replay-shadowed/{i}");
        let (response, tried) = mesh.post_retried_midway(&path, "first;", "second").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("body=first;second"), "{response}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mirrored = loop {
            if let Some(s) = mesh
                .seen_by("shadow-1")
                .into_iter()
                .find(|s| s.path == path && s.body != "(head)")
            {
                break s.body;
            }
            assert!(Instant::now() < deadline, "mirror never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(mirrored, "first;second", "request {i}");
        retried += usize::from(tried);
    }
    assert_eq!(retried, 2, "requests retried");
    mesh.shutdown().await;
}
