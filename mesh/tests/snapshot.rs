//! The snapshot built from real YAML files: enrolment, identities, endpoints, waypoint binding,
//! policy scoping, peer authentication, plugins and the JSON dump.

mod support;

use std::net::IpAddr;

use hbone::headers::WorkloadType;
use serde_json::json;

use mesh::model::{AppTunnel, Protocol, WaypointFor};
use mesh::resource::MtlsMode;
use support::{BOOKINFO, problems, snapshot};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn workloads_are_indexed_by_ip_uid_and_node() {
    let s = snapshot(BOOKINFO);
    let reviews = s.workload_by_ip("", ip("10.0.1.2")).expect("by ip");
    assert_eq!(&*reviews.uid, "Kubernetes//Pod/bookinfo/reviews-v1");
    assert_eq!(
        reviews.identity.to_string(),
        "spiffe://cluster.local/ns/bookinfo/sa/reviews"
    );
    assert_eq!(reviews.protocol, Protocol::Hbone);
    assert!(
        s.workload_by_uid("Kubernetes//Pod/bookinfo/reviews-v1")
            .is_some()
    );
    assert!(s.workload_by_ip("other-network", ip("10.0.1.2")).is_none());
    let mut on_a: Vec<_> = s.workloads_on_node("node-a").map(|w| &*w.name).collect();
    on_a.sort();
    assert_eq!(on_a, ["client", "productpage-v1", "reviews-v1"]);
    assert_eq!(s.workloads_on_node("node-z").count(), 0);
}

/// On a proxy whose network is named, unlabelled workloads are on it, and so are entries that
/// name it; an entry on another network is indexed apart.
#[test]
fn unlabelled_workloads_are_on_the_proxys_network() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: local, namespace: default}
status: {podIP: 10.0.0.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: spread, namespace: default}
spec:
  hosts: [spread.example.com]
  addresses: [240.0.0.1]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.2, network: east}, {address: 10.0.0.3, network: west}]
"#;
    let options = mesh::Options {
        network: "east".into(),
        ..mesh::Options::default()
    };
    let s = mesh::Snapshot::from_yaml("networks.yaml", yaml, &options).expect("valid");
    for local in ["10.0.0.1", "10.0.0.2"] {
        let w = s.workload_by_ip("east", ip(local)).expect(local);
        assert_eq!(&*w.network, "east", "{local}");
    }
    assert!(s.workload_by_ip("east", ip("10.0.0.3")).is_none());
    assert!(s.workload_by_ip("west", ip("10.0.0.3")).is_some());
    // The dump names addresses with their networks, the service's VIP on the proxy's.
    let dump = s.dump();
    let service = &dump["services"][0];
    assert_eq!(service["vips"], json!(["east/240.0.0.1"]));
    let addresses: Vec<&str> = (service["endpoints"].as_object().into_iter().flatten())
        .filter_map(|(_, e)| e["address"].as_str())
        .collect();
    assert_eq!(addresses, ["east/10.0.0.2", "west/10.0.0.3"], "{service}");
}

#[test]
fn ambient_enrolment_and_defaults() {
    let s = snapshot(BOOKINFO);
    let client = s.workload_by_ip("", ip("10.0.1.9")).expect("client");
    assert_eq!(
        client.protocol,
        Protocol::Tcp,
        "legacy namespace is not enrolled"
    );
    assert_eq!(
        client.identity.to_string(),
        "spiffe://cluster.local/ns/legacy/sa/default",
        "service account defaults to `default`"
    );
    let waypoint = s.workload_by_ip("", ip("10.0.2.1")).expect("waypoint pod");
    assert_eq!(
        waypoint.protocol,
        Protocol::Tcp,
        "waypoint pods are not captured"
    );
    assert_eq!(&*waypoint.workload_name, "waypoint");
    assert_eq!(waypoint.workload_type, WorkloadType::Deployment);

    let opted_out = snapshot(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: a, labels: {istio.io/dataplane-mode: none}}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: q, namespace: b, labels: {istio.io/dataplane-mode: ambient}}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: h, namespace: a}
spec: {hostNetwork: true}
status: {podIP: 10.1.0.3}
"#,
    );
    let protocol = |addr: &str| opted_out.workload_by_ip("", ip(addr)).expect("w").protocol;
    assert_eq!(
        protocol("10.1.0.1"),
        Protocol::Tcp,
        "pod label none opts out"
    );
    assert_eq!(
        protocol("10.1.0.2"),
        Protocol::Hbone,
        "pod label enrols alone"
    );
    assert_eq!(
        protocol("10.1.0.3"),
        Protocol::Tcp,
        "host network is never captured"
    );
}

/// An entry in an ambient namespace is still reached with plain TCP: its endpoints run outside
/// the pods istio-cni captures. Only the entry's own annotation or tunnel label asks for HBONE.
/// Its endpoints take their canonical names from the entry.
#[test]
fn entries_choose_their_tunnel_and_name_their_endpoints() {
    let s = snapshot(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: a}
spec: {address: 10.2.0.1, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: behind-ztunnel, namespace: a, annotations: {ambient.istio.io/redirection: enabled}}
spec: {address: 10.2.0.2}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: native, namespace: a, labels: {networking.istio.io/tunnel: "tls,http"}}
spec: {address: 10.2.0.3}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other-tunnel, namespace: a, labels: {networking.istio.io/tunnel: https}}
spec: {address: 10.2.0.4}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: a}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp, protocol: TCP, targetPort: 0}]
  resolution: STATIC
  endpoints: [{address: 10.2.0.5, labels: {networking.istio.io/tunnel: http}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: vms
  namespace: a
  annotations: {ambient.istio.io/redirection: enabled}
  labels: {app: vms, version: v3}
spec:
  hosts: [vms.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.2.0.6, labels: {app: endpoint, version: v9}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: a, labels: {service.istio.io/canonical-name: payments}}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
"#,
    );
    let protocol = |addr: &str| s.workload_by_ip("", ip(addr)).expect("w").protocol;
    for (addr, want, why) in [
        ("10.2.0.1", Protocol::Tcp, "enrolment labels do not tunnel"),
        ("10.2.0.2", Protocol::Hbone, "redirection annotation"),
        ("10.2.0.3", Protocol::Hbone, "http among the tunnel types"),
        ("10.2.0.4", Protocol::Tcp, "another tunnel type"),
        (
            "10.2.0.5",
            Protocol::Tcp,
            "an endpoint's labels do not decide",
        ),
        ("10.2.0.6", Protocol::Hbone, "the ServiceEntry's annotation"),
    ] {
        assert_eq!(protocol(addr), want, "{addr}: {why}");
    }

    // A target port of 0 is unset: the service port is the target.
    let (_, db) = s.resolve_host("db.example.com", "a").expect("db");
    assert_eq!(db.ports[0].target, mesh::model::Target::Number(5432));

    // Every endpoint of an entry is named by the entry's labels, as istiod names it.
    let named = |w: &mesh::model::Workload| {
        (
            w.canonical_name.to_string(),
            w.canonical_revision.to_string(),
        )
    };
    let vm = s.workload_by_ip("", ip("10.2.0.6")).expect("endpoint");
    assert_eq!(named(vm), ("vms".into(), "v3".into()));
    let host = (s.workloads().iter())
        .find(|w| w.hostname.as_deref() == Some("api.example.com"))
        .expect("the host is its own endpoint");
    assert_eq!(named(host), ("payments".into(), "latest".into()));
}

#[test]
fn services_resolve_ready_endpoints_and_named_ports() {
    let s = snapshot(BOOKINFO);
    let (id, reviews) = s.service_by_vip(ip("10.96.0.20")).expect("by vip");
    assert_eq!(&*reviews.hostname, "reviews.bookinfo.svc.cluster.local");
    assert_eq!(
        s.service_by_host("reviews.bookinfo.svc.cluster.local")
            .map(|x| x.0),
        Some(id)
    );
    assert_eq!(s.resolve_host("reviews", "bookinfo").map(|x| x.0), Some(id));
    assert_eq!(
        s.resolve_host("reviews.bookinfo", "legacy").map(|x| x.0),
        Some(id)
    );
    assert_eq!(
        s.resolve_host("reviews.bookinfo.svc", "legacy")
            .map(|x| x.0),
        Some(id)
    );
    assert!(s.resolve_host("reviews", "legacy").is_none());

    let (port_index, _) = reviews.port(9080).expect("port");
    let targets: Vec<(&str, Option<u16>)> = reviews
        .endpoints
        .iter()
        .map(|e| (&*s.workload(e.workload).name, e.target_port(port_index)))
        .collect();
    // reviews-v3 is not Ready; named port `http` differs per pod.
    assert_eq!(
        targets,
        [("reviews-v1", Some(8080)), ("reviews-v2", Some(8081))]
    );
    let v1 = s.workload_by_ip("", ip("10.0.1.2")).expect("v1");
    assert_eq!(v1.services.as_ref(), [id]);
}

/// A Service that publishes not-ready addresses takes every pod that has not ended as an
/// endpoint, as Kubernetes marks them ready for it: a StatefulSet's peers find each other
/// through its headless Service before they are ready. A pod that has ended is no endpoint of
/// it either.
#[test]
fn a_service_publishing_not_ready_addresses_takes_running_pods() {
    let extra = r#"
---
apiVersion: v1
kind: Service
metadata: {name: reviews-peers, namespace: bookinfo}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v4, namespace: bookinfo, labels: {app: reviews, version: v4}}
spec: {nodeName: node-b, serviceAccountName: reviews}
status:
  podIP: 10.0.2.4
  phase: Failed
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v5, namespace: bookinfo, labels: {app: reviews, version: v5}}
spec: {nodeName: node-b, serviceAccountName: reviews}
status: {podIP: 10.0.2.5, phase: Pending}
"#;
    let s = snapshot(&format!("{BOOKINFO}{extra}"));
    let names = |host: &str| -> Vec<String> {
        let (_, service) = s.service_by_host(host).expect("service");
        (service.endpoints.iter())
            .map(|e| s.workload(e.workload).name.to_string())
            .collect()
    };
    assert_eq!(
        names("reviews-peers.bookinfo.svc.cluster.local"),
        ["reviews-v1", "reviews-v2", "reviews-v3", "reviews-v5"],
        "the pods that have not ended, ready or not, Pending with an address included"
    );
    assert_eq!(
        names("reviews.bookinfo.svc.cluster.local"),
        ["reviews-v1", "reviews-v2"],
        "the same pods' ready ones, for a Service that does not publish the others"
    );
    let v3 = s.workload_by_ip("", ip("10.0.2.3")).expect("v3");
    assert!(v3.running && !v3.ready, "running, not ready");
}

#[test]
fn a_shared_vip_is_each_namespaces_own() {
    let entry = |name: &str, namespace: &str, hosts: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: {name}, namespace: {namespace}}}\n\
             spec: {{hosts: [{hosts}], addresses: [192.0.2.7], ports: [{{number: 443, name: tls}}]}}\n"
        )
    };
    let s = snapshot(
        &[
            entry("api", "a", "api.example.com, api2.example.com"),
            entry("api", "b", "api.example.com"),
        ]
        .concat(),
    );
    let vip = ip("192.0.2.7");
    let found = |namespace: &str| {
        let (_, service) = s.service_by_vip_from(vip, namespace).expect("service");
        format!("{}/{}", service.namespace, service.hostname)
    };
    assert_eq!(found("a"), "a/api.example.com");
    assert_eq!(found("b"), "b/api.example.com");
    assert_eq!(
        found("c"),
        "a/api.example.com",
        "the first, for a namespace without one"
    );
    let all: Vec<_> = (s.services_by_vip(vip))
        .map(|(_, service)| format!("{}/{}", service.namespace, service.hostname))
        .collect();
    assert_eq!(
        all,
        [
            "a/api.example.com",
            "a/api2.example.com",
            "b/api.example.com"
        ]
    );
    let w = s.warnings().join("\n");
    assert!(
        w.contains(
            "a/api2.example.com has VIP 192.0.2.7, already used by a/api.example.com; lookups \
             by VIP find a/api.example.com"
        ),
        "{w}"
    );
    assert!(
        w.contains(
            "b/api.example.com has VIP 192.0.2.7, already used by a/api.example.com; callers \
             in namespace b find it by VIP, callers in namespaces without a service of that VIP \
             find a/api.example.com"
        ),
        "{w}"
    );
}

#[test]
fn waypoint_binding_follows_labels_and_waypoint_for() {
    let s = snapshot(BOOKINFO);
    let (_, wp) = s
        .waypoint_by_name("bookinfo", "waypoint")
        .expect("waypoint");
    assert_eq!(wp.waypoint_for, WaypointFor::Service);
    assert_eq!(wp.instances.len(), 1);
    let (_, reviews) = s.service_by_vip(ip("10.96.0.20")).expect("reviews");
    assert_eq!(
        s.service_waypoint(reviews).map(|w| &*w.name),
        Some("waypoint")
    );
    let (_, own) = s.service_by_vip(ip("10.96.0.2")).expect("waypoint service");
    assert!(
        own.waypoint.is_none(),
        "a waypoint's own service is never redirected"
    );
    let pod = s.workload_by_ip("", ip("10.0.1.2")).expect("pod");
    assert!(
        s.workload_waypoint(pod).is_none(),
        "a service waypoint does not take workload-addressed traffic"
    );
    let instance = s.workload_by_ip("", ip("10.0.2.1")).expect("instance");
    assert_eq!(
        s.waypoint_of_instance(instance).map(|w| &*w.name),
        Some("waypoint")
    );

    // A more specific label wins: `none` on the Service, a different waypoint on a Pod.
    let extra = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wl, namespace: bookinfo, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: bookinfo, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.30, selector: {app: details}, ports: [{port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: details, namespace: bookinfo, labels: {app: details, istio.io/use-waypoint: wl}}
status: {podIP: 10.0.1.30}
"#;
    let s = snapshot(&format!("{BOOKINFO}{extra}"));
    let (_, details) = s.service_by_vip(ip("10.96.0.30")).expect("details");
    assert!(details.waypoint.is_none());
    let pod = s.workload_by_ip("", ip("10.0.1.30")).expect("pod");
    assert_eq!(s.workload_waypoint(pod).map(|w| &*w.name), Some("wl"));
}

#[test]
fn cross_namespace_waypoints_need_admission() {
    let base = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra, team: a}}
---
apiVersion: v1
kind: Service
metadata: {name: svc, namespace: app}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shared, namespace: infra}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"#;
    let s = snapshot(base);
    let (_, svc) = s.service_by_vip(ip("10.96.1.1")).expect("svc");
    assert!(svc.waypoint.is_none(), "allowedRoutes defaults to Same");
    assert!(
        s.warnings()
            .iter()
            .any(|w| w.contains("does not admit namespace app")),
        "{:?}",
        s.warnings()
    );

    for admission in [
        "{namespaces: {from: All}}",
        "{namespaces: {from: Selector, selector: {matchLabels: {team: a}}}}",
    ] {
        let s = snapshot(&format!("{base}    allowedRoutes: {admission}\n"));
        let (_, svc) = s.service_by_vip(ip("10.96.1.1")).expect("svc");
        assert_eq!(
            s.service_waypoint(svc).map(|w| &*w.namespace),
            Some("infra"),
            "{admission}"
        );
    }
}

#[test]
fn missing_waypoints_and_obsolete_labels_warn() {
    let s = snapshot(
        r#"
apiVersion: v1
kind: Service
metadata: {name: s, namespace: default, labels: {istio.io/use-waypoint: nope}}
spec: {clusterIP: 10.96.2.1, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: old, namespace: default, annotations: {istio.io/for-service-account: sa}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"#,
    );
    let w = s.warnings().join("\n");
    assert!(
        w.contains("uses waypoint default/nope, which does not exist"),
        "{w}"
    );
    assert!(w.contains("for-service-account is obsolete"), "{w}");
}

#[test]
fn policies_are_scoped_for_each_layer() {
    let policies = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: istio-system}
spec: {action: DENY, rules: [{to: [{operation: {ports: ["9999"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-allow, namespace: bookinfo}
spec: {rules: [{from: [{source: {namespaces: [bookinfo]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-only, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{from: [{source: {principals: [cluster.local/ns/bookinfo/sa/productpage]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-get, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-paths, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: [/admin*]}}]}]
"#;
    let s = snapshot(&format!("{BOOKINFO}{policies}"));
    let names = |it: &mut dyn Iterator<Item = &mesh::authz::Policy>| -> Vec<String> {
        it.map(|p| p.name().to_owned()).collect()
    };
    let reviews = s.workload_by_ip("", ip("10.0.1.2")).expect("reviews");
    let product = s.workload_by_ip("", ip("10.0.1.1")).expect("productpage");
    let legacy = s.workload_by_ip("", ip("10.0.1.9")).expect("legacy");
    assert_eq!(
        names(&mut s.ztunnel_policies(reviews)),
        ["mesh-deny", "ns-allow", "reviews-only"]
    );
    assert_eq!(
        names(&mut s.ztunnel_policies(product)),
        ["mesh-deny", "ns-allow"]
    );
    assert_eq!(names(&mut s.ztunnel_policies(legacy)), ["mesh-deny"]);

    let (_, wp) = s.waypoint_by_name("bookinfo", "waypoint").expect("wp");
    let (_, svc) = s.service_by_vip(ip("10.96.0.20")).expect("reviews svc");
    let (_, page) = s.service_by_vip(ip("10.96.0.10")).expect("productpage svc");
    assert_eq!(
        names(&mut s.waypoint_policies(wp, Some(svc))),
        ["waypoint-get", "reviews-paths"]
    );
    assert_eq!(
        names(&mut s.waypoint_policies(wp, Some(page))),
        ["waypoint-get"]
    );
}

#[test]
fn peer_authentication_resolves_most_specific_mode() {
    let pa = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: bookinfo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reviews, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: UNSET}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
"#;
    let s = snapshot(&format!("{BOOKINFO}{pa}"));
    let reviews = s.workload_by_ip("", ip("10.0.1.2")).expect("reviews");
    let product = s.workload_by_ip("", ip("10.0.1.1")).expect("productpage");
    let legacy = s.workload_by_ip("", ip("10.0.1.9")).expect("legacy");
    assert_eq!(
        s.mtls_mode(reviews, 8080),
        MtlsMode::Permissive,
        "port level wins"
    );
    assert_eq!(
        s.mtls_mode(reviews, 9090),
        MtlsMode::Strict,
        "UNSET defers to the namespace"
    );
    assert_eq!(s.mtls_mode(product, 9080), MtlsMode::Strict);
    assert_eq!(s.mtls_mode(legacy, 80), MtlsMode::Permissive, "mesh-wide");
    assert_eq!(
        snapshot(BOOKINFO).mtls_mode(legacy, 80),
        MtlsMode::Permissive,
        "default"
    );
}

#[test]
fn plugins_attach_in_phase_and_priority_order() {
    let plugins = r#"
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: stats, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  url: file:///plugins/stats.wasm
  phase: STATS
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: authn-low, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  url: file:///plugins/a.wasm
  phase: AUTHN
  priority: 1
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: authn-high, namespace: bookinfo}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  url: file:///plugins/b.wasm
  phase: AUTHN
  priority: 10
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: sidecar-only, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  url: file:///plugins/c.wasm
---
apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {name: authz-ext, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  phase: AUTHZ
  wasm: {url: file:///plugins/d.wasm, failStrategy: FAIL_RELOAD}
---
apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {name: client-only, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  match: [{mode: CLIENT}]
  wasm: {url: file:///plugins/e.wasm}
---
apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {name: lua, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  lua: {inlineCode: "function envoy_on_request(h) end"}
"#;
    let s = snapshot(&format!("{BOOKINFO}{plugins}"));
    let (_, wp) = s.waypoint_by_name("bookinfo", "waypoint").expect("wp");
    let (_, reviews) = s.service_by_vip(ip("10.96.0.20")).expect("reviews");
    let (_, page) = s.service_by_vip(ip("10.96.0.10")).expect("productpage");
    let order = |svc| {
        s.waypoint_plugins(wp, svc)
            .map(|p| p.name.to_string())
            .collect::<Vec<_>>()
    };
    // TrafficExtensions order with WasmPlugins; a Lua one is skipped. The CLIENT-only one is
    // attached but applies to no port a waypoint serves.
    let applying = |svc| {
        s.waypoint_plugins(wp, svc)
            .filter(|p| p.applies_to_port(9080))
            .map(|p| p.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        applying(Some(reviews)),
        ["authn-high", "authn-low", "authz-ext", "stats"]
    );
    assert_eq!(applying(Some(page)), ["authn-low", "authz-ext", "stats"]);
    assert_eq!(
        order(None),
        ["authn-low", "authz-ext", "stats", "client-only"]
    );
    assert!(
        s.warnings()
            .iter()
            .any(|w| w.contains("TrafficExtension bookinfo/lua")),
        "{:?}",
        s.warnings()
    );
}

#[test]
fn traffic_extension_errors_name_the_wasm_fields() {
    let e = problems(
        r#"
apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {name: bad, namespace: default}
spec:
  phase: LATE
  wasm: {url: "ftp://x", failStrategy: MAYBE}
---
apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {name: neither, namespace: default}
spec: {phase: AUTHN}
"#,
    );
    let found: Vec<(String, String)> = e
        .problems()
        .iter()
        .map(|p| (p.resource.clone(), p.error.field.clone()))
        .collect();
    for want in [
        ("TrafficExtension default/bad", "spec.wasm.url"),
        ("TrafficExtension default/bad", "spec.phase"),
        ("TrafficExtension default/bad", "spec.wasm.failStrategy"),
        ("TrafficExtension default/neither", "spec"),
    ] {
        assert!(
            found.iter().any(|(r, f)| r == want.0 && f == want.1),
            "missing {want:?} in {found:?}"
        );
    }
}

#[test]
fn invalid_resources_are_all_reported_with_locations() {
    let e = problems(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: bad-ip, namespace: default}
status: {podIP: 10.0.0.300}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: both, namespace: default}
spec:
  selector: {matchLabels: {app: a}}
  targetRefs: [{kind: Service, name: s}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: p, namespace: default}
spec: {url: "file:///x.wasm", phase: LATE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: default, labels: {istio.io/waypoint-for: everything}}
spec: {gatewayClassName: istio-waypoint}
"#,
    );
    let found: Vec<(String, String)> = e
        .problems()
        .iter()
        .map(|p| (p.resource.clone(), p.error.field.clone()))
        .collect();
    for want in [
        ("Pod default/bad-ip", "status.podIP"),
        ("AuthorizationPolicy default/both", "spec.targetRefs"),
        ("WasmPlugin default/p", "spec.phase"),
        (
            "Gateway default/wp",
            "metadata.labels[istio.io/waypoint-for]",
        ),
    ] {
        assert!(
            found.iter().any(|(r, f)| r == want.0 && f == want.1),
            "missing {want:?} in {found:?}"
        );
    }
    let text = e.to_string();
    assert!(
        text.contains("mesh.yaml (document 0): Pod default/bad-ip: status.podIP"),
        "{text}"
    );
}

#[test]
fn dump_is_complete_json() {
    let s = snapshot(BOOKINFO);
    let dump = s.dump();
    assert_eq!(dump["version"], 1);
    assert_eq!(dump["workloads"].as_array().map(Vec::len), Some(6));
    assert_eq!(dump["services"].as_array().map(Vec::len), Some(3));
    // Waypoints name what they serve rather than number it.
    let waypoint = &dump["waypoints"][0];
    assert_eq!(waypoint["name"], "waypoint");
    assert_eq!(
        waypoint["instances"],
        json!(["Kubernetes//Pod/bookinfo/waypoint-6f8c9-abcde"])
    );
    assert_eq!(
        waypoint["service"],
        "bookinfo/waypoint.bookinfo.svc.cluster.local"
    );
    // Routing and policy resources as written (here the Gateway); not pods, services or
    // namespaces, which the model above already shows.
    let resources = dump["resources"].as_array().expect("resources");
    assert_eq!(resources.len(), 1, "{resources:?}");
    let gateway = resources[0].to_string();
    assert!(gateway.contains("istio-waypoint"), "{gateway}");
}

/// The workloads, services, policies of the dump in upstream ztunnel's form, whose field names
/// and types `istioctl ztunnel-config` decodes (a wrong type fails the whole command).
#[test]
fn dump_is_in_upstream_form() {
    let s = snapshot(&format!(
        "{BOOKINFO}{}",
        r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-callers, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{from: [{source: {principals: [cluster.local/ns/bookinfo/sa/waypoint]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-the-waypoint, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: partner, namespace: bookinfo}
spec:
  hosts: [partner.example.com]
  addresses: [192.0.2.44]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: v1
kind: Service
metadata: {name: peers, namespace: bookinfo}
spec: {clusterIP: 10.96.0.77, publishNotReadyAddresses: true, selector: {app: reviews}, ports: [{port: 80}]}
"#
    ));
    let dump = s.dump();
    let find = |list: &str, name: &str| {
        (dump[list].as_array().into_iter().flatten())
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {list}: {dump}"))
            .clone()
    };

    let reviews_v1 = find("workloads", "reviews-v1");
    for (field, want) in [
        ("uid", json!("Kubernetes//Pod/bookinfo/reviews-v1")),
        ("workloadIps", json!(["10.0.1.2"])),
        ("protocol", json!("HBONE")),
        ("namespace", json!("bookinfo")),
        ("serviceAccount", json!("reviews")),
        ("trustDomain", json!("cluster.local")),
        ("workloadType", json!("pod")),
        ("canonicalName", json!("reviews")),
        ("canonicalRevision", json!("v1")),
        ("clusterId", json!("Kubernetes")),
        ("status", json!("Healthy")),
        ("capacity", json!(1)),
        ("authorizationPolicies", json!(["bookinfo/reviews-callers"])),
    ] {
        assert_eq!(reviews_v1[field], want, "{field} of {reviews_v1}");
    }
    assert_eq!(find("workloads", "client")["protocol"], "TCP");

    // The namespace's waypoint serves its services; `istioctl` names it by finding the
    // destination among the services' VIPs.
    let waypoint = find("services", "waypoint");
    assert_eq!(waypoint["vips"], json!(["/10.96.0.2"]));
    let reviews = find("services", "reviews");
    assert_eq!(
        reviews["waypoint"],
        json!({"destination": "/10.96.0.2", "hboneMtlsPort": 15008})
    );
    assert_eq!(reviews["hostname"], "reviews.bookinfo.svc.cluster.local");
    assert_eq!(
        reviews.get("loadBalancer"),
        None,
        "the defaults are left out"
    );
    // What istiod sends for a ServiceEntry resolved NONE, and for not-ready addresses.
    assert_eq!(
        find("services", "partner")["loadBalancer"],
        json!({"mode": "Passthrough", "routingPreferences": [], "healthPolicy": "AllowAll"})
    );
    assert_eq!(
        find("services", "peers")["loadBalancer"],
        json!({"mode": "Standard", "routingPreferences": [], "healthPolicy": "AllowAll"})
    );
    assert_eq!(reviews["ipFamilies"], "IPv4");
    // A named target port is resolved per endpoint: 0 service-wide, as upstream shows it; the
    // port's name and protocol are ours to show.
    assert_eq!(reviews["ports"], json!({"9080": 0}));
    assert_eq!(
        reviews["servicePorts"],
        json!([{"port": 9080, "name": "http", "targetPort": "http", "appProtocol": "Http"}])
    );
    let endpoints = reviews["endpoints"].as_object().expect("a map by uid");
    assert_eq!(endpoints.len(), 2, "{reviews}");
    assert_eq!(
        endpoints["Kubernetes//Pod/bookinfo/reviews-v2"],
        json!({
            "workloadUid": "Kubernetes//Pod/bookinfo/reviews-v2",
            "service": "bookinfo/reviews.bookinfo.svc.cluster.local",
            "address": "/10.0.2.2",
            "port": {"9080": 8081},
            "status": "Healthy",
        })
    );

    // Only what ztunnel enforces: the selector policy, not the waypoint's.
    assert_eq!(
        dump["policies"],
        json!([{
            "name": "reviews-callers",
            "namespace": "bookinfo",
            "scope": "WorkloadSelector",
            "action": "Allow",
            "dryRun": false,
            "rules": [[[{"principals": [{"Exact": "cluster.local/ns/bookinfo/sa/waypoint"}]}]]],
        }])
    );
    assert_eq!(
        dump["authorizationPolicies"].as_array().map(Vec::len),
        Some(2)
    );
}

#[test]
fn http_attributes_warn_only_where_ztunnel_enforces_the_policy() {
    let s = snapshot(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-the-waypoint, namespace: app}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: namespace-wide, namespace: app}
spec:
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#,
    );
    let w = s.warnings().join("\n");
    assert!(
        w.contains(
            "AuthorizationPolicy app/namespace-wide uses HTTP attributes, which ztunnel does not support: its ALLOW rules"
        ),
        "{w}"
    );
    assert!(!w.contains("at-the-waypoint"), "{w}");
}

#[test]
fn a_sandwiched_waypoint_is_captured_with_its_proxy_binding() {
    let yaml = |binding: &str| {
        format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: app, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: sandwich
  namespace: app
  annotations: {{ambient.istio.io/waypoint-inbound-binding: "{binding}"}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: plain, namespace: app}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sandwich-0, namespace: app, labels: {{gateway.networking.k8s.io/gateway-name: sandwich}}}}
spec: {{nodeName: node-a, serviceAccountName: sandwich}}
status: {{podIP: 10.0.0.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: plain-0, namespace: app, labels: {{gateway.networking.k8s.io/gateway-name: plain}}}}
spec: {{nodeName: node-a, serviceAccountName: plain}}
status: {{podIP: 10.0.0.2}}
"#
        )
    };
    let s = snapshot(&yaml("PROXY/15088"));
    let sandwiched = s.workload_by_ip("", ip("10.0.0.1")).expect("sandwich-0");
    assert_eq!(sandwiched.protocol, Protocol::Hbone);
    assert_eq!(sandwiched.app_tunnel, Some(AppTunnel { port: Some(15088) }));
    let plain = s.workload_by_ip("", ip("10.0.0.2")).expect("plain-0");
    assert_eq!(plain.protocol, Protocol::Tcp, "waypoints are not captured");
    assert_eq!(plain.app_tunnel, None);

    let s = snapshot(&yaml("NONE"));
    let w = s.workload_by_ip("", ip("10.0.0.1")).expect("sandwich-0");
    assert_eq!((w.protocol, w.app_tunnel), (Protocol::Tcp, None));

    // No port: each tunnel goes to its own target port.
    let s = snapshot(&yaml("PROXY"));
    let w = s.workload_by_ip("", ip("10.0.0.1")).expect("sandwich-0");
    assert_eq!(w.app_tunnel, Some(AppTunnel { port: None }));

    for bad in [
        "PROXY/0",
        "HBONE/15008",
        "PROXY/15088x",
        "NONE/15088",
        "proxy",
    ] {
        let e = problems(&yaml(bad));
        assert!(
            e.problems()
                .iter()
                .any(|p| p.resource == "Gateway app/sandwich"
                    && p.error.field
                        == "metadata.annotations[ambient.istio.io/waypoint-inbound-binding]"),
            "{bad}: {e}"
        );
    }
}

/// kgateway's waypoints: the binding sits on their GatewayClass, and their Gateways are of that
/// class, not istio-waypoint. A Gateway's own annotation wins over its class's; a Gateway of a
/// class without a binding is no waypoint; a malformed class binding names the class.
#[test]
fn a_gateway_class_binding_makes_its_gateways_sandwiched_waypoints() {
    let yaml = |class_binding: &str, own: &str| {
        format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: app, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: kgateway-waypoint
  labels: {{istio.io/waypoint-for: all}}
  annotations: {{ambient.istio.io/waypoint-inbound-binding: "{class_binding}"}}
spec: {{controllerName: kgateway.dev/kgateway, description: waypoints}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: kgateway}}
spec: {{controllerName: kgateway.dev/kgateway}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: kg, namespace: app{own}}}
spec:
  gatewayClassName: kgateway-waypoint
  listeners:
  - {{name: proxy, port: 15088, protocol: istio.io/PROXY, allowedRoutes: {{namespaces: {{from: All}}}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: app}}
spec: {{gatewayClassName: kgateway, listeners: [{{name: http, port: 80, protocol: HTTP}}]}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: other, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: svc, namespace: other, labels: {{istio.io/use-waypoint: kg, istio.io/use-waypoint-namespace: app}}}}
spec: {{clusterIP: 10.96.1.1, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: kg-0, namespace: app, labels: {{gateway.networking.k8s.io/gateway-name: kg}}}}
spec: {{nodeName: node-a, serviceAccountName: kg}}
status: {{podIP: 10.0.0.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: ingress-0, namespace: app, labels: {{gateway.networking.k8s.io/gateway-name: ingress}}}}
spec: {{nodeName: node-a, serviceAccountName: ingress}}
status: {{podIP: 10.0.0.2}}
"#
        )
    };
    let s = snapshot(&yaml("PROXY/15088", ""));
    let (_, kg) = s
        .waypoint_by_name("app", "kg")
        .expect("a waypoint, by its class's binding");
    assert_eq!(kg.inbound_binding, Some(AppTunnel { port: Some(15088) }));
    assert_eq!(
        kg.waypoint_for,
        WaypointFor::All,
        "the class's istio.io/waypoint-for"
    );
    let (_, svc) = s.service_by_vip(ip("10.96.1.1")).expect("svc");
    assert_eq!(
        s.service_waypoint(svc).map(|w| &*w.name),
        Some("kg"),
        "admitted by the listener the binding names (it has no HBONE listener)"
    );
    let w = s.workload_by_ip("", ip("10.0.0.1")).expect("kg-0");
    assert_eq!(
        (w.protocol, w.app_tunnel),
        (Protocol::Hbone, Some(AppTunnel { port: Some(15088) }))
    );
    assert!(
        s.waypoint_by_name("app", "ingress").is_none(),
        "a class without a binding makes no waypoint"
    );

    let own = ", annotations: {ambient.istio.io/waypoint-inbound-binding: PROXY/16000}";
    let s = snapshot(&yaml("PROXY/15088", own));
    let (_, kg) = s.waypoint_by_name("app", "kg").expect("kg");
    assert_eq!(kg.inbound_binding, Some(AppTunnel { port: Some(16000) }));

    let e = problems(&yaml("PROXY/x", ""));
    assert!(
        e.problems()
            .iter()
            .any(|p| p.resource == "GatewayClass kgateway-waypoint"
                && p.error.field
                    == "metadata.annotations[ambient.istio.io/waypoint-inbound-binding]"),
        "{e}"
    );
}

/// A `resolution: DNS` ServiceEntry's endpoints are DNS names, resolved by whoever sends them
/// traffic: its hosts when it lists no endpoints (each host its own service's only endpoint),
/// or the names its endpoints give. They have no address, are ready, and are reached with
/// plain TCP.
#[test]
fn dns_service_entries_have_named_endpoints() {
    let s = snapshot(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: egress, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org, Api.Example.com]
  addresses: [240.240.0.1]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mirrors, namespace: egress}
spec:
  hosts: [mirror.internal]
  addresses: [240.240.0.2]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS_ROUND_ROBIN
  endpoints: [{address: eu.mirror.example.net, ports: {tls: 8443}}, {address: 10.9.0.1}]
"#,
    );
    let endpoints = |host: &str| -> Vec<(Option<String>, Vec<IpAddr>, Option<u16>)> {
        let (_, service) = s.service_by_host(host).expect(host);
        (service.endpoints.iter())
            .map(|e| {
                let w = s.workload(e.workload);
                assert!(w.ready, "{host}: ready");
                if w.hostname.is_some() {
                    assert_eq!(
                        w.protocol,
                        Protocol::Tcp,
                        "{host}: a name is reached with TCP"
                    );
                }
                (
                    w.hostname.as_deref().map(str::to_owned),
                    w.ips.to_vec(),
                    e.target_port(0),
                )
            })
            .collect()
    };
    assert_eq!(
        endpoints("httpbin.org"),
        [(Some("httpbin.org".to_owned()), vec![], Some(8080))]
    );
    assert_eq!(
        endpoints("Api.Example.com"),
        [(Some("api.example.com".to_owned()), vec![], Some(8080))]
    );
    assert_eq!(
        endpoints("mirror.internal"),
        [
            (None, vec![ip("10.9.0.1")], Some(443)),
            (Some("eu.mirror.example.net".to_owned()), vec![], Some(8443)),
        ]
    );
    let dump = serde_json::to_string(&s.dump()).expect("json");
    assert!(dump.contains(r#""hostname":"httpbin.org""#), "{dump}");
}

#[test]
fn names_are_endpoints_only_where_dns_resolves_them() {
    let e = problems(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static, namespace: default}
spec:
  hosts: [a.example.com]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: backend.example.com}]
"#,
    );
    let text = e.to_string();
    let want = "ServiceEntry default/static: spec.endpoints[0].address: \"backend.example.com\" is \
                not an IP address (a DNS name needs `resolution: DNS`)";
    assert!(text.contains(want), "missing {want:?} in {text}");

    // A wildcard host names nothing to resolve: no endpoints, and a warning. A host written as
    // an address is that address. Hosts differing in case are one name.
    let s = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mixed, namespace: default}
spec:
  hosts: ["*.example.org", 10.9.0.7, db.example.net, DB.example.net]
  ports: [{number: 80, name: http}]
  resolution: DNS
"#,
    );
    let count = |host: &str| s.service_by_host(host).expect(host).1.endpoints.len();
    assert_eq!(count("*.example.org"), 0);
    assert_eq!(count("10.9.0.7"), 1);
    assert_eq!(count("db.example.net"), 1);
    assert_eq!(count("DB.example.net"), 1);
    let (_, by_ip) = s.service_by_host("10.9.0.7").expect("host");
    assert_eq!(
        s.workload(by_ip.endpoints[0].workload).ips.as_ref(),
        [ip("10.9.0.7")]
    );
    let w = s.warnings().join("\n");
    assert!(w.contains("host \"*.example.org\" has no endpoints"), "{w}");
}

/// A ServiceEntry address written as a block of one address is that address; a wider block is
/// no service address, and is said to be ignored.
#[test]
fn service_entry_address_blocks_of_one_address_are_addresses_and_wider_ones_are_ignored() {
    let s = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mixed, namespace: egress}
spec:
  hosts: [mixed.example.com]
  addresses: [10.0.0.0/8, 192.0.2.7/32, "2001:db8::1/128", 198.51.100.9]
  ports: [{number: 5432, name: tcp}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.8}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ranged, namespace: egress}
spec:
  hosts: [ranged.example.com]
  addresses: [10.0.0.0/8]
  ports: [{number: 6379, name: tcp}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.9}]
"#,
    );
    let vips = |host: &str| s.service_by_host(host).expect(host).1.vips.to_vec();
    assert_eq!(
        vips("mixed.example.com"),
        [ip("192.0.2.7"), ip("2001:db8::1"), ip("198.51.100.9")]
    );
    // Its block's first address is no address of it.
    assert!(s.service_by_vip(ip("10.0.0.0")).is_none());
    // An entry whose only address is a block keeps none: it named addresses, so none is
    // allocated in their place.
    assert!(vips("ranged.example.com").is_empty());
    let w = s.warnings().join("\n");
    for (entry, block) in [("mixed", "10.0.0.0/8"), ("ranged", "10.0.0.0/8")] {
        assert!(
            w.contains(&format!(
                "ServiceEntry egress/{entry}: spec.addresses[0]: {block:?} is a range"
            )),
            "{w}"
        );
    }

    let e = problems(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bad, namespace: egress}
spec:
  hosts: [bad.example.com]
  addresses: [192.0.2.7, 10.0.0.0/33]
  ports: [{number: 80, name: http}]
"#,
    )
    .to_string();
    assert!(
        e.contains("ServiceEntry egress/bad")
            && e.contains("spec.addresses[1]")
            && e.contains("\"10.0.0.0/33\" is not an IP address or CIDR block"),
        "{e}"
    );
}

/// A ServiceEntry that declares no addresses gets, for each host it names, one from
/// 240.240.0.0/16 and one from 2001:2::/48, as istiod's IP auto-allocation gives them: the
/// same in every proxy that reads the same files, never one another service has, and those of
/// `status.addresses` where a cluster already allocated them.
#[test]
fn service_entries_without_addresses_get_addresses_allocated() {
    let entries = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress}
spec:
  hosts: [api.example.com, files.example.com, "*.example.org", 10.9.0.7]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: egress}
spec:
  hosts: [db.internal]
  ports: [{number: 5432, name: tcp}]
  resolution: STATIC
  endpoints: [{address: 10.9.0.8}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: unresolved, namespace: egress}
spec:
  hosts: [none.example.com]
  ports: [{number: 80, name: http}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: opted-out
  namespace: egress
  labels: {networking.istio.io/enable-autoallocate-ip: "False"}
spec:
  hosts: [out.example.com]
  ports: [{number: 80, name: http}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: exported, namespace: egress}
spec:
  hosts: [pinned.example.com]
  ports: [{number: 80, name: http}]
  resolution: DNS
status:
  addresses:
  - {host: pinned.example.com, value: 240.240.9.9}
  - {host: pinned.example.com, value: "2001:2::9:9"}
  - {host: gone.example.com, value: 240.240.9.10}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: broken, namespace: egress}
spec:
  hosts: [broken.example.com]
  ports: [{number: 80, name: http}]
  resolution: DNS
status:
  addresses: [{host: broken.example.com, value: not-an-ip}]
"#;
    let s = snapshot(entries);
    let vips = |s: &mesh::Snapshot, host: &str| -> Vec<IpAddr> {
        s.service_by_host(host).expect(host).1.vips.to_vec()
    };
    // The slots FNV-1a of "namespace/name/host" picks.
    assert_eq!(
        vips(&s, "api.example.com"),
        [ip("240.240.145.192"), ip("2001:2::91:c0")]
    );
    assert_eq!(
        vips(&s, "files.example.com"),
        [ip("240.240.13.69"), ip("2001:2::d:45")]
    );
    assert_eq!(
        vips(&s, "db.internal"),
        [ip("240.240.157.238"), ip("2001:2::9d:ee")]
    );
    assert_eq!(
        vips(&s, "broken.example.com"),
        [ip("240.240.194.34"), ip("2001:2::c2:22")]
    );
    for host in [
        "*.example.org",
        "10.9.0.7",
        "none.example.com",
        "out.example.com",
    ] {
        assert!(vips(&s, host).is_empty(), "{host}");
    }
    assert_eq!(
        vips(&s, "pinned.example.com"),
        [ip("240.240.9.9"), ip("2001:2::9:9")]
    );
    // They route: a lookup by address finds the host.
    let (_, by_vip) = s.service_by_vip(ip("2001:2::91:c0")).expect("by vip");
    assert_eq!(&*by_vip.hostname, "api.example.com");
    let w = s.warnings().join("\n");
    assert!(
        w.contains("status.addresses[0].value: \"not-an-ip\" is not an IP address"),
        "{w}"
    );

    // Another service holding the slot's address pushes the host to the next free slot.
    let taken = format!(
        "{entries}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: declared, namespace: default}}
spec:
  hosts: [declared.example.com]
  addresses: [240.240.145.192]
  ports: [{{number: 80, name: http}}]
  resolution: DNS
"
    );
    let s = snapshot(&taken);
    assert_eq!(
        vips(&s, "api.example.com"),
        [ip("240.240.145.193"), ip("2001:2::91:c1")]
    );
    assert_eq!(vips(&s, "declared.example.com"), [ip("240.240.145.192")]);
    assert_eq!(
        vips(&s, "files.example.com"),
        [ip("240.240.13.69"), ip("2001:2::d:45")],
        "the others stay"
    );
}
