//! Routes and destination rules through the snapshot: attachment to service ports, subsets
//! resolved to endpoints, selection of a request, and the semantic errors a load reports.

mod support;

use std::net::IpAddr;

use http::{HeaderMap, Method};
use mesh::route::{RequestView, RuleAction};
use support::{BOOKINFO, problems, snapshot};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

const REVIEWS_SPLIT: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
"#;

fn request<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
    RequestView {
        method: &Method::GET,
        scheme: "http",
        path,
        authority: "reviews:9080",
        headers,
        port: 9080,
        source_namespace: Some("bookinfo"),
    }
}

fn backends(action: &RuleAction) -> Vec<(String, Option<String>, u32)> {
    match action {
        RuleAction::Forward(backends) => backends
            .iter()
            .map(|b| {
                (
                    b.backend.service.to_string(),
                    b.backend.subset.as_deref().map(str::to_owned),
                    b.weight,
                )
            })
            .collect(),
        other => panic!("not a forward: {other:?}"),
    }
}

#[test]
fn virtual_service_and_subsets() {
    let s = snapshot(&format!("{BOOKINFO}{REVIEWS_SPLIT}"));
    let (id, reviews) = s.service_by_vip(ip("10.96.0.20")).expect("reviews");
    let (rule, _) = (s.destination_rule("bookinfo", reviews)).expect("a rule");
    let names = |subset: Option<&str>| -> Vec<String> {
        reviews
            .subset_endpoints(subset.map(|name| (rule, name)))
            .expect("known subset")
            .iter()
            .map(|e| s.workload(e.workload).name.to_string())
            .collect()
    };
    assert_eq!(names(Some("v2")), ["reviews-v2"]);
    assert_eq!(names(Some("v1")), ["reviews-v1"]);
    assert!(names(Some("v3")).is_empty(), "v3's only pod is not ready");
    assert!(reviews.subset_endpoints(Some((rule, "v9"))).is_none());

    let table = s.routes("bookinfo", id, 9080).expect("routes attached");
    let mut jason = HeaderMap::new();
    jason.insert("end-user", "jason".parse().expect("value"));
    let (rule, _) = table.select(&request("/reviews/1", &jason)).expect("match");
    assert_eq!(
        backends(&rule.action),
        [(
            "reviews.bookinfo.svc.cluster.local".to_owned(),
            Some("v2".to_owned()),
            100
        )]
    );
    let (rule, _) = table
        .select(&request("/reviews/1", &HeaderMap::new()))
        .expect("match");
    assert_eq!(
        backends(&rule.action)
            .iter()
            .map(|b| (b.1.clone(), b.2))
            .collect::<Vec<_>>(),
        [(Some("v1".to_owned()), 80), (Some("v2".to_owned()), 20)]
    );
    let (product, _) = s.service_by_vip(ip("10.96.0.10")).expect("productpage");
    assert!(
        s.routes("bookinfo", product, 9080).is_none(),
        "no route attached"
    );
}

#[test]
fn http_route_attaches_per_port_and_wins_over_virtual_service() {
    let route = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: reviews, port: 9080}]
"#;
    let s = snapshot(&format!("{BOOKINFO}{REVIEWS_SPLIT}{route}"));
    let (id, _) = s.service_by_vip(ip("10.96.0.20")).expect("reviews");
    let table = s.routes("bookinfo", id, 9080).expect("attached");
    let headers = HeaderMap::new();
    assert!(table.select(&request("/v2/x", &headers)).is_some());
    assert!(
        table.select(&request("/other", &headers)).is_none(),
        "the HTTPRoute owns the port: no VirtualService catch-all, so the waypoint answers 404"
    );
}

/// A VirtualService for `reviews` in `namespace`, exported to `export_to`, sending everything
/// to `subset`.
fn to_subset(name: &str, namespace: &str, export_to: &str, subset: &str) -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [reviews.bookinfo.svc.cluster.local]
  exportTo: {export_to}
  http: [{{route: [{{destination: {{host: reviews.bookinfo.svc.cluster.local, subset: {subset}}}}}]}}]
"#
    )
}

#[test]
fn a_waypoint_applies_the_routes_of_its_services_namespace_and_its_own_as_exported() {
    let reviews_rule = REVIEWS_SPLIT
        .split("---\napiVersion: networking.istio.io/v1\nkind: VirtualService")
        .next()
        .expect("the DestinationRule");
    // Each namespace's waypoint: which subset the routes it applies send a request to.
    let subset_at = |yaml: &str, proxy: &str| {
        let s = snapshot(&format!("{BOOKINFO}{reviews_rule}{yaml}"));
        let (id, _) = s.service_by_vip(ip("10.96.0.20")).expect("reviews");
        let table = s.routes(proxy, id, 9080)?;
        let headers = HeaderMap::new();
        let (rule, _) = table.select(&request("/", &headers))?;
        backends(&rule.action)[0].1.clone()
    };
    let v = |s: &str| Some(s.to_owned());

    // The service's namespace's, exported everywhere (the default): every waypoint's.
    let own = to_subset("own", "bookinfo", "[]", "v1");
    for proxy in ["bookinfo", "legacy", "elsewhere"] {
        assert_eq!(subset_at(&own, proxy), v("v1"), "{proxy}");
    }
    // Kept to its namespace: only the waypoint there applies it.
    let private = to_subset("private", "bookinfo", "[\".\"]", "v1");
    assert_eq!(subset_at(&private, "bookinfo"), v("v1"));
    assert_eq!(subset_at(&private, "legacy"), None);
    // Exported by name.
    let named = to_subset("named", "bookinfo", "[legacy]", "v2");
    assert_eq!(subset_at(&named, "legacy"), v("v2"));
    assert_eq!(
        subset_at(&named, "bookinfo"),
        None,
        "not exported to its own namespace"
    );
    assert_eq!(subset_at(&named, "elsewhere"), None);
    // Another namespace's applies only at that namespace's waypoint, however widely it is
    // exported.
    let third = to_subset("third", "legacy", "[\"*\"]", "v3");
    assert_eq!(subset_at(&third, "legacy"), v("v3"));
    assert_eq!(
        subset_at(&third, "bookinfo"),
        None,
        "cannot reroute another namespace"
    );
    assert_eq!(subset_at(&third, "elsewhere"), None);
    // Where both apply, public ones keep their order (bookinfo's sorts first, and its catch-all
    // wins); one private to the waypoint's namespace comes before them.
    assert_eq!(subset_at(&format!("{own}{third}"), "legacy"), v("v1"));
    let kept = to_subset("third", "legacy", "[\".\"]", "v3");
    assert_eq!(subset_at(&format!("{own}{kept}"), "legacy"), v("v3"));
    // Exported by name comes before public, whatever the names; kept to its namespace by
    // naming it, before public there.
    let first = to_subset("a", "bookinfo", "[]", "v1");
    let named = to_subset("z", "bookinfo", "[legacy]", "v2");
    let both = format!("{first}{named}");
    assert_eq!(subset_at(&both, "legacy"), v("v2"));
    assert_eq!(subset_at(&both, "elsewhere"), v("v1"));
    let private = to_subset("z", "bookinfo", "[bookinfo]", "v2");
    let both = format!("{first}{private}");
    assert_eq!(subset_at(&both, "bookinfo"), v("v2"));
    assert_eq!(subset_at(&both, "elsewhere"), v("v1"));

    // An HTTPRoute in another namespace than its Service's (a consumer route) applies only at
    // its own namespace's waypoint.
    let consumer = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: legacy}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, namespace: bookinfo, port: 9080}]
  rules: [{backendRefs: [{name: reviews, namespace: bookinfo, port: 9080}]}]
"#;
    let s = snapshot(&format!("{BOOKINFO}{reviews_rule}{consumer}{own}"));
    let (id, _) = s.service_by_vip(ip("10.96.0.20")).expect("reviews");
    let headers = HeaderMap::new();
    let at = |proxy| {
        let table = s.routes(proxy, id, 9080).expect("a table");
        let (rule, _) = table.select(&request("/", &headers)).expect("a rule");
        backends(&rule.action)[0].1.clone()
    };
    assert_eq!(
        at("legacy"),
        None,
        "the HTTPRoute, with no subset, wins at its own waypoint"
    );
    assert_eq!(
        at("bookinfo"),
        v("v1"),
        "the service's own waypoint keeps the VirtualService"
    );

    // A consumer HTTPRoute comes before the producer's at the consumer's waypoint, however
    // specific the producer's match.
    let producer = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules: [{matches: [{path: {type: Exact, value: /}}], backendRefs: [{name: productpage, port: 9080}]}]
"#;
    let s = snapshot(&format!("{BOOKINFO}{reviews_rule}{consumer}{producer}"));
    let backend = |proxy| {
        let table = s.routes(proxy, id, 9080).expect("a table");
        let (rule, _) = table.select(&request("/", &headers)).expect("a rule");
        backends(&rule.action)[0].0.clone()
    };
    assert_eq!(backend("legacy"), "reviews.bookinfo.svc.cluster.local");
    assert_eq!(
        backend("bookinfo"),
        "productpage.bookinfo.svc.cluster.local"
    );
}

#[test]
fn semantic_errors_name_resource_and_field() {
    let cases = [
        (
            "a route to a service that does not exist",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: bookinfo}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: ratings, port: 9080}]}]
"#,
            "HTTPRoute bookinfo/r",
            "spec.rules[0].backendRefs[0].name",
        ),
        (
            "a subset that no DestinationRule defines",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: bookinfo}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v9}}]}]
"#,
            "VirtualService bookinfo/vs",
            "spec.http[0].route[0].destination.subset",
        ),
        (
            "weights that are all zero",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: zero, namespace: bookinfo}
spec:
  parentRefs: [{kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews, port: 9080, weight: 0}, {name: productpage, port: 9080, weight: 0}]}]
"#,
            "HTTPRoute bookinfo/zero",
            "spec.rules[0].backendRefs",
        ),
        (
            "a regex that does not compile",
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: re, namespace: bookinfo}
spec:
  hosts: [reviews]
  http: [{match: [{uri: {regex: "/reviews/(["}}], route: [{destination: {host: reviews}}]}]
"#,
            "VirtualService bookinfo/re",
            "spec.http[0].match[0].uri.regex",
        ),
        (
            "a policy with both selector and targetRefs",
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: both, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  targetRefs: [{kind: Service, group: "", name: reviews}]
"#,
            "AuthorizationPolicy bookinfo/both",
            "spec.targetRefs",
        ),
        (
            "a DestinationRule for a host that does not exist",
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dr, namespace: bookinfo}
spec: {host: nowhere}
"#,
            "DestinationRule bookinfo/dr",
            "spec.host",
        ),
    ];
    for (what, yaml, resource, field) in cases {
        let e = problems(&format!("{BOOKINFO}---\n{yaml}"));
        let found: Vec<_> = e
            .problems()
            .iter()
            .map(|p| {
                (
                    p.resource.as_str(),
                    p.error.field.as_str(),
                    p.error.message.as_str(),
                )
            })
            .collect();
        assert!(
            found.iter().any(|(r, f, _)| *r == resource && *f == field),
            "{what}: expected {resource} at {field}, got {found:?}"
        );
    }
}

/// Which DestinationRule applies depends on the proxy's namespace, as in istiod: the proxy's own
/// rules first (a wildcard covering every service it matches, unless a rule names the service),
/// then those the service's namespace exports, then the root namespace's; rules of one
/// namespace for one host merge; each proxy sees the subsets of the rule it applies.
#[test]
fn destination_rules_are_chosen_per_proxy_namespace() {
    let rules = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-wide, namespace: istio-system}
spec:
  host: "*.svc.cluster.local"
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 10}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bookinfo-wide, namespace: bookinfo}
spec:
  host: "*.bookinfo.svc.cluster.local"
  exportTo: ["."]
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 20}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: productpage, namespace: bookinfo}
spec:
  host: productpage
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 30}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-a, namespace: bookinfo}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-b, namespace: bookinfo}
spec:
  host: reviews.bookinfo.svc.cluster.local
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 50}}}
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: legacy}
spec:
  host: reviews.bookinfo.svc.cluster.local
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 40}}}
  subsets: [{name: v3, labels: {version: v3}}]
"#;
    let s = snapshot(&format!("{BOOKINFO}{rules}"));
    let id = |name: &str| {
        let host = format!("{name}.bookinfo.svc.cluster.local");
        s.service_by_host(&host).expect("service").0
    };
    let limit = |proxy: &str, service: &str| {
        s.destination_rule(proxy, s.service(id(service)))
            .map(|(_, p)| p.traffic.connection_pool.max_connections)
    };
    assert_eq!(limit("bookinfo", "productpage"), Some(30));
    assert_eq!(limit("bookinfo", "waypoint"), Some(20));
    assert_eq!(limit("bookinfo", "reviews"), Some(50), "merged");
    assert_eq!(limit("legacy", "reviews"), Some(40), "the proxy's own");
    assert_eq!(limit("legacy", "productpage"), Some(30), "exported");
    assert_eq!(limit("legacy", "waypoint"), Some(10), "private elsewhere");
    assert_eq!(limit("istio-system", "reviews"), Some(50));

    let reviews = s.service(id("reviews"));
    let subset = |proxy: &str, name: &str| {
        let (rule, _) = (s.destination_rule(proxy, reviews)).expect("a rule");
        let endpoints = reviews.subset_endpoints(Some((rule, name)))?;
        Some(
            endpoints
                .iter()
                .map(|e| &*s.workload(e.workload).name)
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(subset("bookinfo", "v1"), Some(vec!["reviews-v1"]));
    assert_eq!(subset("bookinfo", "v2"), Some(vec!["reviews-v2"]));
    assert_eq!(subset("bookinfo", "v3"), None);
    assert_eq!(
        subset("legacy", "v3"),
        Some(vec![]),
        "its only pod is not ready"
    );
    assert_eq!(subset("legacy", "v1"), None);
}
