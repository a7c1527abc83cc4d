//! Resources that attach to services, workloads and waypoints: authorization policies, peer
//! authentication, Wasm plugins, destination rules and routes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use super::RouteTables;
use super::build::{Builder, Kinds, by_name};
use super::destination_rules::{DestinationRules, Written};
use super::{PeerAuthEntry, PolicyEntry, PolicyScope};
use crate::authz::{Action, AuthorizationPolicySpec, Policy, PolicyTargetReference};
use crate::error::{FieldError, Origin};
use crate::model::{self, PluginId, PolicyId, ServiceId, ServiceKind, WaypointId};
use crate::resource::{
    MtlsMode, Object, PeerAuthenticationSpec, TrafficExtensionSpec, WasmPluginSpec,
    traffic_extension_field,
};
use crate::route::{
    Attachment, DestinationRuleSpec, HttpRouteSpec, ResolvedService, ServiceResolver,
    lower_destination_rule, lower_http_route, lower_virtual_service,
};

/// Annotation that makes a policy log its decisions without enforcing them.
const DRY_RUN: &str = "istio.io/dry-run";

/// What a `targetRef` names, once resolved.
enum Target {
    Waypoint(WaypointId),
    WaypointClass,
    Services(Vec<ServiceId>),
}

/// Resolves a policy or plugin `targetRef`; `Err` carries a warning (the target does not exist
/// or is not something a waypoint enforces for).
fn resolve_target(
    b: &Builder<'_>,
    namespace: &str,
    target: &PolicyTargetReference,
) -> Result<Target, String> {
    let namespace = target.namespace.as_deref().unwrap_or(namespace);
    match (target.group.as_str(), target.kind.as_str()) {
        ("gateway.networking.k8s.io", "Gateway") => b
            .index
            .waypoint_by_name
            .get(namespace)
            .and_then(|m| m.get(target.name.as_str()))
            .map(|&id| Target::Waypoint(id))
            .ok_or_else(|| {
                format!(
                    "targets Gateway {namespace}/{}, which is not a waypoint",
                    target.name
                )
            }),
        ("gateway.networking.k8s.io", "GatewayClass") => {
            if target.name == model::waypoint::WAYPOINT_CLASS
                && namespace == b.options.root_namespace
            {
                Ok(Target::WaypointClass)
            } else {
                Err(format!(
                    "targets GatewayClass {}; only istio-waypoint from the root namespace {} applies to waypoints",
                    target.name, b.options.root_namespace
                ))
            }
        }
        ("" | "core", "Service") => b
            .index
            .service_by_name
            .get(namespace)
            .and_then(|m| m.get(target.name.as_str()))
            .map(|&id| Target::Services(vec![id]))
            .ok_or_else(|| {
                format!(
                    "targets Service {namespace}/{}, which does not exist",
                    target.name
                )
            }),
        ("networking.istio.io", "ServiceEntry") => {
            let ids: Vec<ServiceId> = b
                .services
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    matches!(s.kind, ServiceKind::ServiceEntry { .. })
                        && *s.namespace == *namespace
                        && *s.name == *target.name
                })
                .map(|(i, _)| ServiceId(i as u32))
                .collect();
            if ids.is_empty() {
                Err(format!(
                    "targets ServiceEntry {namespace}/{}, which does not exist",
                    target.name
                ))
            } else {
                Ok(Target::Services(ids))
            }
        }
        (group, kind) => Err(format!(
            "targets {kind} (group {group:?}); waypoints enforce targetRefs to a Gateway, a \
             GatewayClass, a Service or a ServiceEntry"
        )),
    }
}

fn targets(
    spec_ref: Option<&PolicyTargetReference>,
    refs: &[PolicyTargetReference],
) -> Vec<PolicyTargetReference> {
    spec_ref.into_iter().chain(refs).cloned().collect()
}

// === authorization policies ===

pub(super) fn policies(b: &mut Builder<'_>, list: &[(&Origin, &Object<AuthorizationPolicySpec>)]) {
    let mut list = list.to_vec();
    list.sort_by(by_name);
    let mut selected: Vec<Vec<PolicyId>> = vec![Vec::new(); b.workloads.len()];
    let mut waypoint_policies: Vec<Vec<PolicyId>> = vec![Vec::new(); b.waypoints.len()];
    let mut service_policies: HashMap<ServiceId, Vec<PolicyId>> = HashMap::new();
    let mut mesh = Vec::new();
    let mut class = Vec::new();
    let mut by_namespace: HashMap<_, Vec<PolicyId>> = HashMap::new();
    for (origin, ap) in list {
        let namespace = ap.metadata.namespace();
        let name = &ap.metadata.name;
        let dry_run = ap
            .metadata
            .annotations
            .get(DRY_RUN)
            .is_some_and(|v| v == "true");
        let policy = match Policy::compile(namespace, name, &ap.spec, dry_run) {
            Ok(p) => p,
            Err(errors) => {
                for e in errors {
                    b.invalid(origin, "AuthorizationPolicy", ap, e);
                }
                continue;
            }
        };
        let id = PolicyId(b.policies.len() as u32);
        let refs = targets(ap.spec.target_ref.as_ref(), &ap.spec.target_refs);
        let scope = if !refs.is_empty() {
            for target in &refs {
                match resolve_target(b, namespace, target) {
                    Ok(Target::Waypoint(wp)) => waypoint_policies[wp.index()].push(id),
                    Ok(Target::WaypointClass) => class.push(id),
                    Ok(Target::Services(ids)) => {
                        for s in ids {
                            service_policies.entry(s).or_default().push(id);
                        }
                    }
                    Err(why) => b.warn(format!(
                        "AuthorizationPolicy {namespace}/{name} {why}; the target is ignored"
                    )),
                }
            }
            PolicyScope::Targets
        } else if let Some(selector) = &ap.spec.selector {
            let scope_ns = (namespace != b.options.root_namespace).then_some(namespace);
            for w in b.select(scope_ns, &selector.match_labels) {
                selected[w.index()].push(id);
            }
            PolicyScope::Selector
        } else if namespace == b.options.root_namespace {
            mesh.push(id);
            PolicyScope::Mesh
        } else {
            by_namespace
                .entry(b.interner.get(namespace))
                .or_default()
                .push(id);
            PolicyScope::Namespace
        };
        let l4 = policy.for_l4();
        // Policies bound by targetRefs are the waypoints' alone; the rest reach ztunnel.
        if scope != PolicyScope::Targets && policy.uses_http_attributes() {
            let effect = match policy.action() {
                Action::Allow => Some(
                    "its ALLOW rules that use them never match, which is stricter than written",
                ),
                Action::Deny | Action::Custom => Some(
                    "its DENY rules are enforced without them (broader than written) and rules with nothing else are ignored",
                ),
                Action::Audit => None,
            };
            if let Some(effect) = effect {
                b.warn(format!(
                    "AuthorizationPolicy {namespace}/{name} uses HTTP attributes, which ztunnel does not support: {effect}; bind it to a waypoint with targetRefs to enforce them"
                ));
            }
        }
        b.policies.push(PolicyEntry { policy, l4, scope });
    }
    for (w, ids) in b.workloads.iter_mut().zip(selected) {
        w.selected_policies = ids.into_boxed_slice();
    }
    for (wp, ids) in b.waypoints.iter_mut().zip(waypoint_policies) {
        wp.policies = ids.into_boxed_slice();
    }
    for (s, ids) in service_policies {
        b.services[s.index()].policies = ids.into_boxed_slice();
    }
    b.index.mesh_policies = mesh.into_boxed_slice();
    b.index.waypoint_class_policies = class.into_boxed_slice();
    b.index.namespace_policies = by_namespace
        .into_iter()
        .map(|(k, v)| (k, v.into_boxed_slice()))
        .collect();
}

// === peer authentication ===

pub(super) fn peer_authentications(
    b: &mut Builder<'_>,
    list: &[(&Origin, &Object<PeerAuthenticationSpec>)],
) {
    let mut list = list.to_vec();
    list.sort_by(by_name);
    for (origin, pa) in list {
        let namespace = pa.metadata.namespace();
        let name = &pa.metadata.name;
        if pa.spec.selector.is_none() && !pa.spec.port_level_mtls.is_empty() {
            b.invalid(
                origin,
                "PeerAuthentication",
                pa,
                FieldError::new(
                    "spec.portLevelMtls",
                    "port-level settings need a workload selector; add spec.selector",
                ),
            );
            continue;
        }
        if pa.spec.port_level_mtls.contains_key(&0) {
            b.invalid(
                origin,
                "PeerAuthentication",
                pa,
                FieldError::new("spec.portLevelMtls", "port 0 is not a port"),
            );
            continue;
        }
        let index = b.peer_authentications.len();
        b.peer_authentications.push(PeerAuthEntry {
            namespace: b.interner.get(namespace),
            name: b.interner.get(name),
            mode: pa.spec.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode),
            ports: pa
                .spec
                .port_level_mtls
                .iter()
                .map(|(&p, m)| (p, m.mode))
                .collect(),
        });
        let conflict = match &pa.spec.selector {
            Some(selector) => {
                let mut conflict = false;
                for w in b.select(Some(namespace), &selector.match_labels) {
                    let slot = &mut b.workloads[w.index()].peer_authentication;
                    conflict |= slot.is_some();
                    slot.get_or_insert(index);
                }
                conflict
            }
            None if namespace == b.options.root_namespace => {
                let slot = &mut b.index.mesh_peer_authentication;
                let conflict = slot.is_some();
                slot.get_or_insert(index);
                conflict
            }
            None => {
                let ns = b.interner.get(namespace);
                let slot = b.index.namespace_peer_authentication.entry(ns);
                let conflict = matches!(slot, std::collections::hash_map::Entry::Occupied(_));
                slot.or_insert(index);
                conflict
            }
        };
        if conflict {
            b.warn(format!(
                "PeerAuthentication {namespace}/{name} overlaps another one with the same scope; \
                 the first by name applies"
            ));
        }
    }
}

// === plugins ===

/// One Wasm extension, from a WasmPlugin or a TrafficExtension (which lowers to the same).
struct Extension<'a> {
    origin: &'a Origin,
    kind: &'static str,
    namespace: &'a str,
    name: &'a str,
    spec: Cow<'a, WasmPluginSpec>,
}

pub(super) fn plugins(
    b: &mut Builder<'_>,
    wasm_plugins: &[(&Origin, &Object<WasmPluginSpec>)],
    traffic_extensions: &[(&Origin, &Object<TrafficExtensionSpec>)],
) {
    let mut list: Vec<Extension<'_>> = wasm_plugins
        .iter()
        .map(|(origin, wp)| Extension {
            origin,
            kind: "WasmPlugin",
            namespace: wp.metadata.namespace(),
            name: &wp.metadata.name,
            spec: Cow::Borrowed(&wp.spec),
        })
        .collect();
    for (origin, te) in traffic_extensions {
        let (namespace, name) = (te.metadata.namespace(), &*te.metadata.name);
        match (te.spec.wasm_plugin(), &te.spec.lua) {
            (Some(spec), None) => list.push(Extension {
                origin,
                kind: "TrafficExtension",
                namespace,
                name,
                spec: Cow::Owned(spec),
            }),
            (None, Some(_)) => b.warn(format!(
                "TrafficExtension {namespace}/{name} is a Lua filter, which this waypoint does not run (Lua filters fail open); it is skipped"
            )),
            _ => b.invalid(
                origin,
                "TrafficExtension",
                te,
                FieldError::new("spec", "set exactly one of wasm and lua"),
            ),
        }
    }
    list.sort_by(|a, b| (a.namespace, a.name, a.kind).cmp(&(b.namespace, b.name, b.kind)));
    let mut waypoint_plugins: Vec<Vec<PluginId>> = vec![Vec::new(); b.waypoints.len()];
    let mut service_plugins: HashMap<ServiceId, Vec<PluginId>> = HashMap::new();
    for ext in list {
        let (namespace, name, kind) = (ext.namespace, ext.name, ext.kind);
        let plugin = match model::lower_plugin(namespace, name, &ext.spec) {
            Ok(p) => p,
            Err(errors) => {
                for mut e in errors {
                    if kind == "TrafficExtension" {
                        e.field = traffic_extension_field(&e.field);
                    }
                    b.invalid_named(ext.origin, kind, namespace, name, e);
                }
                continue;
            }
        };
        let id = PluginId(b.plugins.len() as u32);
        let refs = targets(ext.spec.target_ref.as_ref(), &ext.spec.target_refs);
        if refs.is_empty() {
            tracing::debug!(plugin.namespace = namespace, plugin.name = %name, plugin.kind = kind, "a selector-only extension does not apply to waypoints");
        }
        for target in &refs {
            match resolve_target(b, namespace, target) {
                Ok(Target::Waypoint(w)) => waypoint_plugins[w.index()].push(id),
                Ok(Target::Services(ids)) => {
                    for s in ids {
                        service_plugins.entry(s).or_default().push(id);
                    }
                }
                Ok(Target::WaypointClass) => {
                    for list in &mut waypoint_plugins {
                        list.push(id);
                    }
                }
                Err(why) => b.warn(format!(
                    "{kind} {namespace}/{name} {why}; the target is ignored"
                )),
            }
        }
        b.plugins.push(plugin);
    }
    let order = |plugins: &[model::Plugin], ids: &mut Vec<PluginId>| {
        ids.sort_by_key(|id| {
            let p = &plugins[id.index()];
            (
                p.phase,
                std::cmp::Reverse(p.priority),
                p.namespace.clone(),
                p.name.clone(),
            )
        });
        ids.dedup();
    };
    for (w, mut ids) in b.waypoints.iter_mut().zip(waypoint_plugins) {
        order(&b.plugins, &mut ids);
        w.plugins = ids.into_boxed_slice();
    }
    // A service's list is merged with its waypoint's here so the request path reads one slice.
    for (s, mut ids) in service_plugins {
        let service = &mut b.services[s.index()];
        if let Some(wp) = service.waypoint {
            ids.extend(b.waypoints[wp.index()].plugins.iter().copied());
        }
        order(&b.plugins, &mut ids);
        service.plugins = ids.into_boxed_slice();
    }
}

// === destination rules and routes ===

/// Resolves service references for route lowering against the services being built.
struct Services<'a, 'o>(&'a Builder<'o>);

impl Services<'_, '_> {
    fn resolved(&self, id: ServiceId) -> ResolvedService {
        let s = &self.0.services[id.index()];
        ResolvedService {
            hostname: s.hostname.clone(),
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            ports: s.ports.iter().map(|p| (p.name.clone(), p.port)).collect(),
        }
    }
}

impl ServiceResolver for Services<'_, '_> {
    fn service(&self, namespace: &str, name: &str) -> Option<ResolvedService> {
        let b = self.0;
        b.index
            .service_by_name
            .get(namespace)
            .and_then(|m| m.get(name))
            .copied()
            .or_else(|| {
                // A ServiceEntry by name: its first host.
                b.services
                    .iter()
                    .position(|s| *s.namespace == *namespace && *s.name == *name)
                    .map(|i| ServiceId(i as u32))
            })
            .map(|id| self.resolved(id))
    }

    fn host(&self, host: &str, from_namespace: &str) -> Option<ResolvedService> {
        let b = self.0;
        if let Some(&id) = b.index.service_by_host.get(host) {
            return Some(self.resolved(id));
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        let short = host
            .strip_suffix(&*format!(".svc.{}", b.options.domain_suffix))
            .or_else(|| host.strip_suffix(".svc"))
            .unwrap_or(host);
        let (name, namespace) = short.split_once('.').unwrap_or((short, from_namespace));
        if namespace.contains('.') {
            return None;
        }
        b.index
            .service_by_name
            .get(namespace)
            .and_then(|m| m.get(name))
            .map(|&id| self.resolved(id))
    }
}

pub(super) fn destination_rules(
    b: &mut Builder<'_>,
    list: &[(&Origin, &Object<DestinationRuleSpec>)],
) {
    // istiod's order, which decides which rule of a merge or of a namespace comes first: rules
    // with a workloadSelector, then by creation time, name and namespace.
    let mut list = list.to_vec();
    list.sort_by(|a, b| {
        let key = |o: &Object<DestinationRuleSpec>| {
            (
                o.spec.workload_selector.is_none(),
                o.metadata.creation_timestamp.clone(),
                o.metadata.name.clone(),
                o.metadata.namespace().to_owned(),
            )
        };
        key(a.1).cmp(&key(b.1))
    });
    let mut written = Vec::with_capacity(list.len());
    for (origin, dr) in list {
        let namespace = dr.metadata.namespace();
        let name = &dr.metadata.name;
        match lower_destination_rule(namespace, name, &dr.spec, &Services(b)) {
            Ok(policy) => written.push(Written {
                namespace,
                name,
                spec: &dr.spec,
                policy,
            }),
            Err(errors) => {
                for e in errors {
                    b.invalid(origin, "DestinationRule", dr, e);
                }
            }
        }
    }
    let services = Services(b);
    let (rules, warnings) =
        DestinationRules::build(&b.options.root_namespace, &written, |first, merged| {
            // Each rule was lowered alone, so the merged one lowers too.
            lower_destination_rule(first.namespace, first.name, merged, &services).ok()
        });
    b.warnings.extend(warnings);
    for service in &mut b.services {
        let mut subsets = Vec::new();
        for rule in rules.candidates(&service.namespace, &service.hostname) {
            for subset in &rules.get(rule).subsets {
                let endpoints = (service.endpoints.iter().enumerate())
                    .filter(|(_, e)| {
                        (b.workloads[e.workload.index()].labels).matches(&subset.labels)
                    })
                    .map(|(i, _)| i as u32)
                    .collect();
                subsets.push(model::Subset {
                    rule,
                    name: subset.name.clone(),
                    endpoints,
                });
            }
        }
        service.subsets = subsets.into();
    }
    b.destination_rules = rules;
}

/// Lowers HTTPRoutes and VirtualServices and builds the route tables of each service port, by
/// the namespace of the waypoint applying them ([`RouteTables`]). When a waypoint sees both
/// kinds for a service port, HTTPRoute wins, even over a VirtualService private to the
/// waypoint's namespace: Istio leaves mixing them undefined, and Gateway API is the API it
/// recommends for waypoints.
pub(super) fn routes(b: &mut Builder<'_>, kinds: &Kinds<'_>) {
    let mut http_routes = kinds.http_routes.clone();
    http_routes.sort_by(|a, b| {
        let key = |o: &Object<HttpRouteSpec>| {
            (
                o.metadata.creation_timestamp.clone(),
                o.metadata.namespace().to_owned(),
                o.metadata.name.clone(),
            )
        };
        key(a.1).cmp(&key(b.1))
    });
    let mut gateway_api: Vec<Attachment> = Vec::new();
    for &(origin, route) in &http_routes {
        let lowered = lower_http_route(
            route.metadata.namespace(),
            &route.metadata.name,
            &route.spec,
            &Services(b),
        );
        match lowered {
            Ok(attachments) => gateway_api.extend(attachments),
            Err(errors) => {
                for e in errors {
                    b.invalid(origin, "HTTPRoute", route, e);
                }
            }
        }
    }
    let mut virtual_services = kinds.virtual_services.clone();
    virtual_services.sort_by(by_name);
    let mut istio: Vec<Attachment> = Vec::new();
    for &(origin, vs) in &virtual_services {
        // Defined by a rule that some proxy applies: whether the waypoint that routes with
        // this VirtualService does is known only to it, which answers 503 if not.
        let subsets = |host: &str, subset: &str| {
            let service = b
                .index
                .service_by_host
                .get(host)
                .map(|id| &b.services[id.index()]);
            service.is_some_and(|s| s.subsets.iter().any(|s| &*s.name == subset))
        };
        let lowered = lower_virtual_service(
            vs.metadata.namespace(),
            &vs.metadata.name,
            &vs.spec,
            &Services(b),
            &subsets,
        );
        match lowered {
            Ok(attachments) => istio.extend(attachments),
            Err(errors) => {
                for e in errors {
                    b.invalid(origin, "VirtualService", vs, e);
                }
            }
        }
    }
    let mut by_service: HashMap<Arc<str>, [Vec<Attachment>; 2]> = HashMap::new();
    for (k, attachments) in [gateway_api, istio].into_iter().enumerate() {
        for a in attachments {
            by_service.entry(a.service.clone()).or_default()[k].push(a);
        }
    }
    let mut tables = HashMap::new();
    for (host, [gateway_api, istio]) in by_service {
        let Some(&id) = b.index.service_by_host.get(&host) else {
            continue;
        };
        let service = &b.services[id.index()];
        let ports = service.ports.iter().map(|p| p.port);
        for (port, built) in RouteTables::build(&service.namespace, ports, gateway_api, istio) {
            tables.insert((id, port), built);
        }
    }
    b.routes = tables;
}
