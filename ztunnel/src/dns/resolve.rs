//! What a name means to a workload: a pure function of the snapshot, the asking workload and the
//! name, so every rule is a table test.
//!
//! As upstream ztunnel's proxy answers:
//! - a service's hostname (a Kubernetes Service's `name.ns.svc.cluster.local`, a ServiceEntry's
//!   host) gets its VIPs, or for a headless Kubernetes Service its endpoints' addresses, the
//!   not-ready ones too where it publishes them (a ServiceEntry host's VIPs include those
//!   allocated to it; one with none, whose resolution is `NONE` or which opted out of
//!   allocation, is the upstream resolver's);
//! - the short forms a client in namespace `ns` may use (`name`, `name.ns`, `name.ns.svc`) get
//!   the same;
//! - a pod behind a headless Kubernetes Service, by the name a StatefulSet's pods have
//!   (`pod.name.ns.svc.cluster.local`, and its short forms), gets the pod's addresses;
//! - a name a wildcard ServiceEntry host covers (`*.example.com` for `api.example.com`) is
//!   answered as that host, the most specific wildcard first;
//! - a name a stub resolver made by appending one of the pod's search domains (`ns.svc.cluster.local`,
//!   `svc.cluster.local`, `cluster.local`) to any of the above (`api.example.com.ns.svc.cluster.local`,
//!   `cart.shop.ns.svc.cluster.local`) is answered with a CNAME to the name before the suffix
//!   and its addresses, which spares the client the round trips of the rest of its search list;
//! - a known name with no address of the asked family gets an empty answer (not forwarded: the
//!   upstream resolver knows nothing of mesh names);
//! - anything else is the upstream resolver's.

use std::net::IpAddr;

use mesh::Snapshot;
use mesh::model::{Service, ServiceKind, Workload};

/// The address family a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `A`.
    V4,
    /// `AAAA`.
    V6,
}

impl Family {
    fn holds(self, ip: IpAddr) -> bool {
        match self {
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        }
    }
}

/// The answer to a query for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A mesh name: its addresses of the asked family (none: an empty answer).
    Mesh {
        /// The host whose addresses these are, when it is not the name asked: the answer then
        /// starts with a CNAME from the name to it.
        alias_of: Option<String>,
        /// The addresses.
        ips: Vec<IpAddr>,
    },
    /// Not a mesh name: the upstream resolver's.
    Forward,
}

/// The answer for `name` (any case, with or without the final dot) asked by `client`.
pub fn resolve(snapshot: &Snapshot, client: &Workload, name: &str, family: Family) -> Answer {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    match named(snapshot, client, &name, family) {
        Some(Named::Addresses(ips)) => {
            return Answer::Mesh {
                alias_of: None,
                ips,
            };
        }
        Some(Named::Upstream) => return Answer::Forward,
        None => {}
    }
    let domain = &snapshot.options().domain_suffix;
    let search = [
        format!("{}.svc.{domain}", client.namespace),
        format!("svc.{domain}"),
        domain.clone(),
    ];
    for suffix in &search {
        let Some(host) = name
            .strip_suffix(suffix.as_str())
            .and_then(|h| h.strip_suffix('.'))
        else {
            continue;
        };
        if let Some(Named::Addresses(ips)) = named(snapshot, client, host, family) {
            return Answer::Mesh {
                alias_of: Some(host.to_owned()),
                ips,
            };
        }
    }
    Answer::Forward
}

/// What a mesh name stands for.
enum Named {
    /// These addresses (of the asked family; perhaps none).
    Addresses(Vec<IpAddr>),
    /// A service the upstream resolver resolves (a ServiceEntry without VIPs).
    Upstream,
}

/// What `name` names for `client`, if the mesh knows it: a service by its host or a short form
/// of it, a wildcard ServiceEntry host that covers it, or a pod behind a headless service.
fn named(snapshot: &Snapshot, client: &Workload, name: &str, family: Family) -> Option<Named> {
    let service = (snapshot
        .resolve_host(name, &client.namespace)
        .map(|(_, s)| s))
    .or_else(|| wildcard(snapshot, name));
    if let Some(service) = service {
        return Some(match addresses(snapshot, service, family) {
            Some(ips) => Named::Addresses(ips),
            None => Named::Upstream,
        });
    }
    let pod = headless_pod(snapshot, client, name)?;
    Some(Named::Addresses(
        pod.ips
            .iter()
            .copied()
            .filter(|&ip| family.holds(ip))
            .collect(),
    ))
}

/// The pod `name` names as a member of a headless Kubernetes Service, as a StatefulSet's pods
/// are named: `<pod>.<service>.<ns>.svc.<domain>`, or the shorter `<pod>.<service>.<ns>.svc`,
/// `<pod>.<service>.<ns>`, and `<pod>.<service>` in the client's namespace.
///
/// As upstream, the pod is found by its name among the service's endpoints; the pod's own
/// `hostname` and `subdomain` are not consulted (the workload discovery protocol carries
/// neither). So this answers for any pod behind a headless service, where kube-dns answers
/// only for a pod whose `subdomain` names the service (a StatefulSet's always does).
fn headless_pod<'s>(snapshot: &'s Snapshot, client: &Workload, name: &str) -> Option<&'s Workload> {
    let domain = &snapshot.options().domain_suffix;
    let mut labels = name.splitn(4, '.');
    let (pod, service, namespace) = (labels.next()?, labels.next()?, labels.next());
    let namespace = match (namespace, labels.next()) {
        (None, _) => &*client.namespace,
        (Some(ns), None | Some("svc")) => ns,
        (Some(ns), Some(rest)) if rest.strip_prefix("svc.") == Some(domain.as_str()) => ns,
        _ => return None,
    };
    let (_, service) = snapshot.service_by_host(&format!("{service}.{namespace}.svc.{domain}"))?;
    if !service.vips.is_empty() || service.kind != ServiceKind::Kubernetes {
        return None;
    }
    (service.endpoints.iter())
        .map(|e| snapshot.workload(e.workload))
        .find(|w| &*w.name == pod)
}

/// The ServiceEntry whose wildcard host covers `name` (`*.example.com` for `api.example.com`),
/// the most specific first, as upstream looks them up: the leading labels replaced by `*`, one
/// at a time, each an exact lookup.
fn wildcard<'s>(snapshot: &'s Snapshot, name: &str) -> Option<&'s Service> {
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        if let Some((_, service)) = snapshot.service_by_host(&format!("*.{parent}")) {
            return Some(service);
        }
        rest = parent;
    }
    None
}

/// `service`'s addresses of `family`: its VIPs, or for a headless Kubernetes Service its
/// endpoints'. `None` when it has none to give (a ServiceEntry without VIPs, allocated or
/// declared), which is the upstream resolver's to answer.
fn addresses(snapshot: &Snapshot, service: &Service, family: Family) -> Option<Vec<IpAddr>> {
    let all: Vec<IpAddr> = match (service.vips.is_empty(), service.kind) {
        (false, _) => service.vips.to_vec(),
        (true, ServiceKind::Kubernetes) => (service.endpoints.iter())
            .flat_map(|e| snapshot.workload(e.workload).ips.iter().copied())
            .collect(),
        (true, ServiceKind::ServiceEntry { .. }) => return None,
    };
    if all.is_empty() {
        return None;
    }
    Some(all.into_iter().filter(|&ip| family.holds(ip)).collect())
}

#[cfg(test)]
mod tests {
    use mesh::Options;

    use super::*;

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
status: {podIP: 10.2.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIPs: [10.96.2.1, "fd00::2:1"], selector: {app: cart}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-0, namespace: shop, labels: {app: cart}}
status: {podIP: 10.2.0.6}
---
apiVersion: v1
kind: Service
metadata: {name: pay, namespace: billing}
spec: {clusterIP: 10.96.2.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
status: {podIP: 10.2.0.5}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [240.0.2.1]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: shop}
spec:
  hosts: ["*.wild.example.com", "*.deep.wild.example.com"]
  addresses: [240.0.2.7]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: deeper, namespace: shop}
spec:
  hosts: ["*.x.deep.wild.example.com"]
  addresses: [240.0.2.8]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: static-no-vip
  namespace: shop
  labels: {networking.istio.io/enable-autoallocate-ip: "false"}
spec:
  hosts: [db.example.net]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.2.0.9}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns-only, namespace: shop}
spec:
  hosts: [cdn.example.net]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
"#;

    #[test]
    fn names_resolve_as_upstream_ztunnel_answers_them() {
        let s = Snapshot::from_yaml("dns.yaml", MESH, &Options::default()).expect("valid mesh");
        let client = s
            .workload_by_ip("", "10.2.0.1".parse().expect("ip"))
            .expect("client");
        let ips = |list: &[&str]| -> Vec<IpAddr> {
            list.iter().map(|ip| ip.parse().expect("ip")).collect()
        };
        let mesh = |list: &[&str]| Answer::Mesh {
            alias_of: None,
            ips: ips(list),
        };
        let alias = |host: &str, list: &[&str]| Answer::Mesh {
            alias_of: Some(host.to_owned()),
            ips: ips(list),
        };
        let cases = [
            (
                "cart.shop.svc.cluster.local.",
                Family::V4,
                mesh(&["10.96.2.1"]),
            ),
            (
                "CART.Shop.svc.cluster.local",
                Family::V4,
                mesh(&["10.96.2.1"]),
            ),
            (
                "cart.shop.svc.cluster.local",
                Family::V6,
                mesh(&["fd00::2:1"]),
            ),
            ("cart", Family::V4, mesh(&["10.96.2.1"])),
            ("cart.shop", Family::V4, mesh(&["10.96.2.1"])),
            ("cart.shop.svc", Family::V4, mesh(&["10.96.2.1"])),
            ("pay.billing", Family::V4, mesh(&["10.96.2.2"])),
            ("pay.billing.svc.cluster.local", Family::V6, mesh(&[])),
            ("pay", Family::V4, Answer::Forward),
            ("db.shop.svc.cluster.local", Family::V4, mesh(&["10.2.0.5"])),
            ("api.example.com", Family::V4, mesh(&["240.0.2.1"])),
            ("api.example.com", Family::V6, mesh(&[])),
            (
                "api.example.com.shop.svc.cluster.local",
                Family::V4,
                alias("api.example.com", &["240.0.2.1"]),
            ),
            (
                "api.example.com.svc.cluster.local.",
                Family::V4,
                alias("api.example.com", &["240.0.2.1"]),
            ),
            (
                "api.example.com.cluster.local",
                Family::V4,
                alias("api.example.com", &["240.0.2.1"]),
            ),
            (
                "api.example.com.other.svc.cluster.local",
                Family::V4,
                Answer::Forward,
            ),
            // Allocated, as istiod allocates them.
            ("cdn.example.net", Family::V4, mesh(&["240.240.244.152"])),
            ("cdn.example.net", Family::V6, mesh(&["2001:2::f4:98"])),
            ("db.example.net", Family::V4, Answer::Forward),
            ("a.wild.example.com", Family::V4, mesh(&["240.0.2.7"])),
            ("a.b.wild.example.com", Family::V4, mesh(&["240.0.2.7"])),
            (
                "a.x.deep.wild.example.com",
                Family::V4,
                mesh(&["240.0.2.8"]),
            ),
            ("wild.example.com", Family::V4, Answer::Forward),
            (
                "a.wild.example.com.shop.svc.cluster.local",
                Family::V4,
                alias("a.wild.example.com", &["240.0.2.7"]),
            ),
            ("example.org", Family::V4, Answer::Forward),
            (
                "db-0.db.shop.svc.cluster.local",
                Family::V4,
                mesh(&["10.2.0.5"]),
            ),
            ("db-0.db.shop.svc", Family::V4, mesh(&["10.2.0.5"])),
            ("db-0.db.shop", Family::V4, mesh(&["10.2.0.5"])),
            ("db-0.db", Family::V4, mesh(&["10.2.0.5"])),
            ("db-0.db", Family::V6, mesh(&[])),
            (
                "db-0.db.shop.shop.svc.cluster.local",
                Family::V4,
                alias("db-0.db.shop", &["10.2.0.5"]),
            ),
            (
                "db-9.db.shop.svc.cluster.local",
                Family::V4,
                Answer::Forward,
            ),
            (
                "db-0.db.other.svc.cluster.local",
                Family::V4,
                Answer::Forward,
            ),
            ("db-0.db.shop.svc.example.org", Family::V4, Answer::Forward),
            (
                "cart-0.cart.shop.svc.cluster.local",
                Family::V4,
                Answer::Forward,
            ),
            (
                "pay.billing.shop.svc.cluster.local",
                Family::V4,
                alias("pay.billing", &["10.96.2.2"]),
            ),
            (
                "cart.shop.shop.svc.cluster.local.",
                Family::V4,
                alias("cart.shop", &["10.96.2.1"]),
            ),
            (
                "pay.shop.shop.svc.cluster.local",
                Family::V4,
                Answer::Forward,
            ),
            ("nope.shop.svc.cluster.local", Family::V4, Answer::Forward),
        ];
        for (name, family, want) in cases {
            assert_eq!(resolve(&s, client, name, family), want, "{name} {family:?}");
        }
    }
}
