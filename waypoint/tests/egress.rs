//! Egress through the waypoint: a ServiceEntry bound to the waypoint whose endpoint is out of
//! the mesh is reached with plain TCP, on its HTTP and its TCP port, at the address allocated
//! to its host (it declares none), as an egress waypoint serves it in Istio's ambient mode; an
//! endpoint that is a DNS name is resolved by the waypoint (through the system resolver, so the
//! test's name is `localhost`), and one that does not resolve is answered 503. An entry resolved
//! `NONE` (the default) is passed through to the address the caller dialled, whatever
//! endpoints it selects, as Istio's waypoint sends it (an original-destination cluster).

mod support;

use std::net::IpAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::Mesh;

const NET: u8 = 94;

fn entry() -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.external.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 8080}}
  - {{number: 5432, name: tcp, protocol: TCP, targetPort: 9000}}
  endpoints: [{{address: 127.{NET}.9.1, labels: {{istio.io/dataplane-mode: none}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: named, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.named.test]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {NAMED_PORT}}}]
  endpoints: [{{address: localhost}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: nowhere, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.nowhere.test]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: nowhere.invalid}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: nowhere, namespace: app}}
spec:
  host: api.nowhere.test
  trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: 1s}}}}}}
"#
    )
}

/// Where `localhost`'s backend listens (on 127.0.0.1, which other tests do not use).
const NAMED_PORT: u16 = 18094;

/// The address allocated to `host`.
fn allocated(mesh: &Mesh, host: &str) -> String {
    let snapshot = mesh.store.load();
    let (_, service) = snapshot.service_by_host(host).expect("host");
    service.vips[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_service_entry_is_reached_through_the_waypoint_with_plain_tcp() {
    let mesh = Mesh::start(NET, &entry()).await;
    let external: IpAddr = format!("127.{NET}.9.1").parse().expect("ip");
    let http = TcpListener::bind((external, 8080)).await.expect("bind");
    tokio::spawn(support::echo(http, "external", mesh.seen.clone()));
    let tcp = TcpListener::bind((external, 9000)).await.expect("bind");
    tokio::spawn(support::tcp_echo(tcp, "external"));
    let vip = allocated(&mesh, "api.external.test");
    assert!(vip.starts_with("240.240."), "allocated: {vip}");

    // HTTP: routed by the waypoint, answered by the endpoint outside the mesh, twice over one
    // pooled connection.
    for _ in 0..2 {
        let r = mesh
            .request_to(
                &vip,
                80,
                "GET",
                "/v1/charges",
                &[("host", "api.external.test")],
                "",
            )
            .await
            .expect("request");
        assert_eq!((r.status, r.backend()), (200, "external"), "{}", r.body);
        assert_eq!(r.header("x-connection"), Some("external/1"));
    }
    let seen = mesh.seen_by("external");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/v1/charges");

    // TCP: copied byte for byte.
    let mut s = mesh.socks(&vip, 5432).await.expect("socks");
    s.write_all(b"ping").await.expect("write");
    let mut got = vec![0u8; "external\nping".len()];
    s.read_exact(&mut got).await.expect("read");
    assert_eq!(got, b"external\nping");
    drop(s);

    // A name: resolved by the waypoint, then plain TCP to what it resolved to.
    let named = TcpListener::bind(("127.0.0.1", NAMED_PORT))
        .await
        .expect("bind");
    tokio::spawn(support::echo(named, "named", mesh.seen.clone()));
    let vip = allocated(&mesh, "api.named.test");
    let r = mesh
        .request_to(&vip, 80, "GET", "/", &[("host", "api.named.test")], "")
        .await
        .expect("request");
    assert_eq!((r.status, r.backend()), (200, "named"), "{}", r.body);

    // A name that does not resolve (within the connect timeout): 503.
    let vip = allocated(&mesh, "api.nowhere.test");
    let r = mesh
        .request_to(&vip, 80, "GET", "/", &[("host", "api.nowhere.test")], "")
        .await
        .expect("request");
    assert_eq!(r.status, 503, "{}", r.body);
    mesh.shutdown().await;
}

/// A plain HTTP/1.1 connection to an endpoint out of the mesh carries at most the
/// DestinationRule's `maxRequestsPerConnection`, then closes: Envoy's limit, on the
/// connections Pingora pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_connections_close_after_max_requests_per_connection() {
    let net = 97;
    let entry = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.external.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints: [{{address: 127.{net}.9.1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: external, namespace: app}}
spec:
  host: api.external.test
  trafficPolicy: {{connectionPool: {{http: {{maxRequestsPerConnection: 2}}}}}}
"#
    );
    let mesh = Mesh::start(net, &entry).await;
    let http = TcpListener::bind((mesh.ip("9.1"), 8080))
        .await
        .expect("bind");
    tokio::spawn(support::echo(http, "external", mesh.seen.clone()));
    let vip = allocated(&mesh, "api.external.test");
    let mut connections = Vec::new();
    for _ in 0..5 {
        let r = mesh
            .request_to(&vip, 80, "GET", "/", &[("host", "api.external.test")], "")
            .await
            .expect("request");
        assert_eq!((r.status, r.backend()), (200, "external"), "{}", r.body);
        connections.push(r.header("x-connection").expect("counted").to_owned());
    }
    assert_eq!(
        connections,
        [
            "external/1",
            "external/1",
            "external/2",
            "external/2",
            "external/3"
        ]
    );
    mesh.shutdown().await;
}

/// A ServiceEntry without `resolution` (`NONE`) bound to the waypoint: requests and TCP
/// connections to its address go there, routed by the waypoint on the way, never to the
/// endpoint the entry selects; a route from another service to it has nowhere to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_resolved_none_is_passed_through_to_the_address_dialled() {
    let net = 93;
    let entry = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ranges, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [ranges.external.test]
  addresses: [127.{net}.9.5]
  location: MESH_EXTERNAL
  ports:
  - {{number: 8080, name: http, protocol: HTTP}}
  - {{number: 9001, name: tcp, protocol: TCP}}
  endpoints: [{{address: 127.{net}.9.6, labels: {{istio.io/dataplane-mode: none}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ranges, namespace: app}}
spec:
  hosts: [ranges.external.test]
  http:
  - headers: {{request: {{set: {{x-via: waypoint}}}}}}
    route: [{{destination: {{host: ranges.external.test}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: app}}
spec:
  hosts: [echo.app.svc.cluster.local]
  http:
  - match: [{{uri: {{prefix: /to-ranges}}}}]
    route: [{{destination: {{host: ranges.external.test, port: {{number: 8080}}}}}}]
  - route: [{{destination: {{host: echo.app.svc.cluster.local}}}}]
"#
    );
    let mesh = Mesh::start(net, &entry).await;
    let dialled = mesh.ip("9.5");
    for (ip, name) in [(dialled, "dialled"), (mesh.ip("9.6"), "selected")] {
        let http = TcpListener::bind((ip, 8080)).await.expect("bind");
        tokio::spawn(support::echo(http, name, mesh.seen.clone()));
        let tcp = TcpListener::bind((ip, 9001)).await.expect("bind");
        tokio::spawn(support::tcp_echo(tcp, name));
    }
    let vip = dialled.to_string();

    // HTTP: through the waypoint (which adds its own view of the request) to the address the
    // client dialled.
    let r = mesh
        .request_to(
            &vip,
            8080,
            "GET",
            "/ip",
            &[("host", "ranges.external.test")],
            "",
        )
        .await
        .expect("request");
    assert_eq!((r.status, r.backend()), (200, "dialled"), "{}", r.body);
    assert!(
        r.body.contains("x-via: waypoint"),
        "routed by the waypoint: {}",
        r.body
    );
    assert_eq!(mesh.seen_by("dialled").len(), 1);
    assert!(mesh.seen_by("selected").is_empty());

    // A route from another service to the entry: no address of the entry was dialled, so
    // there is nowhere to pass the request through to.
    let r = mesh.request("GET", "/to-ranges", &[], "").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(mesh.seen_by("dialled").len(), 1);

    // TCP: copied byte for byte to the same address.
    let mut s = mesh.socks(&vip, 9001).await.expect("socks");
    s.write_all(b"ping").await.expect("write");
    let mut got = vec![0u8; "dialled\nping".len()];
    s.read_exact(&mut got).await.expect("read");
    assert_eq!(got, b"dialled\nping");
    drop(s);
    mesh.shutdown().await;
}

/// A mirror's service picks its upstream as a request to it would: an endpoint out of the mesh
/// is reached in plain TCP, one known by name once resolved, a `GRPC` port with HTTP/2; an
/// entry resolved `NONE` has nothing to pass a mirror of another service's request through to,
/// and one whose DestinationRule originates TLS is not mirrored in the clear, so neither gets
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_reach_services_as_requests_to_them_would() {
    let net = 88;
    let config = format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external, namespace: app}}
spec:
  hosts: [api.external.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints: [{{address: 127.{net}.9.1, labels: {{istio.io/dataplane-mode: none}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: named, namespace: app}}
spec:
  hosts: [api.named.test]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {MIRROR_NAMED_PORT}}}]
  endpoints: [{{address: localhost}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ranges, namespace: app}}
spec:
  hosts: [ranges.external.test]
  addresses: [127.{net}.9.5]
  location: MESH_EXTERNAL
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.{net}.9.6, labels: {{istio.io/dataplane-mode: none}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: grpc, namespace: app}}
spec:
  hosts: [api.grpc.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: grpc, protocol: GRPC, targetPort: 8080}}]
  endpoints: [{{address: 127.{net}.9.7, labels: {{istio.io/dataplane-mode: none}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tls, namespace: app}}
spec:
  hosts: [api.tls.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints: [{{address: 127.{net}.9.8, labels: {{istio.io/dataplane-mode: none}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tls, namespace: app}}
spec:
  host: api.tls.test
  trafficPolicy: {{tls: {{mode: SIMPLE}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: app}}
spec:
  hosts: [echo.app.svc.cluster.local]
  http:
  - match: [{{uri: {{prefix: /shadow-none}}}}]
    mirror: {{host: ranges.external.test, port: {{number: 8080}}}}
    route: [{{destination: {{host: echo.app.svc.cluster.local}}}}]
  - match: [{{uri: {{prefix: /shadow-out}}}}]
    mirror: {{host: api.external.test}}
    route: [{{destination: {{host: echo.app.svc.cluster.local}}}}]
  - match: [{{uri: {{prefix: /shadow-named}}}}]
    mirror: {{host: api.named.test}}
    route: [{{destination: {{host: echo.app.svc.cluster.local}}}}]
  - match: [{{uri: {{prefix: /shadow-grpc}}}}]
    mirror: {{host: api.grpc.test}}
    route: [{{destination: {{host: echo.app.svc.cluster.local}}}}]
  - match: [{{uri: {{prefix: /shadow-tls}}}}]
    mirror: {{host: api.tls.test}}
    route: [{{destination: {{host: echo.app.svc.cluster.local}}}}]
"#
    );
    let mesh = Mesh::start(net, &config).await;
    for (ip, port, name) in [
        (mesh.ip("9.1"), 8080, "external"),
        (mesh.ip("9.5"), 8080, "dialled"),
        (mesh.ip("9.6"), 8080, "selected"),
        (mesh.ip("9.8"), 8080, "in the clear"),
        (IpAddr::from([127, 0, 0, 1]), MIRROR_NAMED_PORT, "named"),
    ] {
        let listener = TcpListener::bind((ip, port)).await.expect("bind");
        tokio::spawn(support::echo(listener, name, mesh.seen.clone()));
    }
    let grpc = TcpListener::bind((mesh.ip("9.7"), 8080))
        .await
        .expect("bind");
    tokio::spawn(h2c(grpc, "grpc", mesh.seen.clone()));

    // Sent first, so that had they gone anywhere they would be there by the time the others are.
    let r = mesh.request("POST", "/shadow-none", &[], "none").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = mesh.request("POST", "/shadow-tls", &[], "secret").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A GET's body is mirrored too.
    let r = mesh.request("GET", "/shadow-out", &[], "get body").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = mesh.request("POST", "/shadow-named", &[], "by name").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = mesh.request("POST", "/shadow-grpc", &[], "over h2").await;
    assert_eq!(r.status, 200, "{}", r.body);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let arrived = |backend: &str, path: &str| {
        mesh.seen_by(backend)
            .iter()
            .find(|s| s.path == path)
            .map(|s| (s.host.clone(), s.body.clone()))
    };
    let (out, named, grpc) = loop {
        match (
            arrived("external", "/shadow-out"),
            arrived("named", "/shadow-named"),
            arrived("grpc", "/shadow-grpc"),
        ) {
            (Some(out), Some(named), Some(grpc)) => break (out, named, grpc),
            missing => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "mirrors never arrived: {missing:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let shadow = "echo.app.svc.cluster.local-shadow:80".to_owned();
    assert_eq!(out, (shadow.clone(), "get body".to_owned()));
    assert_eq!(named, (shadow.clone(), "by name".to_owned()));
    assert_eq!(
        grpc,
        (
            "echo.app.svc.cluster.local-shadow:80".to_owned(),
            "over h2".to_owned()
        ),
        "the :authority and the body, over HTTP/2"
    );
    // Nothing else had a mirror: not the NONE entry's endpoint or address, nor the echo
    // service the request was sent to, nor the endpoint that expects TLS.
    let mirrored: std::collections::BTreeSet<String> = (mesh.seen.lock().unwrap().iter())
        .filter(|s| s.host.contains("-shadow"))
        .map(|s| s.backend.clone())
        .collect();
    assert_eq!(
        mirrored,
        ["external", "grpc", "named"].map(str::to_owned).into(),
        "what had a mirror"
    );
    assert!(mesh.seen_by("in the clear").is_empty());
    mesh.shutdown().await;
}

/// Where the mirror test's `localhost` backend listens.
const MIRROR_NAMED_PORT: u16 = 18088;

/// A server speaking HTTP/2 in the clear with prior knowledge, as gRPC servers do and nothing
/// else: each request recorded (`host` is its `:authority`) and answered 200.
async fn h2c(
    listener: TcpListener,
    name: &'static str,
    seen: std::sync::Arc<std::sync::Mutex<Vec<support::Seen>>>,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok(mut connection) = h2::server::handshake(tcp).await else {
                return;
            };
            // The connection is driven by accepting; each request is read in its own task.
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let (head, mut body) = request.into_parts();
                    let mut got = Vec::new();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        got.extend_from_slice(&chunk);
                    }
                    seen.lock().unwrap().push(support::Seen {
                        backend: name.to_owned(),
                        method: head.method.to_string(),
                        path: head.uri.path().to_owned(),
                        host: (head.uri.authority()).map_or(String::new(), |a| a.to_string()),
                        body: String::from_utf8_lossy(&got).into_owned(),
                    });
                    let _ = respond.send_response(http::Response::new(()), true);
                });
            }
        });
    }
}
