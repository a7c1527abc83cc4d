//! The whole snapshot as JSON, for the proxies' `/config_dump`.
//!
//! Workloads, services and the policies ztunnel enforces are shown in upstream ztunnel's form
//! (camelCase, addresses as `network/ip`, endpoints keyed by workload uid), so the tools
//! operators already use against Istio's ztunnel (`istioctl ztunnel-config workloads`,
//! `services`, `policies`) read ours. What upstream's dump has no place for (waypoints, peer
//! authentication, plugins, the routing resources as written) follows under its own keys.

use std::net::IpAddr;

use serde_json::{Map, Value, json};

use super::{PolicyScope, Snapshot};
use crate::model::{
    PluginId, PolicyId, Protocol, Service, Target, Waypoint, WaypointId, Workload, WorkloadId,
};
use crate::resource::Resource;

/// The HBONE port upstream's dump names for a waypoint.
const HBONE_PORT: u16 = 15008;

impl Snapshot {
    /// Everything the snapshot holds: the resolved model (workloads with their services and
    /// waypoints, services with endpoints and subsets, waypoints with what they serve, policy
    /// scopes, plugins) and the routing and policy resources as written.
    pub fn dump(&self) -> Value {
        let workloads: Vec<Value> = self
            .workloads
            .iter()
            .map(|w| self.dump_workload(w))
            .collect();
        let services: Vec<Value> = self.services.iter().map(|s| self.dump_service(s)).collect();
        // Upstream's `policies` are the ones its ztunnel enforces, as enforced (HTTP attributes
        // lowered away); `authorizationPolicies` lists every policy and who enforces it.
        let policies: Vec<Value> = (self.policies.iter())
            .filter_map(|p| {
                let scope = match p.scope {
                    PolicyScope::Mesh => "Global",
                    PolicyScope::Namespace => "Namespace",
                    PolicyScope::Selector => "WorkloadSelector",
                    PolicyScope::Targets => return None,
                };
                Some(p.l4.as_ref()?.dump(scope))
            })
            .collect();
        let authorization_policies: Vec<Value> = (self.policies.iter())
            .map(|p| {
                json!({
                    "namespace": p.policy.namespace(),
                    "name": p.policy.name(),
                    "action": p.policy.action().as_str(),
                    "dryRun": p.policy.dry_run(),
                    "scope": p.scope,
                    "enforcedByZtunnel": p.l4.is_some() && p.scope != PolicyScope::Targets,
                })
            })
            .collect();
        // Serialized here, when asked for, rather than kept as JSON in every snapshot: a
        // reload would otherwise spend most of its time building and dropping JSON trees.
        let resources: Vec<&Resource> = self.sources.iter().map(|r| &r.resource).collect();
        json!({
            "version": self.version,
            "options": self.options,
            "workloads": workloads,
            "services": services,
            "policies": policies,
            "waypoints": self.waypoints.iter().map(|w| self.dump_waypoint(w)).collect::<Vec<_>>(),
            "authorizationPolicies": authorization_policies,
            "peerAuthentications": self.peer_authentications,
            "plugins": self.plugins,
            "resources": resources,
            "warnings": self.warnings,
        })
    }

    fn dump_workload(&self, w: &Workload) -> Value {
        let mut out = json!({
            "uid": &*w.uid,
            "workloadIps": w.ips.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
            "protocol": match w.protocol {
                Protocol::Hbone => "HBONE",
                Protocol::Tcp => "TCP",
            },
            "name": &*w.name,
            "namespace": &*w.namespace,
            "serviceAccount": w.identity.service_account(),
            "workloadName": &*w.workload_name,
            "workloadType": w.workload_type.to_string(),
            "canonicalName": &*w.canonical_name,
            "canonicalRevision": &*w.canonical_revision,
            "clusterId": &self.options.cluster_id,
            "trustDomain": w.identity.trust_domain(),
            "node": w.node.as_deref().unwrap_or_default(),
            "status": status(w.ready),
            "capacity": w.weight,
            // Ours beyond upstream's fields (named apart from its, so a reader of its form is
            // not misled): the resource it came from, the identity in full, labels, named
            // ports, whether it runs (an endpoint of a Service that publishes not-ready
            // addresses), the services it is an endpoint of.
            "kind": w.kind,
            "identity": w.identity.to_string(),
            "labels": w.labels,
            "namedPorts": w.named_ports.iter()
                .map(|(name, port)| (name.to_string(), json!(port)))
                .collect::<Map<_, _>>(),
            "running": w.running,
            "endpointOf": w.services.iter()
                .map(|&s| self.namespaced_hostname(self.service(s)))
                .collect::<Vec<_>>(),
        });
        if let Some(waypoint) = w.waypoint {
            out["waypoint"] = self.gateway_address(waypoint);
        }
        if !w.network.is_empty() {
            out["network"] = json!(&*w.network);
        }
        if !w.locality.is_empty() {
            let mut locality = Map::new();
            for (key, value) in [
                ("region", &w.locality.region),
                ("zone", &w.locality.zone),
                ("subzone", &w.locality.subzone),
            ] {
                if !value.is_empty() {
                    locality.insert(key.into(), json!(&**value));
                }
            }
            out["locality"] = Value::Object(locality);
        }
        if let Some(id) = w.waypoint_instance {
            let waypoint = self.waypoint(id);
            let name = format!("{}/{}", waypoint.namespace, waypoint.name);
            out["waypointInstance"] = json!(name);
        }
        if let Some(i) = w.peer_authentication {
            let pa = &self.peer_authentications[i];
            let name = format!("{}/{}", pa.namespace, pa.name);
            out["peerAuthentication"] = json!(name);
        }
        if let Some(hostname) = &w.hostname {
            out["hostname"] = json!(&**hostname);
        }
        if let Some(tunnel) = w.app_tunnel {
            let mut t = json!({"protocol": "PROXY"});
            if let Some(port) = tunnel.port {
                t["port"] = json!(port);
            }
            out["applicationTunnel"] = t;
        }
        // Those ztunnel enforces, as upstream lists them (not AUDIT ones).
        let names: Vec<String> = (w.selected_policies.iter())
            .map(|&p| self.policy(p))
            .filter(|p| p.l4.is_some())
            .map(|p| format!("{}/{}", p.policy.namespace(), p.policy.name()))
            .collect();
        if !names.is_empty() {
            out["authorizationPolicies"] = json!(names);
        }
        out
    }

    fn dump_service(&self, s: &Service) -> Value {
        // Service port → target port; a named target port is resolved per endpoint, so the
        // service-wide entry is 0 as in upstream's dump.
        let ports: Map<String, Value> = (s.ports.iter())
            .map(|p| {
                let target = match p.target {
                    Target::Number(n) => n,
                    Target::Named(_) => 0,
                };
                (p.port.to_string(), json!(target))
            })
            .collect();
        let service = self.namespaced_hostname(s);
        let endpoints: Map<String, Value> = (s.endpoints.iter())
            .map(|e| {
                let w = self.workload(e.workload);
                let ports: Map<String, Value> = (s.ports.iter().zip(&e.ports))
                    .filter(|&(_, &target)| target != 0)
                    .map(|(p, target)| (p.port.to_string(), json!(target)))
                    .collect();
                let mut endpoint = json!({
                    "workloadUid": &*w.uid,
                    "service": service,
                    "port": ports,
                    "status": status(w.ready),
                });
                if let Some(ip) = w.ips.first() {
                    endpoint["address"] = json!(network_address(&w.network, *ip));
                }
                (w.uid.to_string(), endpoint)
            })
            .collect();
        let mut out = json!({
            "name": &*s.name,
            "namespace": &*s.namespace,
            "hostname": &*s.hostname,
            "vips": s.vips.iter().map(|&ip| network_address(&self.options.network, ip)).collect::<Vec<_>>(),
            "ports": ports,
            "endpoints": endpoints,
            "subjectAltNames": s.subject_alt_names.iter().map(|n| &**n).collect::<Vec<_>>(),
            // Ours beyond upstream's fields: where it was declared, its labels, its ports with
            // their names and protocols (how the waypoint treats them), the policies and
            // plugins that target it, and the DestinationRule subsets with their members.
            "kind": s.kind,
            "labels": s.labels,
            "servicePorts": s.ports.iter().map(|p| json!({
                "port": p.port,
                "name": p.name.as_deref(),
                "targetPort": match &p.target {
                    Target::Number(n) => json!(n),
                    Target::Named(name) => json!(&**name),
                },
                "appProtocol": format!("{:?}", p.protocol),
            })).collect::<Vec<_>>(),
            "targetedBy": self.policy_names(&s.policies),
            "plugins": self.plugin_names(&s.plugins),
            "subsets": s.subsets.iter().map(|subset| json!({
                "name": &*subset.name,
                "endpoints": subset.endpoints.iter()
                    .map(|&i| &*self.workload(s.endpoints[i as usize].workload).uid)
                    .collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        let v4 = s.vips.iter().any(IpAddr::is_ipv4);
        let v6 = s.vips.iter().any(IpAddr::is_ipv6);
        let families = match (v4, v6) {
            (true, true) => Some("Dual"),
            (true, false) => Some("IPv4"),
            (false, true) => Some("IPv6"),
            (false, false) => None,
        };
        if let Some(families) = families {
            out["ipFamilies"] = json!(families);
        }
        if let Some(waypoint) = s.waypoint {
            out["waypoint"] = self.gateway_address(waypoint);
        }
        if let Some(lb) = &s.load_balancing {
            out["loadBalancer"] = json!({
                "mode": lb.mode,
                "routingPreferences": lb.routing_preference,
                "healthPolicy": lb.health_policy,
            });
        }
        out
    }

    /// A waypoint with what it serves, named rather than numbered.
    fn dump_waypoint(&self, w: &Waypoint) -> Value {
        let uids = |ids: &[WorkloadId]| -> Vec<String> {
            ids.iter()
                .map(|&i| self.workload(i).uid.to_string())
                .collect()
        };
        json!({
            "namespace": &*w.namespace,
            "name": &*w.name,
            "waypointFor": w.waypoint_for,
            "inboundBinding": w.inbound_binding,
            "service": w.service.map(|s| self.namespaced_hostname(self.service(s))),
            "loadBalancing": w.load_balancing,
            "instances": uids(&w.instances),
            "services": w.services.iter()
                .map(|&s| self.namespaced_hostname(self.service(s)))
                .collect::<Vec<_>>(),
            "workloads": uids(&w.workloads),
            "targetedBy": self.policy_names(&w.policies),
            "plugins": self.plugin_names(&w.plugins),
        })
    }

    /// The policies' `namespace/name`s.
    fn policy_names(&self, ids: &[PolicyId]) -> Vec<String> {
        (ids.iter())
            .map(|&p| {
                let p = &self.policy(p).policy;
                format!("{}/{}", p.namespace(), p.name())
            })
            .collect()
    }

    /// The plugins' `namespace/name`s.
    fn plugin_names(&self, ids: &[PluginId]) -> Vec<String> {
        (ids.iter())
            .map(|&p| {
                let p = self.plugin(p);
                format!("{}/{}", p.namespace, p.name)
            })
            .collect()
    }

    /// `namespace/hostname`, upstream's name for a service.
    fn namespaced_hostname(&self, s: &Service) -> String {
        format!("{}/{}", s.namespace, s.hostname)
    }

    /// Where a waypoint is reached, as upstream names it: its Service's VIP (which
    /// `istioctl` matches against the services' `vips`), else its Service's hostname, else the
    /// Gateway's `namespace/name`.
    fn gateway_address(&self, id: WaypointId) -> Value {
        let waypoint = self.waypoint(id);
        let service = waypoint.service.map(|s| self.service(s));
        let destination = match service {
            Some(s) => match s.vips.first() {
                Some(&vip) => network_address(&self.options.network, vip),
                None => self.namespaced_hostname(s),
            },
            None => format!("{}/{}", waypoint.namespace, waypoint.name),
        };
        json!({"destination": destination, "hboneMtlsPort": HBONE_PORT})
    }
}

/// `network/ip`, upstream's form of an address (an empty network is the default one).
fn network_address(network: &str, ip: IpAddr) -> String {
    format!("{network}/{ip}")
}

fn status(ready: bool) -> &'static str {
    if ready { "Healthy" } else { "Unhealthy" }
}
