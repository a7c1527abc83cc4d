//! Building a snapshot from resources: lowering, cross-referencing and indexing.
//!
//! The order matters and follows the references: namespaces and waypoints first (bindings name
//! them), then workloads (services select them), then services and their endpoints, then
//! everything that attaches to services and workloads (destination rules, routes, policies,
//! peer authentication, plugins). Every problem is collected rather than returned at the first,
//! so one reload reports everything wrong with the configuration.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use hbone::Identity;
use hbone::headers::WorkloadType;

use super::{Index, Options, Snapshot};
use crate::error::{ConfigError, FieldError, Invalid, Origin};
use crate::model::locality::Distribution;
use crate::model::{
    self, AppTunnel, Binding, Endpoint, Interner, Labels, LoadBalancing, Locality, Protocol,
    Service, ServiceId, ServiceKind, ServicePort, Target, Waypoint, WaypointFor, WaypointId,
    WaypointLabels, Workload, WorkloadId, WorkloadKind,
};
use crate::resource::{
    GatewayClassSpec, GatewaySpec, Located, Object, ObjectMeta, PodSpec, PodStatus, Resource,
    ServiceEntrySpec, ServiceEntryStatus, ServiceSpec, TargetPort, WorkloadEntrySpec,
};

/// Label enrolling a namespace or pod in ambient mode.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Annotation of pods that already have a sidecar; ztunnel leaves them alone.
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Annotation istio-cni writes on a pod it captured (value `enabled`); written on a
/// WorkloadEntry or ServiceEntry, it says the endpoints sit behind a ztunnel.
const AMBIENT_REDIRECTION: &str = "ambient.istio.io/redirection";
/// Label of a workload that terminates HBONE itself: `http` among its comma-separated values.
const TUNNEL: &str = "networking.istio.io/tunnel";

/// Builds a snapshot from resources, in order, or reports every invalid resource.
pub(crate) fn build(
    resources: &[&Arc<Located>],
    options: &Options,
    version: u64,
) -> Result<Snapshot, ConfigError> {
    let mut b = Builder::new(options);
    let kinds = Kinds::sort(resources);
    b.namespaces(&kinds);
    b.nodes(&kinds);
    b.waypoints(&kinds.gateways, &kinds.gateway_classes);
    b.workloads(&kinds);
    b.services(&kinds);
    b.bind_waypoints(&kinds);
    super::attach::destination_rules(&mut b, &kinds.destination_rules);
    super::attach::routes(&mut b, &kinds);
    super::attach::policies(&mut b, &kinds.authorization_policies);
    super::attach::peer_authentications(&mut b, &kinds.peer_authentications);
    super::attach::plugins(&mut b, &kinds.wasm_plugins, &kinds.traffic_extensions);
    if !b.errors.is_empty() {
        return Err(ConfigError::Invalid(b.errors));
    }
    for warning in &b.warnings {
        tracing::warn!(version, "{warning}");
    }
    Ok(b.finish(resources, version))
}

/// Resources by kind, borrowed.
pub(super) struct Kinds<'r> {
    pub(super) namespaces: Vec<(&'r Origin, &'r Object<crate::resource::Empty>)>,
    pub(super) nodes: Vec<(&'r Origin, &'r Object<crate::resource::Empty>)>,
    pub(super) services: Vec<(&'r Origin, &'r Object<ServiceSpec>)>,
    pub(super) pods: Vec<(&'r Origin, &'r Object<PodSpec, PodStatus>)>,
    pub(super) workload_entries: Vec<(&'r Origin, &'r Object<WorkloadEntrySpec>)>,
    pub(super) service_entries: Vec<(&'r Origin, &'r Object<ServiceEntrySpec, ServiceEntryStatus>)>,
    pub(super) gateways: Vec<(&'r Origin, &'r Object<GatewaySpec>)>,
    pub(super) gateway_classes: Vec<(&'r Origin, &'r Object<GatewayClassSpec>)>,
    pub(super) http_routes: Vec<(&'r Origin, &'r Object<crate::route::HttpRouteSpec>)>,
    pub(super) virtual_services: Vec<(&'r Origin, &'r Object<crate::route::VirtualServiceSpec>)>,
    pub(super) destination_rules: Vec<(&'r Origin, &'r Object<crate::route::DestinationRuleSpec>)>,
    pub(super) authorization_policies: Vec<(
        &'r Origin,
        &'r Object<crate::authz::AuthorizationPolicySpec>,
    )>,
    pub(super) peer_authentications: Vec<(
        &'r Origin,
        &'r Object<crate::resource::PeerAuthenticationSpec>,
    )>,
    pub(super) wasm_plugins: Vec<(&'r Origin, &'r Object<crate::resource::WasmPluginSpec>)>,
    pub(super) traffic_extensions: Vec<(
        &'r Origin,
        &'r Object<crate::resource::TrafficExtensionSpec>,
    )>,
}

impl<'r> Kinds<'r> {
    fn sort(resources: &[&'r Arc<Located>]) -> Self {
        let mut k = Kinds {
            namespaces: Vec::new(),
            nodes: Vec::new(),
            services: Vec::new(),
            pods: Vec::new(),
            workload_entries: Vec::new(),
            service_entries: Vec::new(),
            gateways: Vec::new(),
            gateway_classes: Vec::new(),
            http_routes: Vec::new(),
            virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
            wasm_plugins: Vec::new(),
            traffic_extensions: Vec::new(),
        };
        for located in resources {
            let o = &located.origin;
            match &located.resource {
                Resource::Namespace(r) => k.namespaces.push((o, r)),
                Resource::Node(r) => k.nodes.push((o, r)),
                Resource::Service(r) => k.services.push((o, r)),
                Resource::Pod(r) => k.pods.push((o, r)),
                Resource::WorkloadEntry(r) => k.workload_entries.push((o, r)),
                Resource::ServiceEntry(r) => k.service_entries.push((o, r)),
                Resource::Gateway(r) => k.gateways.push((o, r)),
                Resource::GatewayClass(r) => k.gateway_classes.push((o, r)),
                Resource::HTTPRoute(r) => k.http_routes.push((o, r)),
                Resource::VirtualService(r) => k.virtual_services.push((o, r)),
                Resource::DestinationRule(r) => k.destination_rules.push((o, r)),
                Resource::AuthorizationPolicy(r) => k.authorization_policies.push((o, r)),
                Resource::PeerAuthentication(r) => k.peer_authentications.push((o, r)),
                Resource::WasmPlugin(r) => k.wasm_plugins.push((o, r)),
                Resource::TrafficExtension(r) => k.traffic_extensions.push((o, r)),
            }
        }
        k
    }
}

/// Work in progress: the model's vectors, the indexes, and the problems found so far.
pub(super) struct Builder<'o> {
    pub(super) options: &'o Options,
    pub(super) interner: Interner,
    pub(super) errors: Vec<Invalid>,
    pub(super) warnings: Vec<String>,
    pub(super) workloads: Vec<Workload>,
    pub(super) services: Vec<Service>,
    pub(super) waypoints: Vec<Waypoint>,
    pub(super) index: Index,
    pub(super) policies: Vec<super::PolicyEntry>,
    pub(super) peer_authentications: Vec<super::PeerAuthEntry>,
    pub(super) plugins: Vec<model::Plugin>,
    pub(super) destination_rules: super::destination_rules::DestinationRules,
    pub(super) routes: HashMap<(ServiceId, u16), super::RouteTables>,
    /// `(label key, value)` → workloads carrying it, for selector lookups.
    label_index: HashMap<(Arc<str>, Arc<str>), Vec<WorkloadId>>,
    /// Namespace → its workloads, for empty selectors.
    by_namespace: HashMap<Arc<str>, Vec<WorkloadId>>,
    /// Node → its locality, which its pods take.
    node_localities: HashMap<String, Locality>,
}

impl<'o> Builder<'o> {
    fn new(options: &'o Options) -> Self {
        Self {
            options,
            interner: Interner::default(),
            errors: Vec::new(),
            warnings: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            waypoints: Vec::new(),
            index: Index::default(),
            policies: Vec::new(),
            peer_authentications: Vec::new(),
            plugins: Vec::new(),
            destination_rules: Default::default(),
            routes: HashMap::new(),
            label_index: HashMap::new(),
            by_namespace: HashMap::new(),
            node_localities: HashMap::new(),
        }
    }

    /// Records a problem with a resource.
    pub(super) fn invalid<S, T>(
        &mut self,
        origin: &Origin,
        kind: &str,
        obj: &Object<S, T>,
        error: FieldError,
    ) {
        let (namespace, name) = (obj.metadata.namespace(), &obj.metadata.name);
        self.invalid_named(origin, kind, namespace, name, error);
    }

    /// [`Self::invalid`] for a resource known by kind, namespace and name.
    pub(super) fn invalid_named(
        &mut self,
        origin: &Origin,
        kind: &str,
        namespace: &str,
        name: &str,
        error: FieldError,
    ) {
        self.errors.push(Invalid {
            origin: origin.clone(),
            resource: format!("{kind} {namespace}/{name}"),
            error,
        });
    }

    /// Records a problem that does not invalidate the configuration.
    pub(super) fn warn(&mut self, message: String) {
        self.warnings.push(message);
    }

    /// Workloads in `namespace` (any namespace for `None`) whose labels match `selector`; an
    /// empty selector selects every workload in scope.
    pub(super) fn select(
        &self,
        namespace: Option<&str>,
        selector: &BTreeMap<String, String>,
    ) -> Vec<WorkloadId> {
        let in_scope = |id: &&WorkloadId| {
            namespace.is_none_or(|ns| *self.workloads[id.index()].namespace == *ns)
        };
        let Some((k, v)) = selector.iter().next() else {
            return match namespace {
                Some(ns) => self.by_namespace.get(ns).cloned().unwrap_or_default(),
                None => (0..self.workloads.len() as u32).map(WorkloadId).collect(),
            };
        };
        let key = (Arc::from(k.as_str()), Arc::from(v.as_str()));
        self.label_index
            .get(&key)
            .map(|ids| {
                ids.iter()
                    .filter(in_scope)
                    .filter(|id| self.workloads[id.index()].labels.matches(selector))
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The labels of `namespace` (empty when it is not declared).
    pub(super) fn namespace_labels(&self, namespace: &str) -> &BTreeMap<String, String> {
        self.index.namespaces.get(namespace).unwrap_or(&NO_LABELS)
    }

    // === namespaces and waypoints ===

    fn namespaces(&mut self, kinds: &Kinds<'_>) {
        for (_, ns) in &kinds.namespaces {
            let name = self.interner.get(&ns.metadata.name);
            self.index
                .namespaces
                .insert(name, ns.metadata.labels.clone());
        }
    }

    fn nodes(&mut self, kinds: &Kinds<'_>) {
        for (_, node) in &kinds.nodes {
            let locality = Locality::of_node(&node.metadata.labels, &mut self.interner);
            self.node_localities
                .insert(node.metadata.name.clone(), locality);
        }
    }

    fn waypoints(
        &mut self,
        gateways: &[(&Origin, &Object<GatewaySpec>)],
        classes: &[(&Origin, &Object<GatewayClassSpec>)],
    ) {
        let binding_field = format!("metadata.annotations[{}]", model::waypoint::INBOUND_BINDING);
        // Each class and its binding, checked once: its Gateways inherit the binding (and the
        // waypoint-for label) unless they set their own.
        let mut by_name = HashMap::new();
        for &(origin, class) in classes {
            let binding = match class
                .metadata
                .annotations
                .get(model::waypoint::INBOUND_BINDING)
                .map(|value| parse_inbound_binding(value))
            {
                None => Ok(None),
                Some(Ok(binding)) => Ok(binding),
                Some(Err(why)) => {
                    self.errors.push(Invalid {
                        origin: origin.clone(),
                        resource: format!("GatewayClass {}", class.metadata.name),
                        error: FieldError::new(binding_field.clone(), why),
                    });
                    Err(())
                }
            };
            by_name.insert(class.metadata.name.as_str(), (class, binding));
        }
        for &(origin, gw) in gateways {
            let class = by_name.get(gw.spec.gateway_class_name.as_str());
            // The Gateway's own binding wins over its class's, as in istiod.
            let inbound_binding = match gw
                .metadata
                .annotations
                .get(model::waypoint::INBOUND_BINDING)
            {
                Some(value) => match parse_inbound_binding(value) {
                    Ok(binding) => binding,
                    Err(why) => {
                        let error = FieldError::new(binding_field.clone(), why);
                        self.invalid(origin, "Gateway", gw, error);
                        continue;
                    }
                },
                None => match class.map(|(_, binding)| binding) {
                    Some(Ok(binding)) => *binding,
                    // Already reported against the class.
                    Some(Err(())) => continue,
                    None => None,
                },
            };
            // A waypoint is of class istio-waypoint, or sandwiched (a third party's waypoint,
            // such as kgateway's, whose class carries the binding).
            if gw.spec.gateway_class_name != model::waypoint::WAYPOINT_CLASS
                && inbound_binding.is_none()
            {
                continue;
            }
            // Which traffic: the Gateway's label, else its class's, as in istiod.
            let label = gw
                .metadata
                .labels
                .get(model::waypoint::WAYPOINT_FOR)
                .or_else(|| {
                    class.and_then(|(c, _)| c.metadata.labels.get(model::waypoint::WAYPOINT_FOR))
                });
            let Some(waypoint_for) = WaypointFor::parse(label.map(String::as_str)) else {
                self.invalid(
                    origin,
                    "Gateway",
                    gw,
                    FieldError::new(
                        format!("metadata.labels[{}]", model::waypoint::WAYPOINT_FOR),
                        format!("{label:?} is not valid; use service, workload, all or none"),
                    ),
                );
                continue;
            };
            if gw
                .metadata
                .annotations
                .contains_key(model::waypoint::FOR_SERVICE_ACCOUNT)
                || gw
                    .metadata
                    .labels
                    .contains_key(model::waypoint::FOR_SERVICE_ACCOUNT)
            {
                self.warn(format!(
                    "Gateway {}/{}: istio.io/for-service-account is obsolete since Istio 1.22 and \
                     is ignored; bind with the istio.io/use-waypoint label instead",
                    gw.metadata.namespace(),
                    gw.metadata.name
                ));
            }
            // Who may bind: the listener the binding names (by port, or the PROXY listener),
            // else the HBONE listener, as in istiod.
            let bound = inbound_binding.and_then(|b| {
                gw.spec.listeners.iter().find(|l| match b.port {
                    Some(port) => l.port == port,
                    None => l.protocol == model::waypoint::PROXY_LISTENER,
                })
            });
            let admits = bound
                .or_else(|| gw.spec.listeners.iter().find(|l| l.protocol == "HBONE"))
                .and_then(|l| l.allowed_routes.as_ref())
                .and_then(|a| a.namespaces.as_ref())
                .map_or(model::waypoint::Admission::Same, |n| {
                    match n.from.as_deref() {
                        Some("All") => model::waypoint::Admission::All,
                        Some("Selector") => model::waypoint::Admission::Selector(
                            n.selector
                                .as_ref()
                                .map(|s| s.match_labels.clone())
                                .unwrap_or_default(),
                        ),
                        _ => model::waypoint::Admission::Same,
                    }
                });
            // Istio generates the waypoint's Service with `PreferClose`, unless the Gateway's
            // infrastructure annotations carry a distribution of their own (any other value:
            // none).
            let generated = gw.spec.infrastructure.as_ref().map(|i| &i.annotations);
            let distribution = match generated.map(|a| Distribution::read(None, a)) {
                None | Some(Ok(None)) => Some(Distribution::SameZone),
                Some(Ok(Some(d))) => Some(d),
                Some(Err(_)) => None,
            };
            let load_balancing = LoadBalancing::for_service(false, distribution, false);
            let namespace = self.interner.get(gw.metadata.namespace());
            let name = self.interner.get(&gw.metadata.name);
            let id = WaypointId(self.waypoints.len() as u32);
            self.index
                .waypoint_by_name
                .entry(namespace.clone())
                .or_default()
                .insert(name.clone(), id);
            self.waypoints.push(Waypoint {
                namespace,
                name,
                waypoint_for,
                inbound_binding,
                service: None,
                load_balancing,
                instances: Box::default(),
                services: Box::default(),
                workloads: Box::default(),
                policies: Box::default(),
                plugins: Box::default(),
                admits,
            });
        }
    }

    fn waypoint_id(&self, namespace: &str, name: &str) -> Option<WaypointId> {
        self.index
            .waypoint_by_name
            .get(namespace)
            .and_then(|m| m.get(name))
            .copied()
    }

    // === workloads ===

    fn enrolled(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        match labels.get(DATAPLANE_MODE).map(String::as_str) {
            Some("none") => false,
            Some("ambient") => true,
            _ => {
                self.namespace_labels(namespace)
                    .get(DATAPLANE_MODE)
                    .map(String::as_str)
                    == Some("ambient")
            }
        }
    }

    fn identity(&self, namespace: &str, service_account: &str) -> Result<Identity, String> {
        Identity::new(&self.options.trust_domain, namespace, service_account)
            .map_err(|e| e.to_string())
    }

    fn workloads(&mut self, kinds: &Kinds<'_>) {
        let mut workloads = Vec::with_capacity(kinds.pods.len() + kinds.workload_entries.len());
        for &(origin, pod) in &kinds.pods {
            if let Some(w) = self.pod(origin, pod) {
                workloads.push(w);
            }
        }
        for &(origin, we) in &kinds.workload_entries {
            if let Some(w) = self.workload_entry(origin, we) {
                workloads.push(w);
            }
        }
        for &(origin, se) in &kinds.service_entries {
            for (i, ep) in se.spec.endpoints.iter().enumerate() {
                if let Some(w) = self.service_entry_endpoint(origin, se, i, ep) {
                    workloads.push(w);
                }
            }
            if resolves_hosts(&se.spec) {
                workloads.extend(self.service_entry_hosts(origin, se));
            }
        }
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        workloads.dedup_by(|a, b| a.uid == b.uid);
        for (i, w) in workloads.iter_mut().enumerate() {
            w.id = WorkloadId(i as u32);
        }
        self.workloads = workloads;
        self.index_workloads();
    }

    fn index_workloads(&mut self) {
        let mut by_node: HashMap<Arc<str>, Vec<WorkloadId>> = HashMap::new();
        let mut duplicates = Vec::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let id = WorkloadId(i as u32);
            self.index.workload_by_uid.insert(w.uid.clone(), id);
            for &ip in &w.ips {
                let map = if *w.network == *self.options.network {
                    &mut self.index.workload_by_ip
                } else {
                    self.index
                        .workload_by_network_ip
                        .entry(w.network.clone())
                        .or_default()
                };
                if let Some(&first) = map.get(&ip) {
                    duplicates.push((ip, first, id));
                } else {
                    map.insert(ip, id);
                }
            }
            if let Some(node) = &w.node {
                by_node.entry(node.clone()).or_default().push(id);
            }
            self.by_namespace
                .entry(w.namespace.clone())
                .or_default()
                .push(id);
            for (k, v) in w.labels.iter() {
                let key = (self.interner.get(k), self.interner.get(v));
                self.label_index.entry(key).or_default().push(id);
            }
        }
        self.index.workloads_by_node = by_node
            .into_iter()
            .map(|(k, v)| (k, v.into_boxed_slice()))
            .collect();
        for (ip, first, second) in duplicates {
            let (a, b) = (
                &self.workloads[first.index()].uid,
                &self.workloads[second.index()].uid,
            );
            let message =
                format!("{b} has address {ip}, already used by {a}; lookups by IP find {a}");
            self.warn(message);
        }
    }

    fn pod(&mut self, origin: &Origin, pod: &Object<PodSpec, PodStatus>) -> Option<Workload> {
        let meta = &pod.metadata;
        let namespace = meta.namespace();
        let sa = pod
            .spec
            .service_account_name
            .as_deref()
            .or(pod.spec.service_account.as_deref())
            .unwrap_or("default");
        let identity = match self.identity(namespace, sa) {
            Ok(id) => id,
            Err(e) => {
                self.invalid(
                    origin,
                    "Pod",
                    pod,
                    FieldError::new("spec.serviceAccountName", e),
                );
                return None;
            }
        };
        let listed: Vec<&str> = pod.status.pod_ips.iter().map(|p| p.ip.as_str()).collect();
        let ips = match parse_ips(
            pod.status.pod_ip.as_deref(),
            "status.podIP",
            &listed,
            |i| format!("status.podIPs[{i}].ip"),
            "an IP address",
        ) {
            Ok(ips) => ips,
            Err(e) => {
                self.invalid(origin, "Pod", pod, e);
                return None;
            }
        };
        // A pod that has not ended is running for a Service that publishes not-ready addresses
        // (Kubernetes' `ShouldPodBeInEndpoints`, istiod's terminal-pod check): a Pending pod
        // with an address too, such as a StatefulSet's whose init container looks for its peers.
        // Ready it is only once Running.
        let phase = pod.status.phase.as_deref();
        let running = !matches!(phase, Some("Succeeded" | "Failed"));
        let started = matches!(phase, None | Some("Running"));
        let not_unready = !pod
            .status
            .conditions
            .iter()
            .any(|c| c.condition_type == "Ready" && c.status != "True");
        let waypoint_instance = meta
            .labels
            .get(model::waypoint::GATEWAY_NAME)
            .and_then(|gw| self.waypoint_id(namespace, gw));
        // A waypoint's pods are not captured, unless it is sandwiched: then ztunnel terminates
        // their inbound HBONE and hands the tunnels over on the binding's port.
        let app_tunnel =
            waypoint_instance.and_then(|id| self.waypoints[id.index()].inbound_binding);
        let captured = !pod.spec.host_network
            && (waypoint_instance.is_none() || app_tunnel.is_some())
            && !meta.annotations.contains_key(SIDECAR_STATUS)
            && self.enrolled(namespace, &meta.labels);
        let named_ports = pod
            .spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|p| Some((self.interner.get(p.name.as_deref()?), p.container_port)))
            .collect();
        let workload = model::workload::workload_name_and_type(meta);
        let uid = format!("{}//Pod/{namespace}/{}", self.options.cluster_id, meta.name);
        let locality = (pod.spec.node_name.as_deref())
            .and_then(|n| self.node_localities.get(n))
            .cloned()
            .unwrap_or_default();
        Some(self.workload(
            WorkloadKind::Pod,
            uid,
            meta,
            &meta.labels,
            identity,
            ips,
            "",
            pod.spec.node_name.as_deref(),
            locality,
            captured,
            (running, started && not_unready),
            named_ports,
            1,
            workload,
            waypoint_instance,
        ))
        .map(|w| Workload {
            app_tunnel: app_tunnel.filter(|_| w.protocol == Protocol::Hbone),
            ..w
        })
    }

    fn workload_entry(
        &mut self,
        origin: &Origin,
        we: &Object<WorkloadEntrySpec>,
    ) -> Option<Workload> {
        let meta = &we.metadata;
        let namespace = meta.namespace();
        let sa = non_empty(&we.spec.service_account).unwrap_or("default");
        let identity = match self.identity(namespace, sa) {
            Ok(id) => id,
            Err(e) => {
                self.invalid(
                    origin,
                    "WorkloadEntry",
                    we,
                    FieldError::new("spec.serviceAccount", e),
                );
                return None;
            }
        };
        let Ok(ip) = we.spec.address.parse::<IpAddr>() else {
            self.invalid(
                origin,
                "WorkloadEntry",
                we,
                FieldError::new(
                    "spec.address",
                    format!(
                        "{:?} is not an IP address (hostnames are not resolved)",
                        we.spec.address
                    ),
                ),
            );
            return None;
        };
        let mut labels = meta.labels.clone();
        labels.extend(we.spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        let captured = tunnelled(meta);
        let named_ports = we
            .spec
            .ports
            .iter()
            .map(|(n, &p)| (self.interner.get(n), p))
            .collect();
        let uid = format!(
            "{}/networking.istio.io/WorkloadEntry/{namespace}/{}",
            self.options.cluster_id, meta.name
        );
        let locality = Locality::parse(&we.spec.locality, &mut self.interner);
        Some(self.workload(
            WorkloadKind::WorkloadEntry,
            uid,
            meta,
            &labels,
            identity,
            vec![ip],
            &we.spec.network,
            None,
            locality,
            captured,
            (true, true),
            named_ports,
            we.spec.weight.unwrap_or(1),
            (&meta.name, WorkloadType::Pod),
            None,
        ))
    }

    fn service_entry_endpoint(
        &mut self,
        origin: &Origin,
        se: &Object<ServiceEntrySpec, ServiceEntryStatus>,
        index: usize,
        ep: &crate::resource::ServiceEntryEndpoint,
    ) -> Option<Workload> {
        let meta = &se.metadata;
        let namespace = meta.namespace();
        let sa = non_empty(&ep.service_account).unwrap_or("default");
        let field = |f: &str| format!("spec.endpoints[{index}].{f}");
        let identity = match self.identity(namespace, sa) {
            Ok(id) => id,
            Err(e) => {
                self.invalid(
                    origin,
                    "ServiceEntry",
                    se,
                    FieldError::new(field("serviceAccount"), e),
                );
                return None;
            }
        };
        let (ips, hostname) = match ep.address.parse::<IpAddr>() {
            Ok(ip) => (vec![ip], None),
            Err(_) if resolved_by_dns(&se.spec) && is_dns_name(&ep.address) => (
                Vec::new(),
                Some(Arc::<str>::from(ep.address.to_ascii_lowercase())),
            ),
            Err(_) => {
                let why = if resolved_by_dns(&se.spec) {
                    "is neither an IP address nor a DNS name"
                } else {
                    "is not an IP address (a DNS name needs `resolution: DNS`)"
                };
                self.invalid(
                    origin,
                    "ServiceEntry",
                    se,
                    FieldError::new(field("address"), format!("{:?} {why}", ep.address)),
                );
                return None;
            }
        };
        let named_ports = ep
            .ports
            .iter()
            .map(|(n, &p)| (self.interner.get(n), p))
            .collect();
        let at = match (ips.first(), &hostname) {
            (Some(ip), _) => ip.to_string(),
            (None, Some(name)) => name.to_string(),
            (None, None) => String::new(),
        };
        let uid = format!(
            "{}/networking.istio.io/ServiceEntry/{namespace}/{}/{at}",
            self.options.cluster_id, meta.name
        );
        // A name is reached with plain TCP at what it resolves to: there is no pod address to
        // find its ztunnel by.
        let captured = hostname.is_none() && tunnelled(meta);
        let locality = Locality::parse(&ep.locality, &mut self.interner);
        let w = self.workload(
            WorkloadKind::ServiceEntry,
            uid,
            meta,
            &ep.labels,
            identity,
            ips,
            &ep.network,
            None,
            locality,
            captured,
            (true, true),
            named_ports,
            ep.weight.unwrap_or(1),
            (&meta.name, WorkloadType::Pod),
            None,
        );
        // A name has no address and is ready all the same: it is resolved when chosen.
        Some(Workload {
            ready: w.ready || hostname.is_some(),
            running: w.running || hostname.is_some(),
            hostname,
            ..w
        })
    }

    /// A `resolution: DNS` ServiceEntry without endpoints or a selector: each host is its own
    /// endpoint, resolved when chosen (or, written as an address, that address), as istiod
    /// describes it to ztunnel. A wildcard host names nothing to resolve: it is left without
    /// endpoints, with a warning (Istio's admission webhook refuses it).
    fn service_entry_hosts(
        &mut self,
        origin: &Origin,
        se: &Object<ServiceEntrySpec, ServiceEntryStatus>,
    ) -> Vec<Workload> {
        let mut hosts = Vec::new();
        for (i, host) in se.spec.hosts.iter().enumerate() {
            if !is_dns_name(host) && host.parse::<IpAddr>().is_err() {
                self.warn(format!(
                    "ServiceEntry {}/{}: host {host:?} has no endpoints: with `resolution: DNS` \
                     and no endpoints each host must be a DNS name",
                    se.metadata.namespace(),
                    se.metadata.name
                ));
                continue;
            }
            let endpoint = crate::resource::ServiceEntryEndpoint {
                address: host.clone(),
                ..Default::default()
            };
            hosts.extend(self.service_entry_endpoint(origin, se, i, &endpoint));
        }
        hosts
    }

    #[allow(clippy::too_many_arguments)] // one constructor for three kinds of workload
    fn workload(
        &mut self,
        kind: WorkloadKind,
        uid: String,
        meta: &crate::resource::ObjectMeta,
        labels: &BTreeMap<String, String>,
        identity: Identity,
        ips: Vec<IpAddr>,
        network: &str,
        node: Option<&str>,
        locality: Locality,
        captured: bool,
        // Whether it runs, and whether it is ready when it does.
        (running, ready): (bool, bool),
        named_ports: Vec<(Arc<str>, u16)>,
        weight: u32,
        (workload_name, workload_type): (&str, WorkloadType),
        waypoint_instance: Option<WaypointId>,
    ) -> Workload {
        // Named by the object's own labels, as istiod names them: a ServiceEntry's endpoints,
        // its implicit host endpoints included, by the entry's, not by their own.
        let first = |keys: [&str; 3], fallback: &str| {
            keys.iter()
                .find_map(|k| meta.labels.get(*k))
                .map_or(fallback, String::as_str)
                .to_owned()
        };
        let canonical_name = first(model::workload::CANONICAL_NAME, workload_name);
        let canonical_revision = first(model::workload::CANONICAL_REVISION, "latest");
        if labels.contains_key(model::waypoint::FOR_SERVICE_ACCOUNT)
            || meta
                .annotations
                .contains_key(model::waypoint::FOR_SERVICE_ACCOUNT)
        {
            self.warn(format!(
                "{uid}: istio.io/for-service-account is obsolete since Istio 1.22 and is ignored"
            ));
        }
        let running = running && !ips.is_empty();
        let ready = running && ready;
        Workload {
            id: WorkloadId(0),
            uid: uid.into(),
            kind,
            name: self.interner.get(&meta.name),
            namespace: self.interner.get(meta.namespace()),
            identity,
            ips: ips.into_boxed_slice(),
            hostname: None,
            // Unlabelled workloads (pods, entries without one) are on this proxy's network.
            network: self.interner.get(if network.is_empty() {
                &self.options.network
            } else {
                network
            }),
            node: node.map(|n| self.interner.get(n)),
            locality,
            labels: Labels::new(
                labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                &mut self.interner,
            ),
            protocol: if captured {
                Protocol::Hbone
            } else {
                Protocol::Tcp
            },
            ready,
            running,
            named_ports: named_ports.into_boxed_slice(),
            weight,
            workload_name: self.interner.get(workload_name),
            workload_type,
            canonical_name: self.interner.get(&canonical_name),
            canonical_revision: self.interner.get(&canonical_revision),
            waypoint: None,
            waypoint_instance,
            app_tunnel: None,
            services: Box::default(),
            selected_policies: Box::default(),
            peer_authentication: None,
        }
    }

    // === services ===

    fn services(&mut self, kinds: &Kinds<'_>) {
        // Each with whether it wants addresses allocated.
        let mut services: Vec<(Service, bool)> = Vec::new();
        for &(origin, svc) in &kinds.services {
            if let Some(s) = self.kube_service(origin, svc) {
                services.push((s, false));
            }
        }
        for &(origin, se) in &kinds.service_entries {
            services.extend(self.service_entry(origin, se));
        }
        services.sort_by(|(a, _), (b, _)| {
            (&a.namespace, &a.name, &a.hostname).cmp(&(&b.namespace, &b.name, &b.hostname))
        });
        for host in super::allocate::assign(&mut services) {
            self.warnings.push(format!(
                "{host}: every address of 240.240.0.0/16 is taken; it gets none"
            ));
        }
        let services: Vec<Service> = services.into_iter().map(|(s, _)| s).collect();
        let mut memberships: Vec<Vec<ServiceId>> = vec![Vec::new(); self.workloads.len()];
        let mut shared_vips: HashMap<IpAddr, Vec<ServiceId>> = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            let id = ServiceId(i as u32);
            for &vip in &s.vips {
                if let Some(&first) = self.index.service_by_vip.get(&vip) {
                    let sharers = shared_vips.entry(vip).or_insert_with(|| vec![first]);
                    // A caller finds its namespace's first service of the VIP, and a caller in a
                    // namespace without one the VIP's first service.
                    let name = |id: &ServiceId| {
                        let s = &services[id.index()];
                        format!("{}/{}", s.namespace, s.hostname)
                    };
                    let found = match (sharers.iter())
                        .find(|o| services[o.index()].namespace == s.namespace)
                    {
                        Some(ahead) => format!("lookups by VIP find {}", name(ahead)),
                        None => format!(
                            "callers in namespace {} find it by VIP, callers in namespaces \
                             without a service of that VIP find {}",
                            s.namespace,
                            name(&first)
                        ),
                    };
                    self.warnings.push(format!(
                        "{} has VIP {vip}, already used by {}; {found}",
                        name(&id),
                        name(&first)
                    ));
                    sharers.push(id);
                } else {
                    self.index.service_by_vip.insert(vip, id);
                }
            }
            if self
                .index
                .service_by_host
                .insert(s.hostname.clone(), id)
                .is_some()
            {
                self.warnings.push(format!(
                    "hostname {} is declared more than once; lookups find {}/{}",
                    s.hostname, s.namespace, s.name
                ));
            }
            if s.kind == ServiceKind::Kubernetes {
                self.index
                    .service_by_name
                    .entry(s.namespace.clone())
                    .or_default()
                    .insert(s.name.clone(), id);
            }
            for ep in &s.endpoints {
                memberships[ep.workload.index()].push(id);
            }
        }
        for (w, m) in self.workloads.iter_mut().zip(memberships) {
            w.services = m.into_boxed_slice();
        }
        self.index.shared_vips = (shared_vips.into_iter())
            .map(|(vip, ids)| (vip, ids.into_boxed_slice()))
            .collect();
        self.services = services;
    }

    fn kube_service(&mut self, origin: &Origin, svc: &Object<ServiceSpec>) -> Option<Service> {
        if svc.spec.service_type.as_deref() == Some("ExternalName") {
            return None;
        }
        let meta = &svc.metadata;
        let namespace = meta.namespace();
        let listed: Vec<&str> = svc.spec.cluster_ips.iter().map(String::as_str).collect();
        let vips = match parse_ips(
            svc.spec.cluster_ip.as_deref(),
            "spec.clusterIP",
            &listed,
            |i| format!("spec.clusterIPs[{i}]"),
            "an IP address or \"None\"",
        ) {
            Ok(vips) => vips,
            Err(e) => {
                self.invalid(origin, "Service", svc, e);
                return None;
            }
        };
        let ports: Vec<ServicePort> = svc
            .spec
            .ports
            .iter()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .map(|p| ServicePort {
                name: p.name.as_deref().map(|n| self.interner.get(n)),
                port: p.port,
                target: match &p.target_port {
                    None => Target::Number(p.port),
                    Some(TargetPort::Number(n)) => Target::Number(*n),
                    Some(TargetPort::Name(name)) => match name.parse::<u16>() {
                        Ok(n) => Target::Number(n),
                        Err(_) => Target::Named(self.interner.get(name)),
                    },
                },
                protocol: model::app_protocol(p.app_protocol.as_deref(), p.name.as_deref()),
            })
            .collect();
        let local = svc.spec.internal_traffic_policy.as_deref() == Some("Local");
        let distribution =
            self.distribution("Service", meta, svc.spec.traffic_distribution.as_deref());
        // As Kubernetes marks them for such a Service, and istiod's `ALLOW_ALL` health policy
        // tells ztunnel: its running endpoints count as ready (a StatefulSet's peers find each
        // other through its headless Service before any of them is ready).
        let publish_not_ready = svc.spec.publish_not_ready_addresses;
        let endpoints = if svc.spec.selector.is_empty() {
            Vec::new()
        } else {
            self.select(Some(namespace), &svc.spec.selector)
                .into_iter()
                .filter(|id| {
                    let w = &self.workloads[id.index()];
                    w.ready || (publish_not_ready && w.running)
                })
                .map(|id| {
                    let w = &self.workloads[id.index()];
                    Endpoint {
                        workload: id,
                        ports: ports
                            .iter()
                            .map(|p| match &p.target {
                                Target::Number(n) => *n,
                                Target::Named(name) => w.named_port(name).unwrap_or(0),
                            })
                            .collect(),
                    }
                })
                .collect()
        };
        Some(Service {
            name: self.interner.get(&meta.name),
            namespace: self.interner.get(namespace),
            hostname: format!(
                "{}.{namespace}.svc.{}",
                meta.name, self.options.domain_suffix
            )
            .into(),
            kind: ServiceKind::Kubernetes,
            vips: vips.into_boxed_slice(),
            ports: ports.into_boxed_slice(),
            labels: Labels::new(
                meta.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                &mut self.interner,
            ),
            endpoints: endpoints.into_boxed_slice(),
            subsets: Box::default(),
            waypoint: None,
            load_balancing: LoadBalancing::for_service(local, distribution, publish_not_ready),
            subject_alt_names: Box::default(),
            policies: Box::default(),
            plugins: Box::default(),
        })
    }

    /// A service's traffic distribution; one neither Kubernetes nor Istio knows is a warning,
    /// and the service uses any endpoint, as istiod does.
    fn distribution(
        &mut self,
        kind: &str,
        meta: &ObjectMeta,
        spec: Option<&str>,
    ) -> Option<Distribution> {
        Distribution::read(spec, &meta.annotations).unwrap_or_else(|value| {
            self.warn(format!(
                "{kind} {}/{}: traffic distribution {value:?} is not PreferSameZone, \
                 PreferClose or PreferSameNode; any endpoint is used",
                meta.namespace(),
                meta.name
            ));
            None
        })
    }

    /// The services of `se`, one per host, each with whether it wants addresses allocated.
    fn service_entry(
        &mut self,
        origin: &Origin,
        se: &Object<ServiceEntrySpec, ServiceEntryStatus>,
    ) -> Vec<(Service, bool)> {
        let meta = &se.metadata;
        let namespace = meta.namespace();
        let internal = match se.spec.location.as_deref() {
            None | Some("MESH_EXTERNAL") => false,
            Some("MESH_INTERNAL") => true,
            Some(other) => {
                self.invalid(
                    origin,
                    "ServiceEntry",
                    se,
                    FieldError::new(
                        "spec.location",
                        format!("{other:?} is not valid; use MESH_INTERNAL or MESH_EXTERNAL"),
                    ),
                );
                return Vec::new();
            }
        };
        if se.spec.hosts.is_empty() {
            self.invalid(
                origin,
                "ServiceEntry",
                se,
                FieldError::new("spec.hosts", "at least one host is required"),
            );
            return Vec::new();
        }
        let mut vips = Vec::new();
        for (i, address) in se.spec.addresses.iter().enumerate() {
            match entry_vip(address) {
                Some(Vip::Single(ip)) => vips.push(ip),
                // A service address is one address: ztunnel matches them exactly, and istiod
                // gives it no ranges either (such an entry is ignored, istio/istio#59173). We keep
                // the entry and its single addresses, and say what is not captured.
                Some(Vip::Range) => self.warn(format!(
                    "{origin}: ServiceEntry {namespace}/{}: spec.addresses[{i}]: {address:?} is a \
                     range; ambient mode gives a service single addresses only, so it is ignored",
                    se.metadata.name
                )),
                None => {
                    self.invalid(
                        origin,
                        "ServiceEntry",
                        se,
                        FieldError::new(
                            format!("spec.addresses[{i}]"),
                            format!("{address:?} is not an IP address or CIDR block"),
                        ),
                    );
                    return Vec::new();
                }
            }
        }
        let ports: Vec<ServicePort> = se
            .spec
            .ports
            .iter()
            .map(|p| ServicePort {
                name: non_empty(&p.name).map(|n| self.interner.get(n)),
                port: p.number,
                target: Target::Number(entry_target_port(p)),
                protocol: model::app_protocol(p.protocol.as_deref(), non_empty(&p.name)),
            })
            .collect();
        let mut members: Vec<WorkloadId> = match &se.spec.workload_selector {
            Some(sel) => self.select(Some(namespace), &sel.labels),
            None => Vec::new(),
        };
        let inline_prefix = format!(
            "{}/networking.istio.io/ServiceEntry/{namespace}/{}/",
            self.options.cluster_id, meta.name
        );
        members.extend(
            self.workloads
                .iter()
                .enumerate()
                .filter(|(_, w)| w.uid.starts_with(&inline_prefix))
                .map(|(i, _)| WorkloadId(i as u32)),
        );
        members.sort();
        members.dedup();
        let endpoints: Box<[Endpoint]> = members
            .into_iter()
            .filter(|id| self.workloads[id.index()].ready)
            .map(|id| {
                let w = &self.workloads[id.index()];
                Endpoint {
                    workload: id,
                    ports: se
                        .spec
                        .ports
                        .iter()
                        .map(|p| {
                            w.named_port(&p.name)
                                .unwrap_or_else(|| entry_target_port(p))
                        })
                        .collect(),
                }
            })
            .collect();
        let labels = Labels::new(
            meta.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &mut self.interner,
        );
        // With `resolution: NONE` (the default) istiod has ztunnel pick no endpoint, so no
        // traffic distribution applies either.
        let load_balancing = if passes_through(&se.spec) {
            Some(LoadBalancing::passthrough())
        } else {
            LoadBalancing::for_service(false, self.distribution("ServiceEntry", meta, None), false)
        };
        let sans: Box<[Arc<str>]> = se
            .spec
            .subject_alt_names
            .iter()
            .map(|s| Arc::from(&**s))
            .collect();
        // Hosts that are their own endpoints each get theirs only.
        let by_host = resolves_hosts(&se.spec);
        let endpoints_of = |host: &str| -> Box<[Endpoint]> {
            if !by_host {
                return endpoints.clone();
            }
            let (name, ip) = (host.to_ascii_lowercase(), host.parse::<IpAddr>().ok());
            (endpoints.iter())
                .filter(|e| {
                    let w = &self.workloads[e.workload.index()];
                    w.hostname.as_deref() == Some(name.as_str())
                        || ip.is_some_and(|ip| w.ips.first() == Some(&ip))
                })
                .cloned()
                .collect()
        };
        let hosts: Vec<(&String, Box<[Endpoint]>)> = (se.spec.hosts.iter())
            .map(|h| (h, endpoints_of(h)))
            .collect();
        // Only an entry that names no address wants one allocated, as in istiod: one whose
        // addresses were all ranges keeps none.
        let allocated = se.spec.addresses.is_empty() && allocates(se);
        hosts
            .into_iter()
            .map(|(host, endpoints)| {
                let named = !host.starts_with('*') && host.parse::<IpAddr>().is_err();
                let (vips, wanted) = if allocated && named {
                    self.allocated(origin, se, host)
                } else {
                    (vips.clone(), false)
                };
                let service = Service {
                    name: self.interner.get(&meta.name),
                    namespace: self.interner.get(namespace),
                    hostname: Arc::from(host.as_str()),
                    kind: ServiceKind::ServiceEntry { internal },
                    vips: vips.into_boxed_slice(),
                    ports: ports.clone().into_boxed_slice(),
                    labels: labels.clone(),
                    endpoints,
                    subsets: Box::default(),
                    waypoint: None,
                    load_balancing: load_balancing.clone(),
                    subject_alt_names: sans.clone(),
                    policies: Box::default(),
                    plugins: Box::default(),
                };
                (service, wanted)
            })
            .collect()
    }

    /// The addresses `status.addresses` holds for `host` of `se`, which allocation wrote and
    /// which stay; none: it wants them allocated.
    fn allocated(
        &mut self,
        origin: &Origin,
        se: &Object<ServiceEntrySpec, ServiceEntryStatus>,
        host: &str,
    ) -> (Vec<IpAddr>, bool) {
        let mut kept = Vec::new();
        for (i, a) in se.status.addresses.iter().enumerate() {
            if !a.host.eq_ignore_ascii_case(host) {
                continue;
            }
            match a.value.parse::<IpAddr>() {
                Ok(ip) => kept.push(ip),
                Err(_) => self.warn(format!(
                    "{origin}: ServiceEntry {}/{}: status.addresses[{i}].value: {:?} is not an \
                     IP address; {host} gets an address of its own",
                    se.metadata.namespace(),
                    se.metadata.name,
                    a.value
                )),
            }
        }
        let wanted = kept.is_empty();
        (kept, wanted)
    }

    // === waypoint bindings ===

    fn bind_waypoints(&mut self, kinds: &Kinds<'_>) {
        // Waypoint instances and the waypoint's own Service.
        let mut instances: Vec<Vec<WorkloadId>> = vec![Vec::new(); self.waypoints.len()];
        for (i, w) in self.workloads.iter().enumerate() {
            if let Some(wp) = w.waypoint_instance {
                instances[wp.index()].push(WorkloadId(i as u32));
            }
        }
        for (wp, inst) in self.waypoints.iter_mut().zip(instances) {
            wp.instances = inst.into_boxed_slice();
            wp.service = self
                .index
                .service_by_name
                .get(&wp.namespace)
                .and_then(|m| m.get(&wp.name))
                .copied();
            if let Some(service) = wp.service {
                wp.load_balancing = self.services[service.index()].load_balancing.clone();
            }
        }
        let waypoint_services: Vec<Option<ServiceId>> =
            self.waypoints.iter().map(|w| w.service).collect();

        // Services: labels on the Service (or ServiceEntry), else on its namespace.
        let mut service_labels: HashMap<(&str, &str), &BTreeMap<String, String>> = HashMap::new();
        for (_, s) in &kinds.services {
            service_labels.insert(
                (s.metadata.namespace(), &s.metadata.name),
                &s.metadata.labels,
            );
        }
        for (_, s) in &kinds.service_entries {
            service_labels.insert(
                (s.metadata.namespace(), &s.metadata.name),
                &s.metadata.labels,
            );
        }
        let mut bound_services: Vec<Vec<ServiceId>> = vec![Vec::new(); self.waypoints.len()];
        for i in 0..self.services.len() {
            let id = ServiceId(i as u32);
            if waypoint_services.contains(&Some(id)) {
                continue; // a waypoint never sends its own traffic through a waypoint
            }
            let s = &self.services[i];
            let own = service_labels
                .get(&(&*s.namespace, &*s.name))
                .copied()
                .unwrap_or(&NO_LABELS);
            let what = format!("service {}", s.hostname);
            let (bound, warning) =
                self.resolve_binding(&what, &s.namespace, own, WaypointFor::serves_services);
            self.warnings.extend(warning);
            if let Some(wp) = bound {
                self.services[i].waypoint = Some(wp);
                bound_services[wp.index()].push(id);
            }
        }

        // Workloads: labels on the Pod or WorkloadEntry, else on its namespace.
        let mut bound_workloads: Vec<Vec<WorkloadId>> = vec![Vec::new(); self.waypoints.len()];
        let mut own_labels: HashMap<&str, &BTreeMap<String, String>> = HashMap::new();
        let uids: Vec<(String, &BTreeMap<String, String>)> = kinds
            .pods
            .iter()
            .map(|(_, p)| {
                (
                    format!(
                        "{}//Pod/{}/{}",
                        self.options.cluster_id,
                        p.metadata.namespace(),
                        p.metadata.name
                    ),
                    &p.metadata.labels,
                )
            })
            .chain(kinds.workload_entries.iter().map(|(_, we)| {
                (
                    format!(
                        "{}/networking.istio.io/WorkloadEntry/{}/{}",
                        self.options.cluster_id,
                        we.metadata.namespace(),
                        we.metadata.name
                    ),
                    &we.metadata.labels,
                )
            }))
            .collect();
        for (uid, labels) in &uids {
            own_labels.insert(uid.as_str(), labels);
        }
        for i in 0..self.workloads.len() {
            let w = &self.workloads[i];
            if w.waypoint_instance.is_some() {
                continue;
            }
            let own = own_labels.get(&*w.uid).copied().unwrap_or(&NO_LABELS);
            let what = format!("workload {}", w.uid);
            let (bound, warning) =
                self.resolve_binding(&what, &w.namespace, own, WaypointFor::serves_workloads);
            self.warnings.extend(warning);
            if let Some(wp) = bound {
                self.workloads[i].waypoint = Some(wp);
                bound_workloads[wp.index()].push(WorkloadId(i as u32));
            }
        }
        for ((wp, s), w) in self
            .waypoints
            .iter_mut()
            .zip(bound_services)
            .zip(bound_workloads)
        {
            wp.services = s.into_boxed_slice();
            wp.workloads = w.into_boxed_slice();
        }
    }

    /// The waypoint a resource is bound to, if the binding resolves and applies to this kind of
    /// traffic, and a warning explaining why an explicit binding does not.
    fn resolve_binding(
        &self,
        what: &str,
        namespace: &str,
        own: &BTreeMap<String, String>,
        serves: fn(WaypointFor) -> bool,
    ) -> (Option<WaypointId>, Option<String>) {
        let ns_labels = self.namespace_labels(namespace);
        let explicit = own.contains_key(model::waypoint::USE_WAYPOINT);
        let binding = Binding::resolve(
            WaypointLabels::read(own),
            WaypointLabels::read(ns_labels),
            namespace,
        );
        let Binding::To {
            namespace: wp_ns,
            name,
        } = binding
        else {
            return (None, None);
        };
        let Some(id) = self.waypoint_id(wp_ns, name) else {
            return (
                None,
                Some(format!(
                    "{what} uses waypoint {wp_ns}/{name}, which does not exist (no Gateway of \
                     class istio-waypoint, nor a sandwiched one); its traffic is not redirected"
                )),
            );
        };
        let wp = &self.waypoints[id.index()];
        if !wp.admits(namespace, ns_labels) {
            return (
                None,
                Some(format!(
                    "{what} uses waypoint {wp_ns}/{name}, whose HBONE listener does not admit \
                     namespace {namespace} (allowedRoutes.namespaces.from); its traffic is not \
                     redirected"
                )),
            );
        }
        if !serves(wp.waypoint_for) {
            let warning = explicit.then(|| {
                format!(
                    "{what} uses waypoint {wp_ns}/{name}, which is for {:?} traffic; the binding \
                     has no effect for this kind of traffic",
                    wp.waypoint_for
                )
            });
            return (None, warning);
        }
        (Some(id), None)
    }

    /// The snapshot, keeping (shared with the parse cache) the routing and policy resources
    /// `/config_dump` shows as written; workloads, services and namespaces it shows as modelled.
    fn finish(self, resources: &[&Arc<Located>], version: u64) -> Snapshot {
        let sources = resources
            .iter()
            .filter(|r| {
                !matches!(
                    r.resource,
                    Resource::Pod(_)
                        | Resource::Service(_)
                        | Resource::Namespace(_)
                        | Resource::Node(_)
                        | Resource::WorkloadEntry(_)
                )
            })
            .map(|&r| r.clone())
            .collect();
        Snapshot {
            version,
            options: self.options.clone(),
            workloads: self.workloads,
            services: self.services,
            waypoints: self.waypoints,
            policies: self.policies,
            peer_authentications: self.peer_authentications,
            plugins: self.plugins,
            destination_rules: self.destination_rules,
            routes: self.routes,
            index: self.index,
            sources,
            warnings: self.warnings,
        }
    }
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// Parses Kubernetes' "one address, or a list of them" pair (`podIP`/`podIPs`,
/// `clusterIP`/`clusterIPs`): the list wins when present; `None` and empty entries (headless
/// services) are skipped. The field path is only built for an error, since a load parses tens of
/// thousands of these.
fn parse_ips(
    single: Option<&str>,
    single_field: &str,
    list: &[&str],
    list_field: impl Fn(usize) -> String,
    valid: &str,
) -> Result<Vec<IpAddr>, FieldError> {
    let entries: Vec<(Option<usize>, &str)> = if list.is_empty() {
        single.into_iter().map(|ip| (None, ip)).collect()
    } else {
        list.iter()
            .enumerate()
            .map(|(i, ip)| (Some(i), *ip))
            .collect()
    };
    let mut ips = Vec::with_capacity(entries.len());
    for (index, text) in entries {
        if text.is_empty() || text == "None" {
            continue;
        }
        match text.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => {
                let field = index.map_or_else(|| single_field.to_owned(), &list_field);
                return Err(FieldError::new(field, format!("{text:?} is not {valid}")));
            }
        }
    }
    Ok(ips)
}

/// Orders resources by `namespace/name`, the order ties and ids follow in every snapshot.
pub(super) fn by_name<S, T>(
    a: &(&Origin, &Object<S, T>),
    b: &(&Origin, &Object<S, T>),
) -> std::cmp::Ordering {
    (a.1.metadata.namespace(), &a.1.metadata.name)
        .cmp(&(b.1.metadata.namespace(), &b.1.metadata.name))
}

/// Whether `se`'s endpoints, or its hosts when it has none, are DNS names resolved when chosen
/// (`resolution: DNS`, or `DNS_ROUND_ROBIN`, which differ only in Envoy's connection pooling).
fn resolved_by_dns(se: &ServiceEntrySpec) -> bool {
    matches!(se.resolution.as_deref(), Some("DNS" | "DNS_ROUND_ROBIN"))
}

/// Whether connections to `se`'s addresses go where they were sent, not to an endpoint
/// (`resolution: NONE`, the default).
fn passes_through(se: &ServiceEntrySpec) -> bool {
    matches!(se.resolution.as_deref(), None | Some("NONE"))
}

/// What one of a ServiceEntry's `spec.addresses` gives its services.
enum Vip {
    /// An address, written alone or as a one-address block (`/32`, `/128`).
    Single(IpAddr),
    /// A block of more than one address.
    Range,
}

/// `address` as a service address; `None`: neither an address nor a CIDR block.
fn entry_vip(address: &str) -> Option<Vip> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Some(Vip::Single(ip));
    }
    let block = address.parse::<ipnet::IpNet>().ok()?;
    Some(if block.prefix_len() == block.max_prefix_len() {
        Vip::Single(block.addr())
    } else {
        Vip::Range
    })
}

/// Whether `se`'s hosts get addresses allocated when it declares none: as istiod's, unless its
/// resolution is `NONE` (the default: nothing routes by address then) or it opts out.
fn allocates(se: &Object<ServiceEntrySpec, ServiceEntryStatus>) -> bool {
    let resolved = matches!(
        se.spec.resolution.as_deref(),
        Some("STATIC" | "DNS" | "DNS_ROUND_ROBIN")
    );
    let opted_out = (se.metadata.labels.get(super::allocate::OPT_OUT))
        .is_some_and(|v| v.eq_ignore_ascii_case("false"));
    resolved && !opted_out
}

/// Whether `se`'s hosts are its endpoints: resolved by DNS, with no endpoints and no selector.
fn resolves_hosts(se: &ServiceEntrySpec) -> bool {
    resolved_by_dns(se) && se.endpoints.is_empty() && se.workload_selector.is_none()
}

/// Whether `name` is a DNS name one can resolve: dot-separated labels of letters, digits and
/// hyphens, no wildcard, and not an address.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<IpAddr>().is_err()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The port a ServiceEntry port reaches its endpoints on: its `targetPort`, where set and not
/// 0 (unset, as istiod reads it), else its number.
fn entry_target_port(p: &crate::resource::ServiceEntryPort) -> u16 {
    p.target_port.filter(|&t| t != 0).unwrap_or(p.number)
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Whether a WorkloadEntry's or ServiceEntry's endpoints are reached over HBONE, decided as istiod
/// decides it: only when the entry says so, by the redirection annotation or the tunnel label on
/// its own metadata. The namespace's dataplane mode enrols pods, which istio-cni then captures;
/// an entry's endpoints run wherever they run (a VM, a database outside the cluster) and mostly
/// have no ztunnel to answer HBONE.
fn tunnelled(meta: &ObjectMeta) -> bool {
    meta.annotations
        .get(AMBIENT_REDIRECTION)
        .map(String::as_str)
        == Some("enabled")
        || meta
            .labels
            .get(TUNNEL)
            .is_some_and(|v| v.split(',').any(|t| t == "http"))
}

/// `ambient.istio.io/waypoint-inbound-binding`, as istiod reads it: `PROXY/<port>` sandwiches
/// the waypoint on that port, `PROXY` on each tunnel's own target port; `NONE` (or an empty
/// value) leaves it as usual. PROXY is the only protocol ztunnel tunnels with.
fn parse_inbound_binding(value: &str) -> Result<Option<AppTunnel>, String> {
    if value.is_empty() || value.eq_ignore_ascii_case("NONE") {
        return Ok(None);
    }
    let port = match value.split_once('/') {
        None if value == "PROXY" => Some(None),
        Some(("PROXY", port)) => port.parse::<u16>().ok().filter(|&p| p != 0).map(Some),
        _ => None,
    };
    match port {
        Some(port) => Ok(Some(AppTunnel { port })),
        None => Err(format!(
            "{value:?} is not valid; use PROXY/<port> (such as PROXY/15088), PROXY or NONE"
        )),
    }
}
