//! The snapshot: one immutable, indexed picture of the mesh.
//!
//! Proxies hold an `Arc<Snapshot>` (from [`Store`](crate::Store)) and ask it questions on every
//! connection and request. Every lookup here is a hash probe or a slice walk: no lock, no
//! allocation. Anything that would need sorting or merging at lookup time is precomputed while
//! building, because a snapshot is built once per configuration change and read millions of
//! times.

mod allocate;
mod attach;
mod build;
mod destination_rules;
mod dump;
mod route_tables;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::authz::Policy;
use crate::model::{
    DestinationRuleId, Plugin, PluginId, PolicyId, Service, ServiceId, Waypoint, WaypointId,
    Workload, WorkloadId,
};
use crate::resource::MtlsMode;
use crate::route::{DestinationPolicy, RouteTable};
use route_tables::RouteTables;

pub(crate) use build::build;

/// Mesh-wide settings that are not in any resource, with Istio's defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Options {
    /// Trust domain of every identity (`cluster.local`).
    pub trust_domain: String,
    /// Namespace whose policies apply mesh-wide (`istio-system`).
    pub root_namespace: String,
    /// Cluster id used in workload uids (`Kubernetes`); shared, since every connection's
    /// access-log line carries it.
    pub cluster_id: Arc<str>,
    /// This proxy's network; workloads on other networks are indexed separately (empty).
    pub network: String,
    /// DNS suffix of Kubernetes service hostnames (`cluster.local`).
    pub domain_suffix: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
            cluster_id: "Kubernetes".into(),
            network: String::new(),
            domain_suffix: "cluster.local".to_owned(),
        }
    }
}

/// A compiled AuthorizationPolicy and how it is scoped.
#[derive(Debug)]
pub struct PolicyEntry {
    /// The policy as written, for the waypoint (L7).
    pub policy: Policy,
    /// The policy as ztunnel enforces it: HTTP attributes removed Istio's way; `None` for
    /// AUDIT, which ztunnel does not support.
    pub l4: Option<Policy>,
    /// What it attaches to.
    pub scope: PolicyScope,
}

/// Where an authorization policy applies.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum PolicyScope {
    /// Every workload in the mesh (root namespace, no selector): enforced by ztunnel.
    Mesh,
    /// Every workload in a namespace: enforced by ztunnel.
    Namespace,
    /// Workloads matching a selector: enforced by ztunnel.
    Selector,
    /// `targetRefs`: enforced by the waypoint serving the target.
    Targets,
}

/// A PeerAuthentication, resolved.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthEntry {
    /// Namespace.
    pub namespace: Arc<str>,
    /// Name.
    pub name: Arc<str>,
    /// Mode for all ports.
    pub mode: MtlsMode,
    /// Per-port modes.
    pub ports: Box<[(u16, MtlsMode)]>,
}

/// One immutable picture of the mesh.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) version: u64,
    pub(crate) options: Options,
    pub(crate) workloads: Vec<Workload>,
    pub(crate) services: Vec<Service>,
    pub(crate) waypoints: Vec<Waypoint>,
    pub(crate) policies: Vec<PolicyEntry>,
    pub(crate) peer_authentications: Vec<PeerAuthEntry>,
    pub(crate) plugins: Vec<Plugin>,
    pub(crate) destination_rules: destination_rules::DestinationRules,
    pub(crate) routes: HashMap<(ServiceId, u16), RouteTables>,
    pub(crate) index: Index,
    /// The routing and policy resources as written, shared with the parse cache, for
    /// `/config_dump`.
    pub(crate) sources: Vec<Arc<crate::resource::Located>>,
    pub(crate) warnings: Vec<String>,
}

/// Lookup tables; see [`Snapshot`]'s methods.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub(crate) namespaces: HashMap<Arc<str>, std::collections::BTreeMap<String, String>>,
    pub(crate) workload_by_ip: HashMap<IpAddr, WorkloadId>,
    pub(crate) workload_by_network_ip: HashMap<Arc<str>, HashMap<IpAddr, WorkloadId>>,
    pub(crate) workload_by_uid: HashMap<Arc<str>, WorkloadId>,
    pub(crate) workloads_by_node: HashMap<Arc<str>, Box<[WorkloadId]>>,
    pub(crate) service_by_vip: HashMap<IpAddr, ServiceId>,
    /// VIPs more than one service declares, with every one of them (the first as above).
    pub(crate) shared_vips: HashMap<IpAddr, Box<[ServiceId]>>,
    pub(crate) service_by_host: HashMap<Arc<str>, ServiceId>,
    pub(crate) service_by_name: HashMap<Arc<str>, HashMap<Arc<str>, ServiceId>>,
    pub(crate) waypoint_by_name: HashMap<Arc<str>, HashMap<Arc<str>, WaypointId>>,
    pub(crate) mesh_policies: Box<[PolicyId]>,
    pub(crate) namespace_policies: HashMap<Arc<str>, Box<[PolicyId]>>,
    pub(crate) waypoint_class_policies: Box<[PolicyId]>,
    pub(crate) mesh_peer_authentication: Option<usize>,
    pub(crate) namespace_peer_authentication: HashMap<Arc<str>, usize>,
}

const NO_POLICIES: &[PolicyId] = &[];

impl Snapshot {
    /// The configuration version; strictly increases with every applied change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The mesh-wide settings.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Problems that did not make the configuration invalid (a binding to a missing waypoint,
    /// an obsolete label, an IP used twice). Each was logged when the snapshot was built.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    // === workloads ===

    /// All workloads, ordered by uid.
    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    /// A workload by id.
    pub fn workload(&self, id: WorkloadId) -> &Workload {
        &self.workloads[id.index()]
    }

    /// The workload with address `ip` on `network` (empty = the default network).
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Workload> {
        let id = if network == self.options.network {
            self.index.workload_by_ip.get(&ip)
        } else {
            self.index
                .workload_by_network_ip
                .get(network)
                .and_then(|m| m.get(&ip))
        };
        id.map(|&id| self.workload(id))
    }

    /// The workload with Istio uid `uid`.
    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.index
            .workload_by_uid
            .get(uid)
            .map(|&id| self.workload(id))
    }

    /// The workloads scheduled on `node`.
    pub fn workloads_on_node(&self, node: &str) -> impl Iterator<Item = &Workload> {
        self.index
            .workloads_by_node
            .get(node)
            .map_or(&[][..], |ids| &ids[..])
            .iter()
            .map(|&id| self.workload(id))
    }

    // === services ===

    /// All services, ordered by namespace, name and host.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// A service by id.
    pub fn service(&self, id: ServiceId) -> &Service {
        &self.services[id.index()]
    }

    /// The service whose VIP is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<(ServiceId, &Service)> {
        self.index
            .service_by_vip
            .get(&ip)
            .map(|&id| (id, self.service(id)))
    }

    /// The service whose VIP is `ip`, as a caller in `namespace` sees it: where services of
    /// several namespaces declare the VIP, the caller's own namespace's, as upstream ztunnel
    /// prefers it; else the first.
    pub fn service_by_vip_from(
        &self,
        ip: IpAddr,
        namespace: &str,
    ) -> Option<(ServiceId, &Service)> {
        let mut all = self.services_by_vip(ip);
        let first = all.next()?;
        if &*first.1.namespace == namespace {
            return Some(first);
        }
        Some((all.find(|(_, s)| &*s.namespace == namespace)).unwrap_or(first))
    }

    /// Every service whose VIP is `ip`: the one [`Snapshot::service_by_vip`] finds first, then
    /// those of other namespaces (or hosts) that declare it too.
    pub fn services_by_vip(&self, ip: IpAddr) -> impl Iterator<Item = (ServiceId, &Service)> {
        let first = self.index.service_by_vip.get(&ip).copied();
        let shared = (self.index.shared_vips.get(&ip)).map_or(&[][..], |ids| &ids[1..]);
        (first.into_iter().chain(shared.iter().copied())).map(|id| (id, self.service(id)))
    }

    /// The service whose VIP is `ip` and which has port `port`, with that port's index (for
    /// [`Endpoint::target_port`](crate::model::Endpoint::target_port)).
    pub fn service_by_vip_port(
        &self,
        ip: IpAddr,
        port: u16,
    ) -> Option<(ServiceId, &Service, usize)> {
        let (id, service) = self.service_by_vip(ip)?;
        let (index, _) = service.port(port)?;
        Some((id, service, index))
    }

    /// The service with fully qualified hostname `host`.
    pub fn service_by_host(&self, host: &str) -> Option<(ServiceId, &Service)> {
        self.index
            .service_by_host
            .get(host)
            .map(|&id| (id, self.service(id)))
    }

    /// The Kubernetes Service `namespace/name`.
    pub fn service_by_name(&self, namespace: &str, name: &str) -> Option<(ServiceId, &Service)> {
        self.index
            .service_by_name
            .get(namespace)
            .and_then(|m| m.get(name))
            .map(|&id| (id, self.service(id)))
    }

    /// Resolves a hostname as a client in `namespace` would: the FQDN, `name.namespace`,
    /// `name.namespace.svc`, or a bare `name` in the client's namespace.
    pub fn resolve_host(&self, host: &str, namespace: &str) -> Option<(ServiceId, &Service)> {
        if let Some(found) = self.service_by_host(host) {
            return Some(found);
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        let mut parts = host.splitn(3, '.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => self.service_by_name(namespace, name),
            (Some(name), Some(ns), None) | (Some(name), Some(ns), Some("svc")) => {
                self.service_by_name(ns, name)
            }
            _ => None,
        }
    }

    // === waypoints ===

    /// All waypoints.
    pub fn waypoints(&self) -> &[Waypoint] {
        &self.waypoints
    }

    /// A waypoint by id.
    pub fn waypoint(&self, id: WaypointId) -> &Waypoint {
        &self.waypoints[id.index()]
    }

    /// The waypoint `namespace/name`.
    pub fn waypoint_by_name(&self, namespace: &str, name: &str) -> Option<(WaypointId, &Waypoint)> {
        self.index
            .waypoint_by_name
            .get(namespace)
            .and_then(|m| m.get(name))
            .map(|&id| (id, self.waypoint(id)))
    }

    /// The waypoint that service-addressed traffic to `service` must take.
    pub fn service_waypoint(&self, service: &Service) -> Option<&Waypoint> {
        service.waypoint.map(|id| self.waypoint(id))
    }

    /// The waypoint that workload-addressed traffic to `workload` must take.
    pub fn workload_waypoint(&self, workload: &Workload) -> Option<&Waypoint> {
        workload.waypoint.map(|id| self.waypoint(id))
    }

    /// The waypoint `workload` is an instance of.
    pub fn waypoint_of_instance(&self, workload: &Workload) -> Option<&Waypoint> {
        workload.waypoint_instance.map(|id| self.waypoint(id))
    }

    // === policy ===

    /// All authorization policies, ordered by namespace and name.
    pub fn policies(&self) -> &[PolicyEntry] {
        &self.policies
    }

    /// A policy by id.
    pub fn policy(&self, id: PolicyId) -> &PolicyEntry {
        &self.policies[id.index()]
    }

    /// The L4 policies ztunnel enforces for traffic to `workload`: mesh-wide, namespace-wide and
    /// those whose selector matches it, lowered as Istio's ztunnel lowers them.
    pub fn ztunnel_policies<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> impl Iterator<Item = &'a Policy> {
        let namespace = if *workload.namespace == *self.options.root_namespace {
            NO_POLICIES
        } else {
            self.index
                .namespace_policies
                .get(&*workload.namespace)
                .map_or(NO_POLICIES, |p| &p[..])
        };
        self.index
            .mesh_policies
            .iter()
            .chain(namespace)
            .chain(workload.selected_policies.iter())
            .filter_map(|&id| self.policy(id).l4.as_ref())
    }

    /// The L7 policies a waypoint enforces for a request to `service` (or to a workload, with
    /// `None`): those targeting the waypoint's Gateway, the service, and the `istio-waypoint`
    /// GatewayClass from the root namespace.
    pub fn waypoint_policies<'a>(
        &'a self,
        waypoint: &'a Waypoint,
        service: Option<&'a Service>,
    ) -> impl Iterator<Item = &'a Policy> {
        self.waypoint_policy_entries(waypoint, service)
            .map(|entry| &entry.policy)
    }

    /// The same policies as [`Snapshot::waypoint_policies`], lowered for a TCP port of the
    /// waypoint, where no HTTP attribute exists: the lowering ztunnel uses (ALLOW rules that
    /// need HTTP attributes never match, DENY rules keep their L4 parts). AUDIT is skipped.
    pub fn waypoint_l4_policies<'a>(
        &'a self,
        waypoint: &'a Waypoint,
        service: Option<&'a Service>,
    ) -> impl Iterator<Item = &'a Policy> {
        self.waypoint_policy_entries(waypoint, service)
            .filter_map(|entry| entry.l4.as_ref())
    }

    fn waypoint_policy_entries<'a>(
        &'a self,
        waypoint: &'a Waypoint,
        service: Option<&'a Service>,
    ) -> impl Iterator<Item = &'a PolicyEntry> {
        self.index
            .waypoint_class_policies
            .iter()
            .chain(waypoint.policies.iter())
            .chain(service.map_or(NO_POLICIES, |s| &s.policies[..]))
            .map(|&id| self.policy(id))
    }

    /// The effective mTLS mode for traffic to `workload` on `port`: the workload's own
    /// PeerAuthentication (port-level first), else its namespace's, else the mesh's, else
    /// PERMISSIVE. `UNSET` at one level defers to the next.
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> MtlsMode {
        let levels = [
            workload.peer_authentication,
            self.index
                .namespace_peer_authentication
                .get(&*workload.namespace)
                .copied(),
            self.index.mesh_peer_authentication,
        ];
        let mut first = true;
        for level in levels {
            let Some(pa) = level.map(|i| &self.peer_authentications[i]) else {
                first = false;
                continue;
            };
            if first
                && let Some(&(_, mode)) = pa.ports.iter().find(|(p, _)| *p == port)
                && mode != MtlsMode::Unset
            {
                return mode;
            }
            first = false;
            if pa.mode != MtlsMode::Unset {
                return pa.mode;
            }
        }
        MtlsMode::Permissive
    }

    // === routing and plugins ===

    /// The routes a waypoint in `proxy_namespace` applies to `service` port `port` (those of
    /// the service's namespace and its own, as exported to it); `None` means none applies and
    /// requests go to the service's endpoints.
    pub fn routes(
        &self,
        proxy_namespace: &str,
        service: ServiceId,
        port: u16,
    ) -> Option<&RouteTable> {
        self.routes.get(&(service, port))?.get(proxy_namespace)
    }

    /// The DestinationRule a waypoint in `proxy_namespace` applies to `service`, chosen as
    /// istiod chooses it: the waypoint's namespace first, then rules the service's namespace
    /// exports to it, then the root namespace's.
    pub fn destination_rule(
        &self,
        proxy_namespace: &str,
        service: &Service,
    ) -> Option<(DestinationRuleId, &DestinationPolicy)> {
        let (namespace, host) = (&service.namespace, &service.hostname);
        let id = (self.destination_rules).choose(proxy_namespace, namespace, host)?;
        Some((id, self.destination_rules.get(id)))
    }

    /// A plugin by id.
    pub fn plugin(&self, id: PluginId) -> &Plugin {
        &self.plugins[id.index()]
    }

    /// The plugins a waypoint runs for a request to `service` (or to a workload, with `None`),
    /// in execution order: by phase, then by priority (highest first). Service-targeted plugins
    /// are merged with the waypoint's own when the snapshot is built.
    pub fn waypoint_plugins<'a>(
        &'a self,
        waypoint: &'a Waypoint,
        service: Option<&'a Service>,
    ) -> impl Iterator<Item = &'a Plugin> {
        let ids = match service {
            Some(s) if !s.plugins.is_empty() => &s.plugins[..],
            _ => &waypoint.plugins[..],
        };
        ids.iter().map(|&id| self.plugin(id))
    }
}
