//! The lookups proxies make per connection and per request allocate nothing: jemalloc's
//! per-thread allocation counter is read around each lookup.

mod support;

use std::net::IpAddr;

use mesh::authz::{Attributes, HttpAttributes, evaluate};
use support::{BOOKINFO, snapshot};
use tikv_jemalloc_ctl::thread::allocatedp;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes this thread allocated while running `f`.
fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let counter = allocatedp::read().expect("jemalloc thread counter");
    let before = counter.get();
    let out = std::hint::black_box(f());
    (out, counter.get() - before)
}

const POLICIES: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  exportTo: [bookinfo, legacy]
  http: [{route: [{destination: {host: reviews}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: bookinfo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"], ports: ["9999"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-bookinfo, namespace: bookinfo}
spec:
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bookinfo/*"], ipBlocks: [10.0.0.0/8]}}]
    when: [{key: "request.headers[x-user]", notValues: [blocked]}]
  - from: [{source: {namespaces: [bookinfo]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{to: [{operation: {methods: [GET], hosts: ["reviews*"]}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: productpage, namespace: bookinfo}
spec: {host: productpage}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: external, namespace: istio-system}
spec: {host: "*.example.com"}
"#;

#[test]
fn lookups_and_evaluation_do_not_allocate() {
    let s = snapshot(&format!("{BOOKINFO}{POLICIES}"));
    let pod: IpAddr = "10.0.1.2".parse().expect("ip");
    let vip: IpAddr = "10.96.0.20".parse().expect("ip");
    let source = s
        .workload_by_ip("", "10.0.1.1".parse().expect("ip"))
        .expect("productpage")
        .identity
        .clone();
    let headers = http::HeaderMap::new();

    let (w, n) = allocations(|| s.workload_by_ip("", pod));
    let w = w.expect("workload");
    assert_eq!(n, 0, "workload_by_ip");
    let (found, n) = allocations(|| s.service_by_vip(vip).map(|(id, _)| id));
    assert_eq!(n, 0, "service_by_vip");
    let id = found.expect("service");
    let (found, n) = allocations(|| s.service_by_vip_from(vip, "legacy").map(|(id, _)| id));
    assert_eq!(n, 0, "service_by_vip_from");
    assert_eq!(
        found.map(|id| s.service(id).name.clone()),
        Some("reviews".into())
    );
    let (found, n) = allocations(|| s.service_by_vip_port(vip, 9080).map(|(_, _, i)| i));
    assert_eq!((found, n), (Some(0), 0), "service_by_vip_port");
    assert!(s.service_by_vip_port(vip, 1).is_none());
    let (_, n) = allocations(|| s.resolve_host("reviews.bookinfo.svc.cluster.local", "legacy"));
    assert_eq!(n, 0, "resolve_host fqdn");
    let (_, n) = allocations(|| s.resolve_host("reviews", "bookinfo"));
    assert_eq!(n, 0, "resolve_host short");
    // No rule names the host: all three steps, every wildcard it could match in each, are tried.
    let (found, n) = allocations(|| s.destination_rule("bookinfo", s.service(id)).is_some());
    assert_eq!((found, n), (false, 0), "destination_rule");
    let (found, n) = allocations(|| {
        s.workload_by_uid("Kubernetes//Pod/bookinfo/reviews-v1")
            .is_some()
    });
    assert_eq!((found, n), (true, 0), "workload_by_uid");
    let (count, n) = allocations(|| s.workloads_on_node("node-a").count());
    assert_eq!((count, n), (3, 0), "workloads_on_node");
    let service = s.service(id);
    let (count, n) = allocations(|| service.subset_endpoints(None).map(|e| e.iter().count()));
    assert_eq!((count, n), (Some(2), 0), "endpoints");
    let (_, n) = allocations(|| s.service_waypoint(service).map(|w| w.instances.len()));
    assert_eq!(n, 0, "service_waypoint");
    for proxy in ["bookinfo", "legacy", "elsewhere"] {
        let (found, n) = allocations(|| s.routes(proxy, id, 9080).is_some());
        assert_eq!((found, n), (proxy != "elsewhere", 0), "routes at {proxy}");
    }

    let attrs = Attributes {
        source: Some(&source),
        source_ip: "10.0.1.1".parse().expect("ip"),
        remote_ip: "10.0.1.1".parse().expect("ip"),
        destination_ip: pod,
        destination_port: 8080,
        sni: None,
        http: None,
    };
    let (allowed, n) = allocations(|| evaluate(s.ztunnel_policies(w), &attrs).allowed);
    assert!(allowed);
    assert_eq!(n, 0, "L4 evaluation");

    let (_, wp) = s
        .waypoint_by_name("bookinfo", "waypoint")
        .expect("waypoint");
    let l7 = Attributes {
        http: Some(HttpAttributes {
            method: "GET",
            path: "/reviews/1?full=true",
            host: "reviews.bookinfo:9080",
            headers: &headers,
        }),
        ..attrs
    };
    let (allowed, n) =
        allocations(|| evaluate(s.waypoint_policies(wp, Some(service)), &l7).allowed);
    assert!(allowed);
    assert_eq!(n, 0, "L7 evaluation");
    let (count, n) = allocations(|| s.waypoint_plugins(wp, Some(service)).count());
    assert_eq!((count, n), (0, 0), "plugins");
    let (_, n) = allocations(|| s.mtls_mode(w, 8080));
    assert_eq!(n, 0, "mtls_mode");
}
