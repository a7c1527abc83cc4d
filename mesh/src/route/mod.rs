//! L7 routing: Gateway API `HTTPRoute` and Istio `VirtualService` lowered into one rule model,
//! and Istio `DestinationRule` lowered into per-host traffic policy.
//!
//! The waypoint executes only the internal model ([`RouteRule`], [`RouteTable`],
//! [`DestinationPolicy`]); which YAML kind a rule came from matters only for precedence
//! ([`Precedence`]) and for naming it in logs ([`RuleSource`]). Lowering resolves every service
//! reference through a [`ServiceResolver`] the caller provides, compiles regexes and parses
//! durations once, and reports every problem with its field path
//! (`spec.rules[1].backendRefs[0].name`) and what would be valid. Problems that the specs turn
//! into runtime errors (a nonexistent backend answers 500) are still reported, so an operator
//! sees them at load; the caller decides whether they are fatal.
//!
//! Semantics follow the shared L7 reference note (sections 2–9): GAMMA attachment to Services,
//! Gateway API match precedence, VirtualService first-match, Istio defaults for retries and
//! outlier detection.

mod destination;
mod duration;
mod http_route_filters;
mod locality_lb;
mod lower_common;
mod lower_http_route;
mod lower_virtual_service;
mod model;
mod retry;
mod rewrite;
mod select;
mod spec_destination;
mod spec_gateway;
mod spec_istio;
#[cfg(test)]
mod test_support;
mod upstream_tls;
mod virtual_service_actions;

use std::sync::Arc;

pub use destination::{
    ConnectionPool, ConsistentHash, DestinationPolicy, H2Upgrade, HashKey, HashTable, LoadBalancer,
    OutlierDetection, Subset, TcpKeepalive, TrafficPolicy, lower_destination_rule,
};
pub use duration::{InvalidDuration, parse_duration};
pub use locality_lb::{
    LocalityLb, LocalityPattern, LocalityPreference, LocalityShares, RegionFailover,
};
pub use lower_http_route::lower_http_route;
pub use lower_virtual_service::lower_virtual_service;
pub use model::{
    Backend, Cors, Fault, FaultAbort, FaultDelay, HeaderMatch, HeaderModifier, Mirror, PathMatch,
    PathRewrite, QueryMatch, Redirect, RedirectPort, RequestMatch, Rewrite, RouteKind, RouteRule,
    RuleAction, RuleSource, UnmatchedPreflights, ValueMatch, WeightedBackend,
};
pub use retry::{RetryCondition, RetryOn, RetryPolicy};
pub use select::{Precedence, RequestView, RouteTable, pick};
pub use spec_destination::*;
pub use spec_gateway::*;
pub use spec_istio::*;
pub use upstream_tls::{ClientCertificate, UpstreamTls};

/// Looks up services while lowering, so lowering stays a pure function of its inputs and the
/// caller decides where services come from (the snapshot being built, or a test table).
pub trait ServiceResolver {
    /// FQDN hostname and ports of the Service `name` in `namespace` (Kubernetes Service or
    /// ServiceEntry), if it exists.
    fn service(&self, namespace: &str, name: &str) -> Option<ResolvedService>;
    /// The service whose hostname is `host`, resolving short names (`reviews`,
    /// `reviews.default`) relative to `from_namespace` as Istio does.
    fn host(&self, host: &str, from_namespace: &str) -> Option<ResolvedService>;
}

/// A service as lowering needs it: its identity and its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedService {
    /// FQDN, e.g. `reviews.default.svc.cluster.local`; what attachments and backends name.
    pub hostname: Arc<str>,
    /// Namespace of the Service or ServiceEntry.
    pub namespace: Arc<str>,
    /// Name of the Service or ServiceEntry.
    pub name: Arc<str>,
    /// Ports, with their names where the resource names them.
    pub ports: Vec<(Option<Arc<str>>, u16)>,
}

impl ResolvedService {
    /// The port named `name` (`sectionName` of a parentRef).
    pub fn port_named(&self, name: &str) -> Option<u16> {
        self.ports
            .iter()
            .find(|(n, _)| n.as_deref() == Some(name))
            .map(|(_, p)| *p)
    }

    /// Why `port` is not one of the service's ports (known to `kind` `name`), for a problem at
    /// a `port` field; `None` when it is one.
    fn missing_port(&self, kind: &str, name: &str, port: u16) -> Option<String> {
        (!self.ports.iter().any(|(_, p)| *p == port)).then(|| {
            format!(
                "{kind} {name:?} has no port {port}; its ports are {}",
                self.describe_ports()
            )
        })
    }

    /// The ports, listed for error messages (`9080 (http), 9443`).
    fn describe_ports(&self) -> String {
        if self.ports.is_empty() {
            return "none".to_owned();
        }
        let ports: Vec<String> = self
            .ports
            .iter()
            .map(|(name, port)| match name {
                Some(name) => format!("{port} ({name})"),
                None => port.to_string(),
            })
            .collect();
        ports.join(", ")
    }
}

/// Rules that apply to one service, on one port or all of them.
///
/// For a request to service S on port p at a waypoint, the applicable rules are those of every
/// attachment for S whose `port` is `None` or `Some(p)` and that the waypoint's namespace sees
/// (its `namespace` and `export_to`; the snapshot decides). HTTPRoute rules from several
/// attachments are pooled and ordered by [`Precedence::GatewayApi`]; pass them to
/// [`RouteTable::new`] (or [`RouteTable::in_tiers`]) route by route, oldest route first (then
/// by `namespace/name`), because that order breaks precedence ties.
/// VirtualService rules keep declaration order ([`Precedence::FirstMatch`]).
#[derive(Debug, Clone)]
pub struct Attachment {
    /// The service FQDN.
    pub service: Arc<str>,
    /// The route's own namespace: a waypoint applies the routes of its service's namespace and
    /// of its own, as istiod's `getVirtualServiceForWaypoint` selects them.
    pub namespace: Arc<str>,
    /// A VirtualService's `exportTo` as written (empty: every namespace); an HTTPRoute's is
    /// empty, its namespace alone deciding where it applies.
    pub export_to: Box<[Arc<str>]>,
    /// The Service port; `None` = all ports.
    pub port: Option<u16>,
    /// The rules, in declaration order.
    pub rules: Vec<RouteRule>,
}
