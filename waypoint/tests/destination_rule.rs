//! DestinationRule load balancing and outlier detection, and services that prefer endpoints
//! near the waypoint, observed through the waypoint.

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
    // `/config_dump` shows the ejection, and for how long it lasts.
    let state = mesh.waypoint.as_ref().expect("waypoint").live_state()();
    let endpoints = state["endpoints"].as_array().expect("endpoints");
    let v1 = (endpoints.iter())
        .find(|e| {
            e["workload"]
                .as_str()
                .is_some_and(|w| w.contains("echo-v1"))
        })
        .unwrap_or_else(|| panic!("echo-v1 in {state}"));
    assert_eq!(v1["ejections"], 1, "{state}");
    let left = v1["ejectedForMs"].as_u64().expect("still ejected");
    assert!(left > 50_000 && left <= 60_000, "{state}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_hash_cookie_is_made_up_and_then_followed() {
    let mesh = Mesh::start(
        71,
        &rule(
            "{loadBalancer: {consistentHash: {httpCookie: {name: sticky, path: /, ttl: 3600s}}}}",
        ),
    )
    .await;
    // A client without the cookie is handed one, once.
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let set = r
        .header("set-cookie")
        .expect("a generated cookie")
        .to_owned();
    assert!(
        set.starts_with("sticky=\"") && set.ends_with("\"; Max-Age=3600; Path=/; HttpOnly"),
        "{set}"
    );
    let value = set.split(';').next().unwrap().to_owned();
    // Carrying it, the client stays on the endpoint that answered, and gets no new cookie.
    let home = r.backend().to_owned();
    for _ in 0..8 {
        let r = mesh.request("GET", "/", &[("cookie", &value)], "").await;
        assert_eq!(r.backend(), home, "{value}");
        assert!(r.header("set-cookie").is_none());
    }
    // Cookies spread clients over the endpoints.
    let mut used = BTreeSet::new();
    for n in 0..16 {
        let cookie = format!("sticky=\"client-{n}\"");
        used.insert(
            mesh.request("GET", "/", &[("cookie", &cookie)], "")
                .await
                .backend()
                .to_owned(),
        );
    }
    assert_eq!(used.len(), 2, "{used:?}");

    // ttl 0: a session cookie, without Max-Age.
    mesh.set_routes(&rule(
        "{loadBalancer: {consistentHash: {httpCookie: {name: sticky, ttl: 0s}}}}",
    ))
    .await;
    let r = mesh.request("GET", "/", &[], "").await;
    let set = r.header("set-cookie").expect("a generated cookie");
    assert!(
        set.ends_with("\"; HttpOnly") && !set.contains("Max-Age"),
        "{set}"
    );
    // Without a ttl no cookie is made up: requests without one spread like any other.
    mesh.set_routes(&rule(
        "{loadBalancer: {consistentHash: {httpCookie: {name: sticky}}}}",
    ))
    .await;
    let r = mesh.request("GET", "/", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.header("set-cookie").is_none());
    mesh.shutdown().await;
}

/// Nodes in zones, and `near`, the echo pods behind a service that prefers endpoints in the
/// waypoint's zone; `{b}` is node-b's zone.
fn zoned(net: u8, b: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Node
metadata: {{name: node-w, labels: {{topology.kubernetes.io/region: r, topology.kubernetes.io/zone: z2}}}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-a, labels: {{topology.kubernetes.io/region: r, topology.kubernetes.io/zone: z1}}}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-b, labels: {{topology.kubernetes.io/region: r, topology.kubernetes.io/zone: {b}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: near, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  clusterIP: 10.{net}.0.30
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: http}}]
  trafficDistribution: PreferSameZone
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_preferring_near_endpoints_is_served_from_the_waypoints_zone() {
    let net = 92;
    let mesh = Mesh::start(net, &zoned(net, "z2")).await;
    let vip = format!("10.{net}.0.30");
    // echo-v2's node shares the waypoint's zone; echo-v1's does not.
    assert_eq!(backends(&mesh, &vip, 20).await, only("echo-v2"));

    // node-b moves to a third zone: neither endpoint is near, and both serve.
    mesh.set_routes(&zoned(net, "z3")).await;
    assert_eq!(backends(&mesh, &vip, 40).await, both());
    mesh.shutdown().await;
}

/// The backends that answer `n` requests to `vip`:80.
async fn backends(mesh: &Mesh, vip: &str, n: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let r = mesh.request_to(vip, 80, "GET", "/", &[], "").await;
        seen.insert(r.expect("request").backend().to_owned());
    }
    seen
}

fn only(backend: &str) -> BTreeSet<String> {
    BTreeSet::from([backend.to_owned()])
}

fn both() -> BTreeSet<String> {
    BTreeSet::from(["echo-v1".to_owned(), "echo-v2".to_owned()])
}

/// Nodes in regions: the waypoint's `r1`, echo-v1's `r2` and echo-v2's `r3`; `rule` follows.
fn regions(rule: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Node
metadata: {{name: node-w, labels: {{topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: z1}}}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-a, labels: {{topology.kubernetes.io/region: r2, topology.kubernetes.io/zone: z1}}}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-b, labels: {{topology.kubernetes.io/region: r3, topology.kubernetes.io/zone: z1}}}}
---
{rule}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_failover_distribute_and_a_rules_setting_over_the_services_distribution() {
    let net = 99;
    let detecting =
        "{outlierDetection: {consecutive5xxErrors: 3}, loadBalancer: {localityLbSetting:";
    let failover_to = |region: &str| {
        regions(&rule(&format!(
            "{detecting} {{failover: [{{from: r0, to: r2}}, {{from: r1, to: {region}}}]}}}}}}"
        )))
    };
    let mesh = Mesh::start(net, &failover_to("r3")).await;
    let echo = format!("10.{net}.0.1");
    // Neither endpoint shares the waypoint's region; failover from r1 names r3, echo-v2's.
    assert_eq!(backends(&mesh, &echo, 20).await, only("echo-v2"));
    mesh.set_routes(&failover_to("r2")).await;
    assert_eq!(backends(&mesh, &echo, 20).await, only("echo-v1"));
    // Without an entry from r1, every other region is alike.
    mesh.set_routes(&regions(&rule(&format!(
        "{detecting} {{enabled: true}}}}}}"
    ))))
    .await;
    assert_eq!(backends(&mesh, &echo, 40).await, both());
    // distribute, without outlier detection: r2 takes all of r1's traffic, then half of it.
    let distribute = |to: &str| {
        regions(&rule(&format!(
            "{{loadBalancer: {{localityLbSetting: {{distribute: [{{from: r1, to: {to}}}]}}}}}}"
        )))
    };
    mesh.set_routes(&distribute("{r2: 100}")).await;
    assert_eq!(backends(&mesh, &echo, 20).await, only("echo-v1"));
    mesh.set_routes(&distribute("{r2: 50, r3: 50}")).await;
    assert_eq!(backends(&mesh, &echo, 40).await, both());

    // A service preferring the waypoint's zone is served from it, unless a rule of its own
    // sets localityLbSetting, which istiod takes over the service's traffic distribution.
    let near = format!("10.{net}.0.30");
    mesh.set_routes(&zoned(net, "z2")).await;
    assert_eq!(backends(&mesh, &near, 20).await, only("echo-v2"));
    let off = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: near, namespace: app}
spec:
  host: near.app.svc.cluster.local
  trafficPolicy: {loadBalancer: {localityLbSetting: {enabled: false}}}
"#;
    mesh.set_routes(&format!("{}{off}", zoned(net, "z2"))).await;
    assert_eq!(backends(&mesh, &near, 40).await, both());
    // A rule without the setting leaves the service's preference.
    let silent = off.replace(
        "{loadBalancer: {localityLbSetting: {enabled: false}}}",
        "{loadBalancer: {simple: RANDOM}}",
    );
    mesh.set_routes(&format!("{}{silent}", zoned(net, "z2")))
        .await;
    assert_eq!(backends(&mesh, &near, 20).await, only("echo-v2"));
    mesh.shutdown().await;
}

/// The waypoint's namespace's own rule for `billing`: its v2 is the v2 endpoint.
const OWN: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: billing, namespace: app}
spec:
  host: billing.other.test
  subsets: [{name: v2, labels: {version: v2}}]
"#;

/// A rule in the waypoint's namespace for `billing`, for the workloads `selector` selects,
/// whose v2 is the v1 endpoint.
fn selecting(selector: &str) -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: billing-selected, namespace: app}}
spec:
  host: billing.other.test
  workloadSelector: {{matchLabels: {selector}}}
  subsets: [{{name: v2, labels: {{version: v1}}}}]
"#
    )
}

/// `billing` in namespace `other`, outside the mesh at two addresses labelled v1 and v2; its
/// owner's rule (`other/billing`) defines subset v1 and pins subset v2 to the v1 endpoint,
/// exported as `export_to` says; `extra` adds rules. The echo service routes to subset v1 for
/// `x-subset: v1`, else v2.
fn cross_namespace(net: u8, export_to: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: other}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: billing, namespace: other}}
spec:
  hosts: [billing.other.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  endpoints:
  - {{address: 127.{net}.9.1, labels: {{version: v1, istio.io/dataplane-mode: none}}}}
  - {{address: 127.{net}.9.2, labels: {{version: v2, istio.io/dataplane-mode: none}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: billing, namespace: other}}
spec:
  host: billing.other.test
  exportTo: {export_to}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: app}}
spec:
  hosts: [echo]
  http:
  - match: [{{headers: {{x-subset: {{exact: v1}}}}}}]
    route: [{{destination: {{host: billing.other.test, subset: v1, port: {{number: 80}}}}}}]
  - route: [{{destination: {{host: billing.other.test, subset: v2, port: {{number: 80}}}}}}]
{extra}"#
    )
}

/// The waypoint applies the DestinationRule istiod would give a proxy in its namespace: its
/// namespace's own rule for a backend in another namespace first, else the rule the backend's
/// namespace exports to it; never a rule with a workloadSelector, even one selecting the
/// waypoint's pod; a subset only a rule it does not apply defines is answered 503, and such a
/// configuration still loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoints_namespace_decides_which_destination_rule_applies() {
    let net = 96;
    let mesh = Mesh::start(net, &cross_namespace(net, "['*']", OWN)).await;
    for (last, name) in [("9.1", "billing-v1"), ("9.2", "billing-v2")] {
        let l = tokio::net::TcpListener::bind((mesh.ip(last), 8080))
            .await
            .expect("bind");
        tokio::spawn(support::echo(l, name, mesh.seen.clone()));
    }
    let answer = |subset: &'static str| {
        let mesh = &mesh;
        async move {
            let r = mesh.request("GET", "/", &[("x-subset", subset)], "").await;
            match r.status {
                200 => r.backend().to_owned(),
                status => status.to_string(),
            }
        }
    };
    // The waypoint's own rule: its v2 is the v2 endpoint, and it defines no v1.
    assert_eq!(answer("v2").await, "billing-v2");
    assert_eq!(answer("v1").await, "503");
    // A rule with a workloadSelector is a sidecar's, even one selecting the waypoint's pod.
    let waypoint = selecting("{gateway.networking.k8s.io/gateway-name: waypoint}");
    let selected = format!("{OWN}{waypoint}");
    mesh.set_routes(&cross_namespace(net, "['*']", &selected))
        .await;
    assert_eq!(answer("v2").await, "billing-v2");
    // Without the waypoint's namespace's rules, the rule `other` exports to every namespace applies.
    mesh.set_routes(&cross_namespace(net, "['*']", "")).await;
    assert_eq!(answer("v2").await, "billing-v1");
    assert_eq!(answer("v1").await, "billing-v1");
    // Exported to `app` by name, the same.
    mesh.set_routes(&cross_namespace(net, "[app]", "")).await;
    assert_eq!(answer("v2").await, "billing-v1");
    // Kept to `other`: no rule applies here, so neither subset exists.
    mesh.set_routes(&cross_namespace(net, "['.']", "")).await;
    assert_eq!(answer("v2").await, "503");
    assert_eq!(answer("v1").await, "503");
    mesh.shutdown().await;
}
