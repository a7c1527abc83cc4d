//! HTTPRoute features through the waypoint, one table of cases against one mesh.

mod support;

use std::time::{Duration, Instant};

use support::Mesh;

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /exact}, headers: [{name: x-user, value: jason}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-added, value: "1"}], remove: [x-secret]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-resp, value: r}]}
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: canary, value: "true"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /q}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /method}, method: POST}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.com, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /split}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 80}, {name: echo-v2, port: 80, weight: 20}]
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /nobackend}}]
"#;

/// Method, path, headers, expected status, expected backend (`""`: answered by the waypoint).
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_route_features() {
    let mesh = Mesh::start(44, ROUTES).await;

    let cases: &[Case<'_>] = &[
        ("GET", "/v2/x", &[], 200, "echo-v2"),
        ("GET", "/v2", &[], 200, "echo-v2"),
        ("GET", "/exact", &[("x-user", "jason")], 200, "echo-v2"),
        ("GET", "/re/123", &[], 200, "echo-v1"),
        ("GET", "/q?canary=true", &[], 200, "echo-v2"),
        ("GET", "/q?canary=false", &[], 200, "echo-v1"),
        ("POST", "/method", &[], 200, "echo-v2"),
        // Nothing matches (GET on a POST-only path, unknown paths): 404.
        ("GET", "/method", &[], 404, ""),
        ("GET", "/exact", &[("x-user", "other")], 404, ""),
        ("GET", "/re/abc", &[], 404, ""),
        ("GET", "/unknown", &[], 404, ""),
        // A rule without backends answers 500, as the spec says.
        ("GET", "/nobackend", &[], 500, ""),
    ];
    for &(method, path, headers, status, backend) in cases {
        let r = mesh.request(method, path, headers, "").await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(r.backend(), backend, "{method} {path}");
    }

    // Header modifiers, both directions.
    let r = mesh
        .request(
            "GET",
            "/exact",
            &[("x-user", "jason"), ("x-secret", "s")],
            "",
        )
        .await;
    assert!(r.body.contains("x-added: 1"), "{}", r.body);
    assert!(!r.body.contains("x-secret"), "{}", r.body);
    assert_eq!(r.header("x-resp"), Some("r"));

    // Redirect.
    let r = mesh.request("GET", "/redirect/a?b=c", &[], "").await;
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("http://example.com/redirect/a?b=c")
    );

    // Rewrite of path prefix and host.
    let r = mesh.request("GET", "/old/page?k=v", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("path=/new/page?k=v"), "{}", r.body);
    assert!(r.body.contains("host: rewritten.example"), "{}", r.body);

    // Mirror: the shadow backend sees the request with the -shadow host; the client gets the
    // primary's answer.
    let r = mesh.request("GET", "/mirror/1", &[], "").await;
    assert_eq!(r.backend(), "echo-v1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = mesh.seen_by("shadow-1");
        if let Some(s) = seen.iter().find(|s| s.path == "/mirror/1") {
            assert_eq!(s.host, "echo.app.svc.cluster.local-shadow:80");
            break;
        }
        assert!(Instant::now() < deadline, "mirror never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Request timeout: 504 at about the deadline, not at the backend's pace.
    let started = Instant::now();
    let r = mesh
        .request("GET", "/slow", &[("x-delay-ms", "30000")], "")
        .await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_traffic_80_20() {
    let mesh = Mesh::start(45, ROUTES).await;
    let mut v1 = 0;
    const N: usize = 1000;
    for _ in 0..N {
        let r = mesh.request("GET", "/split", &[], "").await;
        assert_eq!(r.status, 200);
        if r.backend() == "echo-v1" {
            v1 += 1;
        }
    }
    // Binomial(1000, 0.8): sd ≈ 12.6; ±60 is beyond 4.7 sd.
    assert!((740..=860).contains(&v1), "echo-v1 got {v1} of {N}");
    mesh.shutdown().await;
}

const RETRY_TIMEOUT_CORS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /retry}}]
    retry: {codes: [503], attempts: 2}
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /noretry}}]
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /backend-timeout}}]
    timeouts: {request: 5s, backendRequest: 300ms}
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /cors}}]
    filters:
    - type: CORS
      cors: {allowOrigins: ["https://good.example"], allowMethods: [GET, PUT], maxAge: 60}
    backendRefs: [{name: echo-v1, port: 80}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_route_retry_backend_timeout_and_cors() {
    let mesh = Mesh::start(54, RETRY_TIMEOUT_CORS).await;
    let fail_v1 = [("x-fail", "echo-v1"), ("x-fail-with", "503")];

    // Without the retry stanza the mesh default retries no status: the failure shows.
    let mut failed = 0;
    for _ in 0..20 {
        if mesh.request("GET", "/noretry", &fail_v1, "").await.status == 503 {
            failed += 1;
        }
    }
    assert!(failed > 0, "the failing endpoint was never chosen");
    // `retry.codes: [503]` retries on the other endpoint.
    for _ in 0..20 {
        let r = mesh.request("GET", "/retry", &fail_v1, "").await;
        assert_eq!((r.status, r.backend()), (200, "echo-v2"), "{}", r.body);
    }

    // backendRequest bounds the attempt: 504 long before the backend would answer.
    let started = Instant::now();
    let r = mesh
        .request("GET", "/backend-timeout", &[("x-delay-ms", "30000")], "")
        .await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // CORS filter: an allowed preflight is answered here; another origin's preflight is
    // answered without CORS headers (Istio's choice for HTTPRoute), never forwarded.
    let preflight =
        |origin: &'static str| [("origin", origin), ("access-control-request-method", "PUT")];
    let r = mesh
        .request("OPTIONS", "/cors", &preflight("https://good.example"), "")
        .await;
    assert_eq!((r.status, r.backend()), (200, ""));
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://good.example")
    );
    assert_eq!(r.header("access-control-max-age"), Some("60"));
    let r = mesh
        .request("OPTIONS", "/cors", &preflight("https://evil.example"), "")
        .await;
    assert_eq!((r.status, r.backend()), (200, ""));
    assert_eq!(r.header("access-control-allow-origin"), None);
    mesh.shutdown().await;
}
