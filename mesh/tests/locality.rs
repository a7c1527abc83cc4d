//! Localities and the services that prefer near endpoints, read from the YAML users write:
//! nodes' topology labels (never a pod's own `istio-locality`, which istiod does not send
//! ztunnel), WorkloadEntry and ServiceEntry endpoints' `locality`, and a Service's
//! `trafficDistribution`, Istio's annotation for it and `internalTrafficPolicy`.

mod support;

use std::net::IpAddr;

use mesh::Snapshot;
use mesh::model::locality::{Mode, Scope};
use mesh::model::{Locality, Workload};
use support::snapshot;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata:
  name: n1
  labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-a, topology.istio.io/subzone: rack-1}
spec: {podCIDR: 10.244.0.0/24}
status: {conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: on-node, namespace: shop, labels: {app: cart}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: own-label, namespace: shop, labels: {app: cart, istio-locality: us.us-b}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: unknown-node, namespace: shop, labels: {app: cart}}
spec: {nodeName: n9}
status: {podIP: 10.1.0.3}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: shop}
spec: {address: 10.1.0.4, locality: ap/ap-c/hall-2, labels: {app: cart}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop, annotations: {networking.istio.io/traffic-distribution: PreferSameNode}}
spec:
  hosts: [ext.example.com]
  addresses: [240.0.0.9]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.5, locality: sa/sa-a}]
---
apiVersion: v1
kind: Service
metadata: {name: zone, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: cart}, ports: [{port: 80}], trafficDistribution: PreferSameZone}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: shop}
spec:
  clusterIP: 10.96.0.2
  selector: {app: cart}
  ports: [{port: 80}]
  internalTrafficPolicy: Local
  trafficDistribution: PreferClose
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {app: cart}, ports: [{port: 80}], internalTrafficPolicy: Cluster}
---
apiVersion: v1
kind: Service
metadata: {name: typo, namespace: shop, annotations: {networking.istio.io/traffic-distribution: PreferNearby}}
spec: {clusterIP: 10.96.0.4, selector: {app: cart}, ports: [{port: 80}]}
"#;

fn at<'a>(s: &'a Snapshot, ip: &str) -> &'a Workload {
    s.workload_by_ip("", ip.parse::<IpAddr>().expect("ip"))
        .expect("workload")
}

fn parts(l: &Locality) -> (&str, &str, &str) {
    (&l.region, &l.zone, &l.subzone)
}

#[test]
fn workloads_take_their_nodes_locality_or_their_entrys() {
    let s = snapshot(MESH);
    assert_eq!(
        parts(&at(&s, "10.1.0.1").locality),
        ("eu", "eu-a", "rack-1")
    );
    assert_eq!(
        parts(&at(&s, "10.1.0.2").locality),
        ("eu", "eu-a", "rack-1"),
        "a pod's own istio-locality label is not read"
    );
    assert!(
        at(&s, "10.1.0.3").locality.is_empty(),
        "a node not described has no locality"
    );
    assert_eq!(
        parts(&at(&s, "10.1.0.4").locality),
        ("ap", "ap-c", "hall-2")
    );
    assert_eq!(parts(&at(&s, "10.1.0.5").locality), ("sa", "sa-a", ""));

    // Baggage carries region and zone, as upstream's `cloud.*` keys.
    let baggage = at(&s, "10.1.0.1").baggage("Kubernetes");
    assert_eq!(baggage.region.as_deref(), Some("eu"));
    assert_eq!(baggage.zone.as_deref(), Some("eu-a"));
    assert_eq!(at(&s, "10.1.0.3").baggage("Kubernetes").region, None);

    let dump = s.dump();
    let on_node = dump["workloads"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == "on-node"))
        .expect("dumped");
    assert_eq!(on_node["locality"]["zone"], "eu-a");
}

#[test]
fn waypoints_prefer_close_instances_unless_told_otherwise() {
    let gateways = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: generated, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: by-node, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  infrastructure: {annotations: {networking.istio.io/traffic-distribution: PreferSameNode}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: opted-out, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  infrastructure: {annotations: {networking.istio.io/traffic-distribution: Any}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: described, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: described, namespace: shop}
spec: {clusterIP: 10.96.0.9, ports: [{port: 15008}]}
"#;
    let s = snapshot(&format!("{MESH}---{gateways}"));
    let lb = |name: &str| {
        let (_, wp) = s.waypoint_by_name("shop", name).expect(name);
        wp.load_balancing
            .as_ref()
            .map(|lb| lb.routing_preference.to_vec())
    };
    use Scope::*;
    assert_eq!(lb("generated"), Some(vec![Network, Region, Zone]));
    assert_eq!(
        lb("by-node"),
        Some(vec![Network, Region, Zone, Subzone, Node])
    );
    assert_eq!(lb("opted-out"), None, "any other distribution opts out");
    assert_eq!(
        lb("described"),
        None,
        "its Service, as written, has no preference"
    );
}

#[test]
fn services_prefer_near_endpoints_as_istiod_tells_ztunnel() {
    let s = snapshot(MESH);
    let lb = |host: &str| {
        let (_, svc) = s.service_by_host(host).expect(host);
        svc.load_balancing
            .as_ref()
            .map(|lb| (lb.routing_preference.to_vec(), lb.mode))
    };
    use Scope::*;
    assert_eq!(
        lb("zone.shop.svc.cluster.local"),
        Some((vec![Network, Region, Zone], Mode::Failover))
    );
    assert_eq!(
        lb("local.shop.svc.cluster.local"),
        Some((vec![Node], Mode::Strict)),
        "internalTrafficPolicy: Local wins over a traffic distribution"
    );
    assert_eq!(lb("plain.shop.svc.cluster.local"), None);
    assert_eq!(
        lb("ext.example.com"),
        Some((vec![Network, Region, Zone, Subzone, Node], Mode::Failover)),
        "the annotation applies to ServiceEntries too"
    );
    assert_eq!(lb("typo.shop.svc.cluster.local"), None);
    let warning = s
        .warnings()
        .iter()
        .find(|w| w.contains("PreferNearby"))
        .expect("an unknown distribution is a warning");
    assert!(warning.contains("Service shop/typo"), "{warning}");
}

/// A proxy in eu/eu-a/rack-1 and the endpoints of `geo`, one per distance from it; `{lb}` is
/// the rule's `localityLbSetting`.
fn regions(lb: &str) -> String {
    let entry = |name: &str, ip: &str, locality: &str, network: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, \
             namespace: shop}}\nspec: {{address: {ip}, locality: {locality}, network: {network}, \
             labels: {{app: geo}}}}\n"
        )
    };
    let mut yaml = String::from(
        r#"
apiVersion: v1
kind: Service
metadata: {name: geo, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: geo}, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: geo, namespace: shop}
spec:
  host: geo.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3}
"#,
    );
    yaml.push_str(&format!("    loadBalancer: {{localityLbSetting: {lb}}}\n"));
    // Every endpoint but `subzone` shares the proxy's network.
    for (name, ip, locality, network) in [
        ("proxy", "10.2.0.1", "eu/eu-a/rack-1", "n1"),
        ("subzone", "10.2.0.2", "eu/eu-a/rack-1", "n2"),
        ("zone", "10.2.0.3", "eu/eu-a/rack-2", "n1"),
        ("region", "10.2.0.4", "eu/eu-b/rack-1", "n1"),
        ("us", "10.2.0.5", "us/us-a/rack-1", "n1"),
        ("ap", "10.2.0.6", "ap/ap-a/rack-1", "n1"),
    ] {
        yaml.push_str(&entry(name, ip, locality, network));
    }
    yaml
}

#[test]
fn a_destination_rules_failover_orders_regions_as_istiods_priorities_do() {
    // Each endpoint's rank, nearest first, for the proxy at 10.2.0.1.
    let ranks = |lb: &str| {
        let s = snapshot(&regions(lb));
        let (_, geo) = s
            .service_by_host("geo.shop.svc.cluster.local")
            .expect("geo");
        let (_, rule) = s.destination_rule("shop", geo).expect("rule");
        let preference = rule.traffic.locality.preference().expect("a preference");
        let on = |network: &str, ip: &str| {
            let ip = ip.parse::<IpAddr>().expect("ip");
            s.workload_by_ip(network, ip).expect("workload")
        };
        let me = on("n1", "10.2.0.1");
        [
            ("n2", "10.2.0.2"),
            ("n1", "10.2.0.3"),
            ("n1", "10.2.0.4"),
            ("n1", "10.2.0.5"),
            ("n1", "10.2.0.6"),
        ]
        .map(|(network, ip)| preference.rank(me, on(network, ip)))
    };
    // Region, zone, subzone; every other region alike.
    let [subzone, zone, region, us, ap] = ranks("{enabled: true}");
    assert!(
        subzone > zone && zone > region && region > us,
        "{subzone} {zone} {region} {us}"
    );
    assert_eq!(us, ap);

    // From eu, us next; the entry for another region does not apply.
    let [subzone, zone, region, us, ap] =
        ranks("{failover: [{from: ap, to: eu}, {from: eu, to: us}]}");
    assert!(subzone > zone && zone > region && region > us && us > ap);

    // No entry from eu: every other region alike.
    let [.., us, ap] = ranks("{failover: [{from: ap, to: us}]}");
    assert_eq!(us, ap);

    // With failoverPriority, its labels rank first: every endpoint of the proxy's network,
    // however far, before `subzone`, on another; with failover beside it, region, zone,
    // subzone and failover then order the endpoints of each of its ranks.
    let [subzone, zone, region, us, ap] =
        ranks("{failoverPriority: [topology.istio.io/network], failover: [{from: eu, to: us}]}");
    assert!(zone > region && region > us && us > ap && ap > subzone);
    // Without failover, failoverPriority alone: the network is all that ranks.
    let [subzone, ranked @ ..] = ranks("{failoverPriority: [topology.istio.io/network]}");
    assert!(
        ranked.iter().all(|r| *r == ranked[0] && *r > subzone),
        "{ranked:?}"
    );
}
