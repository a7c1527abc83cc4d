//! Waypoints and which traffic they serve.
//!
//! A waypoint is a `Gateway` of class `istio-waypoint`, or a sandwiched one of any class.
//! Resources opt into one with the `istio.io/use-waypoint` label on a Namespace, Service, ServiceEntry, Pod or WorkloadEntry; the
//! most specific label wins and `none` opts out of a namespace-wide binding. Whether a binding
//! takes effect depends on the waypoint's `istio.io/waypoint-for`: a `service` waypoint (the
//! default) only sees traffic addressed to service VIPs, a `workload` waypoint only traffic
//! addressed to workload IPs, `all` both, `none` neither.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::{AppTunnel, LoadBalancing, PluginId, PolicyId, ServiceId, WorkloadId};

/// Label binding a resource to a waypoint.
pub(crate) const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Label naming the bound waypoint's namespace when it differs.
pub(crate) const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// Label (on the Gateway) saying what a waypoint serves.
pub(crate) const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// Obsolete annotation/label from before Istio 1.22; ignored with a warning.
pub(crate) const FOR_SERVICE_ACCOUNT: &str = "istio.io/for-service-account";
/// Label Istio puts on the pods of a Gateway deployment.
pub(crate) const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
/// Annotation (on the Gateway, or on its GatewayClass) asking ztunnel to capture the waypoint's
/// pods and hand it their inbound tunnels over PROXY protocol: `PROXY/<port>` or `PROXY`.
pub(crate) const INBOUND_BINDING: &str = "ambient.istio.io/waypoint-inbound-binding";
/// The protocol of a sandwiched waypoint's PROXY listener, as istiod names it.
pub(crate) const PROXY_LISTENER: &str = "istio.io/PROXY";
/// The waypoint gateway class.
pub(crate) const WAYPOINT_CLASS: &str = "istio-waypoint";

/// A waypoint and what it serves.
#[derive(Debug, Clone)]
pub struct Waypoint {
    /// The Gateway's namespace.
    pub namespace: Arc<str>,
    /// The Gateway's name.
    pub name: Arc<str>,
    /// Which traffic it intercepts.
    pub waypoint_for: WaypointFor,
    /// Set when the waypoint is sandwiched: its pods are captured by ztunnel, which hands it
    /// their inbound tunnels over PROXY protocol.
    pub inbound_binding: Option<AppTunnel>,
    /// The Service in front of its instances (same name and namespace as the Gateway).
    pub service: Option<ServiceId>,
    /// How ztunnels choose among its instances: its Service's preference when the Service is
    /// described, else what Istio generates for it, `PreferClose` unless the Gateway's
    /// `infrastructure.annotations` say otherwise, so each client uses a waypoint instance in its
    /// own zone when there is one.
    pub load_balancing: Option<LoadBalancing>,
    /// Its pods (labelled `gateway.networking.k8s.io/gateway-name: <name>`).
    pub instances: Box<[WorkloadId]>,
    /// Services bound to it.
    pub services: Box<[ServiceId]>,
    /// Workloads bound to it.
    pub workloads: Box<[WorkloadId]>,
    /// Authorization policies targeting its Gateway.
    pub policies: Box<[PolicyId]>,
    /// Wasm plugins targeting its Gateway.
    pub plugins: Box<[PluginId]>,
    /// Namespaces whose resources may bind to it from outside its own namespace.
    pub(crate) admits: Admission,
}

impl Waypoint {
    /// Whether a resource in `namespace` (whose namespace has `labels`) may use this waypoint.
    pub(crate) fn admits(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        namespace == &*self.namespace
            || match &self.admits {
                Admission::Same => false,
                Admission::All => true,
                Admission::Selector(sel) => super::selector_matches(sel, labels),
            }
    }
}

/// `allowedRoutes.namespaces.from` of the waypoint's HBONE listener.
#[derive(Debug, Clone, Default)]
pub(crate) enum Admission {
    /// Only its own namespace (Gateway API default).
    #[default]
    Same,
    /// Any namespace.
    All,
    /// Namespaces with these labels.
    Selector(BTreeMap<String, String>),
}

/// `istio.io/waypoint-for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaypointFor {
    /// Traffic to service VIPs (default).
    Service,
    /// Traffic to workload IPs.
    Workload,
    /// Both.
    All,
    /// Neither (the waypoint exists but nothing is redirected to it).
    None,
}

impl WaypointFor {
    /// Parses the label value; unknown values are `None` here and reported by the caller.
    pub(crate) fn parse(value: Option<&str>) -> Option<Self> {
        match value {
            None | Some("service") => Some(WaypointFor::Service),
            Some("workload") => Some(WaypointFor::Workload),
            Some("all") => Some(WaypointFor::All),
            Some("none") => Some(WaypointFor::None),
            Some(_) => None,
        }
    }

    /// Whether service-addressed traffic goes through it.
    pub fn serves_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    /// Whether workload-addressed traffic goes through it.
    pub fn serves_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// The binding labels of one resource.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WaypointLabels<'a> {
    pub(crate) use_waypoint: Option<&'a str>,
    pub(crate) namespace: Option<&'a str>,
}

impl<'a> WaypointLabels<'a> {
    pub(crate) fn read(labels: &'a BTreeMap<String, String>) -> Self {
        Self {
            use_waypoint: labels.get(USE_WAYPOINT).map(String::as_str),
            namespace: labels.get(USE_WAYPOINT_NAMESPACE).map(String::as_str),
        }
    }
}

/// What a resource is bound to, after the most-specific-wins rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binding<'a> {
    /// No label anywhere.
    Unbound,
    /// `use-waypoint: none`.
    OptedOut,
    /// The waypoint `namespace/name`.
    To { namespace: &'a str, name: &'a str },
}

impl<'a> Binding<'a> {
    /// The binding of a resource in `namespace`, from its own labels, else its namespace's.
    pub(crate) fn resolve(
        own: WaypointLabels<'a>,
        namespace_labels: WaypointLabels<'a>,
        namespace: &'a str,
    ) -> Self {
        let labels = if own.use_waypoint.is_some() {
            own
        } else {
            namespace_labels
        };
        match labels.use_waypoint {
            None | Some("") => Binding::Unbound,
            Some("none") => Binding::OptedOut,
            Some(name) => Binding::To {
                namespace: labels.namespace.unwrap_or(namespace),
                name,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn most_specific_label_wins() {
        let ns_wp = labels(&[(USE_WAYPOINT, "ns-wp")]);
        let own_wp = labels(&[(USE_WAYPOINT, "svc-wp")]);
        let own_none = labels(&[(USE_WAYPOINT, "none")]);
        let cross = labels(&[(USE_WAYPOINT, "shared"), (USE_WAYPOINT_NAMESPACE, "infra")]);
        let empty = labels(&[]);
        fn r<'a>(
            own: &'a BTreeMap<String, String>,
            ns: &'a BTreeMap<String, String>,
        ) -> Binding<'a> {
            Binding::resolve(WaypointLabels::read(own), WaypointLabels::read(ns), "app")
        }
        assert_eq!(r(&empty, &empty), Binding::Unbound);
        assert_eq!(
            r(&empty, &ns_wp),
            Binding::To {
                namespace: "app",
                name: "ns-wp"
            }
        );
        assert_eq!(
            r(&own_wp, &ns_wp),
            Binding::To {
                namespace: "app",
                name: "svc-wp"
            }
        );
        assert_eq!(r(&own_none, &ns_wp), Binding::OptedOut);
        assert_eq!(
            r(&cross, &empty),
            Binding::To {
                namespace: "infra",
                name: "shared"
            }
        );
    }

    #[test]
    fn waypoint_for_values() {
        assert_eq!(WaypointFor::parse(None), Some(WaypointFor::Service));
        assert_eq!(WaypointFor::parse(Some("all")), Some(WaypointFor::All));
        assert_eq!(WaypointFor::parse(Some("bogus")), None);
        assert!(WaypointFor::All.serves_services() && WaypointFor::All.serves_workloads());
        assert!(!WaypointFor::Service.serves_workloads());
        assert!(!WaypointFor::Workload.serves_services());
        assert!(!WaypointFor::None.serves_services() && !WaypointFor::None.serves_workloads());
    }
}
