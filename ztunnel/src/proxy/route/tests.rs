use std::net::SocketAddr;

use mesh::{Options, Snapshot};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

/// Two nodes; `bookinfo` is ambient; `reviews` has a service waypoint; `ratings` does not;
/// `db` pods have a workload waypoint; `legacy` is not captured; `ext` is a ServiceEntry.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: db-waypoint, namespace: bookinfo, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: bookinfo, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {serviceAccountName: waypoint}
status: {podIP: 10.0.0.100}
---
apiVersion: v1
kind: Pod
metadata: {name: db-waypoint, namespace: bookinfo, labels: {gateway.networking.k8s.io/gateway-name: db-waypoint}}
spec: {serviceAccountName: db-waypoint}
status: {podIP: 10.0.0.101}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{port: 9080, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec: {clusterIP: 10.96.0.30, selector: {app: ratings}, ports: [{port: 9080, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: bookinfo}
spec: {clusterIP: 10.96.0.40, selector: {app: nothing}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: warming, namespace: bookinfo}
spec: {clusterIP: 10.96.0.50, selector: {app: warming}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: warming-peers, namespace: bookinfo}
spec: {clusterIP: 10.96.0.51, publishNotReadyAddresses: true, selector: {app: warming}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: warming, namespace: bookinfo, labels: {app: warming}}
spec: {serviceAccountName: warming}
status: {podIP: 10.0.0.6, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bookinfo, labels: {app: client}}
spec: {serviceAccountName: client}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews, namespace: bookinfo, labels: {app: reviews}}
spec: {serviceAccountName: reviews}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-1, namespace: bookinfo, labels: {app: ratings}}
spec:
  serviceAccountName: ratings
  containers: [{name: app, ports: [{name: http, containerPort: 7001}]}]
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-2, namespace: bookinfo, labels: {app: ratings}}
spec:
  serviceAccountName: ratings
  containers: [{name: app, ports: [{name: http, containerPort: 7002}]}]
status: {podIP: 10.0.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: bookinfo, labels: {app: db, istio.io/use-waypoint: db-waypoint}}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: local, namespace: bookinfo}
status: {podIP: 127.10.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: legacy, labels: {app: legacy}}
status: {podIP: 10.0.9.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: two-vips, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [two-vips.example.com]
  addresses: [240.0.0.1, 240.0.0.2]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.7.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: far, namespace: bookinfo}
spec:
  hosts: [far.example.com]
  addresses: [240.0.1.1]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.9.0.1, network: west}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: bookinfo}
spec:
  hosts: [httpbin.org]
  addresses: [240.0.2.1, "2001:db8::2:1"]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: bookinfo}
spec:
  hosts: [partner.example.com]
  addresses: [192.0.2.44]
  ports: [{number: 443, name: tls, protocol: TLS}]
  workloadSelector: {labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: audited, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [audited.example.com]
  addresses: [192.0.2.45]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shared, namespace: bookinfo}
spec:
  hosts: [shared.bookinfo.example.com]
  addresses: [192.0.2.50]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shared, namespace: legacy}
spec:
  hosts: [shared.legacy.example.com]
  addresses: [192.0.2.50]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: legacy}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: nameonly, namespace: bookinfo}
spec:
  hosts: [nameonly.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: nameonly-waypoint, namespace: bookinfo, labels: {istio.io/use-waypoint: waypoint}}
spec:
  hosts: [nameonly-waypoint.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
"#;

fn snapshot() -> Snapshot {
    Snapshot::from_yaml("route-test.yaml", MESH, &Options::default()).expect("valid test mesh")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn workload<'a>(s: &'a Snapshot, ip: &str) -> &'a Workload {
    s.workload_by_ip("", ip.parse().expect("ip"))
        .expect("workload")
}

/// The decision for `from` → `dst`, summarised as (kind, next hop or address, authority,
/// expected identity).
fn decide(s: &Snapshot, from: &str, dst: Destination<'_>) -> (String, String, String, String) {
    let mut rng = StdRng::seed_from_u64(7);
    let decided = match route(s, workload(s, from), dst, &mut rng) {
        Ok(decided) => decided,
        Err(Lookup { host, port }) => {
            return (
                "lookup".into(),
                format!("{host}:{port}"),
                String::new(),
                String::new(),
            );
        }
    };
    match decided {
        Route::Direct {
            next_hop,
            authority,
            identities,
            ..
        } => (
            "direct".into(),
            next_hop.to_string(),
            authority.to_string(),
            identities[0].service_account().into(),
        ),
        Route::ViaWaypoint {
            next_hop,
            authority,
            identities,
            ..
        } => (
            "waypoint".into(),
            next_hop.to_string(),
            authority.to_string(),
            identities[0].service_account().into(),
        ),
        Route::Passthrough { addr, .. } => (
            "passthrough".into(),
            addr.to_string(),
            String::new(),
            String::new(),
        ),
        Route::Resolve { host, port, v6, .. } => (
            "resolve".into(),
            format!("{host}:{port}"),
            if v6 { "v6" } else { "v4" }.into(),
            String::new(),
        ),
        Route::Refuse(why) => (
            "refuse".into(),
            why.to_string(),
            String::new(),
            String::new(),
        ),
    }
}

#[test]
fn decisions() {
    let s = snapshot();
    let t = |kind: &str, hop: &str, authority: &str, id: &str| {
        (
            kind.to_owned(),
            hop.to_owned(),
            authority.to_owned(),
            id.to_owned(),
        )
    };
    let cases = [
        (
            "service with a waypoint: to the waypoint with the VIP as authority",
            "10.0.0.1",
            Destination::Addr(addr("10.96.0.20:9080")),
            t(
                "waypoint",
                "10.0.0.100:15008",
                "10.96.0.20:9080",
                "waypoint",
            ),
        ),
        (
            "the same service by hostname through SOCKS5",
            "10.0.0.1",
            Destination::Host("reviews.bookinfo.svc.cluster.local", 9080),
            t(
                "waypoint",
                "10.0.0.100:15008",
                "10.96.0.20:9080",
                "waypoint",
            ),
        ),
        (
            "the waypoint itself goes straight to the endpoint and its target port",
            "10.0.0.100",
            Destination::Addr(addr("10.96.0.20:9080")),
            t("direct", "10.0.0.2:15008", "10.0.0.2:8080", "reviews"),
        ),
        (
            "pod IP of a service-waypoint workload: direct (service waypoints see VIP traffic)",
            "10.0.0.1",
            Destination::Addr(addr("10.0.0.2:8080")),
            t("direct", "10.0.0.2:15008", "10.0.0.2:8080", "reviews"),
        ),
        (
            "workload waypoint: pod IP traffic goes to it, authority stays the pod address",
            "10.0.0.1",
            Destination::Addr(addr("10.0.0.5:5432")),
            t(
                "waypoint",
                "10.0.0.101:15008",
                "10.0.0.5:5432",
                "db-waypoint",
            ),
        ),
        (
            "the workload waypoint itself reaches the pod directly",
            "10.0.0.101",
            Destination::Addr(addr("10.0.0.5:5432")),
            t("direct", "10.0.0.5:15008", "10.0.0.5:5432", "default"),
        ),
        (
            "uncaptured workload: plain TCP",
            "10.0.0.1",
            Destination::Addr(addr("10.0.9.1:80")),
            t("passthrough", "10.0.9.1:80", "", ""),
        ),
        (
            "outside the mesh: plain TCP to the original destination",
            "10.0.0.1",
            Destination::Addr(addr("192.0.2.10:443")),
            t("passthrough", "192.0.2.10:443", "", ""),
        ),
        (
            "short hostname resolves in the caller's namespace",
            "10.0.0.1",
            Destination::Host("ratings", 9080),
            t("direct", "10.0.0.4:15008", "10.0.0.4:7002", "ratings"),
        ),
        (
            "self call to ztunnel's outbound port",
            "10.0.0.1",
            Destination::Addr(addr("10.0.0.1:15001")),
            t(
                "refuse",
                "connection to ztunnel's own port 15001 would loop",
                "",
                "",
            ),
        ),
        (
            "self call to ztunnel's HBONE port on loopback",
            "10.0.0.1",
            Destination::Addr(addr("127.0.0.1:15008")),
            t(
                "refuse",
                "connection to ztunnel's own port 15008 would loop",
                "",
                "",
            ),
        ),
        (
            "self call to ztunnel's SOCKS5 port on IPv6 loopback",
            "10.0.0.1",
            Destination::Addr(addr("[::1]:15080")),
            t(
                "refuse",
                "connection to ztunnel's own port 15080 would loop",
                "",
                "",
            ),
        ),
        (
            "self call to ztunnel's HBONE port on IPv4-mapped loopback",
            "10.0.0.1",
            Destination::Addr(addr("[::ffff:127.0.0.1]:15008")),
            t(
                "refuse",
                "connection to ztunnel's own port 15008 would loop",
                "",
                "",
            ),
        ),
        (
            "a workload's own loopback address (the local mesh's) is not the caller's ztunnel",
            "10.0.0.1",
            Destination::Addr(addr("127.10.0.1:15008")),
            t("direct", "127.10.0.1:15008", "127.10.0.1:15008", "default"),
        ),
        (
            "an application's own port on loopback is its own business",
            "10.0.0.1",
            Destination::Addr(addr("127.0.0.1:8080")),
            t("passthrough", "127.0.0.1:8080", "", ""),
        ),
        (
            "a ServiceEntry resolved NONE (by default): to the address dialled, though it selects pods",
            "10.0.0.1",
            Destination::Addr(addr("192.0.2.44:443")),
            t("passthrough", "192.0.2.44:443", "", ""),
        ),
        (
            "the same by hostname through SOCKS5: to its address",
            "10.0.0.1",
            Destination::Host("partner.example.com", 443),
            t("passthrough", "192.0.2.44:443", "", ""),
        ),
        (
            "resolved NONE behind a waypoint: the waypoint still comes first",
            "10.0.0.1",
            Destination::Addr(addr("192.0.2.45:443")),
            t("waypoint", "10.0.0.100:15008", "192.0.2.45:443", "waypoint"),
        ),
        (
            "a VIP two namespaces declare: the caller's namespace's service (passed through)",
            "10.0.0.1",
            Destination::Addr(addr("192.0.2.50:80")),
            t("passthrough", "192.0.2.50:80", "", ""),
        ),
        (
            "the same VIP from the other namespace: its own service (an uncaptured endpoint)",
            "10.0.9.1",
            Destination::Addr(addr("192.0.2.50:80")),
            t("passthrough", "10.0.9.1:80", "", ""),
        ),
        (
            "resolved NONE with no address, by name: the name is looked up",
            "10.0.0.1",
            Destination::Host("nameonly.example.com", 443),
            t("lookup", "nameonly.example.com:443", "", ""),
        ),
        (
            "the same behind a waypoint: no address to carry to it",
            "10.0.0.1",
            Destination::Host("nameonly-waypoint.example.com", 443),
            t(
                "refuse",
                "service nameonly-waypoint.example.com has no VIP to send to its waypoint",
                "",
                "",
            ),
        ),
        (
            "the same from its waypoint: the name is looked up",
            "10.0.0.100",
            Destination::Host("nameonly-waypoint.example.com", 443),
            t("lookup", "nameonly-waypoint.example.com:443", "", ""),
        ),
        (
            "unknown hostname",
            "10.0.0.1",
            Destination::Host("nope.example", 80),
            t("lookup", "nope.example:80", "", ""),
        ),
        (
            "unknown service port",
            "10.0.0.1",
            Destination::Addr(addr("10.96.0.30:1234")),
            t(
                "refuse",
                "service ratings.bookinfo.svc.cluster.local has no port 1234",
                "",
                "",
            ),
        ),
        (
            "a service with two VIPs: its waypoint sees the one dialled",
            "10.0.0.1",
            Destination::Addr(addr("240.0.0.2:80")),
            t("waypoint", "10.0.0.100:15008", "240.0.0.2:80", "waypoint"),
        ),
        (
            "endpoints on another network only: none this ztunnel can reach",
            "10.0.0.1",
            Destination::Addr(addr("240.0.1.1:80")),
            t(
                "refuse",
                "service far.example.com has no healthy endpoint",
                "",
                "",
            ),
        ),
        (
            "a ServiceEntry resolved by DNS: its host, to be resolved, on the target port",
            "10.0.0.1",
            Destination::Addr(addr("240.0.2.1:80")),
            t("resolve", "httpbin.org:8080", "v4", ""),
        ),
        (
            "the same dialled on its IPv6 VIP: IPv6 addresses preferred",
            "10.0.0.1",
            Destination::Addr(addr("[2001:db8::2:1]:80")),
            t("resolve", "httpbin.org:8080", "v6", ""),
        ),
        (
            "the same by hostname through SOCKS5",
            "10.0.0.1",
            Destination::Host("httpbin.org", 80),
            t("resolve", "httpbin.org:8080", "v4", ""),
        ),
        (
            "no endpoints",
            "10.0.0.1",
            Destination::Addr(addr("10.96.0.40:80")),
            t(
                "refuse",
                "service empty.bookinfo.svc.cluster.local has no healthy endpoint",
                "",
                "",
            ),
        ),
        (
            "only endpoint not ready",
            "10.0.0.1",
            Destination::Addr(addr("10.96.0.50:80")),
            t(
                "refuse",
                "service warming.bookinfo.svc.cluster.local has no healthy endpoint",
                "",
                "",
            ),
        ),
        (
            "the same endpoint, of a service publishing not-ready addresses",
            "10.0.0.1",
            Destination::Addr(addr("10.96.0.51:80")),
            t("direct", "10.0.0.6:15008", "10.0.0.6:80", "warming"),
        ),
    ];
    for (what, from, dst, want) in cases {
        assert_eq!(decide(&s, from, dst), want, "{what}");
    }
}

#[test]
fn endpoints_are_chosen_with_named_ports_and_spread() {
    let s = snapshot();
    let client = workload(&s, "10.0.0.1");
    let mut rng = StdRng::seed_from_u64(1);
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..1000 {
        match route_addr(&s, client, addr("10.96.0.30:9080"), &mut rng) {
            Route::Direct { authority, .. } => *seen.entry(authority.to_string()).or_insert(0) += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let counts: Vec<_> = seen.iter().collect();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(
        seen["10.0.0.3:7001"] > 400 && seen["10.0.0.4:7002"] > 400,
        "{counts:?}"
    );
}

/// Three nodes: `a1` and `a2` in zone `a` (subzones 1 and 2), `b1` in zone `b`, all in region
/// `r`; a client on `a1`; one `near` endpoint per node, and services over them that differ only
/// in how they prefer near endpoints.
const ZONED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata:
  name: a1
  labels: {topology.kubernetes.io/region: r, topology.kubernetes.io/zone: a, topology.istio.io/subzone: "1"}
---
apiVersion: v1
kind: Node
metadata:
  name: a2
  labels: {topology.kubernetes.io/region: r, topology.kubernetes.io/zone: a, topology.istio.io/subzone: "2"}
---
apiVersion: v1
kind: Node
metadata:
  name: b1
  labels: {topology.kubernetes.io/region: r, topology.kubernetes.io/zone: b}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: a1}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-a1, namespace: shop, labels: {app: cart}}
spec: {nodeName: a1}
status: {podIP: 10.1.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-a2, namespace: shop, labels: {app: cart}}
spec: {nodeName: a2}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-b1, namespace: shop, labels: {app: cart}}
spec: {nodeName: b1}
status: {podIP: 10.1.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: pay-b1, namespace: shop, labels: {app: pay}}
spec: {nodeName: b1}
status: {podIP: 10.1.2.1}
---
apiVersion: v1
kind: Service
metadata: {name: any, namespace: shop}
spec: {clusterIP: 10.96.1.1, selector: {app: cart}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: zone, namespace: shop}
spec: {clusterIP: 10.96.1.2, selector: {app: cart}, ports: [{port: 80}], trafficDistribution: PreferClose}
---
apiVersion: v1
kind: Service
metadata: {name: node, namespace: shop}
spec: {clusterIP: 10.96.1.3, selector: {app: cart}, ports: [{port: 80}], trafficDistribution: PreferSameNode}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: shop}
spec: {clusterIP: 10.96.1.4, selector: {app: cart}, ports: [{port: 80}], internalTrafficPolicy: Local}
---
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: shop, annotations: {networking.istio.io/traffic-distribution: PreferClose}}
spec: {clusterIP: 10.96.1.5, selector: {app: pay}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: pay-local, namespace: shop}
spec: {clusterIP: 10.96.1.6, selector: {app: pay}, ports: [{port: 80}], internalTrafficPolicy: Local}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-a2, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: a2, serviceAccountName: wp}
status: {podIP: 10.1.3.1}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-b1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: b1, serviceAccountName: wp}
status: {podIP: 10.1.3.2}
---
apiVersion: v1
kind: Service
metadata: {name: bound, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.1.7, selector: {app: cart}, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp-any, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: wp-any, namespace: shop}
spec: {clusterIP: 10.96.1.8, selector: {gateway.networking.k8s.io/gateway-name: wp-any}, ports: [{port: 15008}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-any-a2, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp-any}}
spec: {nodeName: a2, serviceAccountName: wp}
status: {podIP: 10.1.4.1}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-any-b1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp-any}}
spec: {nodeName: b1, serviceAccountName: wp}
status: {podIP: 10.1.4.2}
---
apiVersion: v1
kind: Service
metadata: {name: bound-any, namespace: shop, labels: {istio.io/use-waypoint: wp-any}}
spec: {clusterIP: 10.96.1.9, selector: {app: cart}, ports: [{port: 80}]}
"#;

/// The endpoints (or waypoint instances) 300 connections from the client to `vip` reach, as a
/// set, or the refusal.
fn reached(s: &Snapshot, vip: &str) -> Result<std::collections::BTreeSet<String>, String> {
    let client = s
        .workload_by_ip("", "10.1.0.1".parse().expect("ip"))
        .expect("client");
    let mut rng = StdRng::seed_from_u64(3);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        match route_addr(s, client, addr(vip), &mut rng) {
            Route::Direct { authority, .. } => seen.insert(authority.ip().to_string()),
            Route::ViaWaypoint { next_hop, .. } => seen.insert(next_hop.ip().to_string()),
            Route::Refuse(why) => return Err(why.to_string()),
            other => panic!("unexpected {other:?}"),
        };
    }
    Ok(seen)
}

#[test]
fn services_that_prefer_near_endpoints_pick_the_nearest() {
    let s = Snapshot::from_yaml("zoned.yaml", ZONED, &Options::default()).expect("valid mesh");
    let set = |ips: &[&str]| Ok(ips.iter().map(|&ip| ip.to_owned()).collect());
    let cases = [
        (
            "no preference: every endpoint",
            "10.96.1.1:80",
            set(&["10.1.1.1", "10.1.1.2", "10.1.1.3"]),
        ),
        (
            "PreferClose: the client's zone, both subzones",
            "10.96.1.2:80",
            set(&["10.1.1.1", "10.1.1.2"]),
        ),
        (
            "PreferSameNode: the client's node",
            "10.96.1.3:80",
            set(&["10.1.1.1"]),
        ),
        (
            "internalTrafficPolicy Local: the client's node",
            "10.96.1.4:80",
            set(&["10.1.1.1"]),
        ),
        (
            "the annotation; nothing near: fails over to another zone",
            "10.96.1.5:80",
            set(&["10.1.2.1"]),
        ),
    ];
    for (what, vip, want) in cases {
        assert_eq!(reached(&s, vip), want, "{what}");
    }
    let refused = reached(&s, "10.96.1.6:80").expect_err("Local with no endpoint on the node");
    assert!(refused.contains("pay-local"), "{refused}");
}

#[test]
fn waypoint_instances_in_the_callers_zone_are_preferred_as_istio_generates_them() {
    let s = Snapshot::from_yaml("zoned.yaml", ZONED, &Options::default()).expect("valid mesh");
    let set = |ips: &[&str]| Ok(ips.iter().map(|&ip| ip.to_owned()).collect());
    assert_eq!(
        reached(&s, "10.96.1.7:80"),
        set(&["10.1.3.1"]),
        "a waypoint with no Service described gets Istio's PreferClose"
    );
    assert_eq!(
        reached(&s, "10.96.1.9:80"),
        set(&["10.1.4.1", "10.1.4.2"]),
        "a waypoint's own Service, as written, decides"
    );
}
