//! Services: Kubernetes Services and ServiceEntry hosts, with their resolved endpoints.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::{DestinationRuleId, Labels, LoadBalancing, PluginId, PolicyId, WaypointId, WorkloadId};

/// A service: a hostname, VIPs and ports in front of a set of endpoints.
#[derive(Debug, Clone)]
pub struct Service {
    /// Resource name.
    pub name: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
    /// Fully qualified hostname (`reviews.default.svc.cluster.local`, or a ServiceEntry host).
    pub hostname: Arc<str>,
    /// Which resource declared it.
    pub kind: ServiceKind,
    /// Virtual IPs clients dial.
    pub vips: Box<[IpAddr]>,
    /// Ports.
    pub ports: Box<[ServicePort]>,
    /// Labels of the Service resource.
    pub labels: Labels,
    /// Endpoints that take traffic, in a stable order (by workload uid): the ready ones, or for a
    /// Service that publishes not-ready addresses every one that has not ended.
    pub endpoints: Box<[Endpoint]>,
    /// The subsets of every DestinationRule a proxy may apply to this service (which one
    /// applies depends on the proxy), each with the endpoints its labels select.
    pub subsets: Box<[Subset]>,
    /// The waypoint traffic to this service must take (`waypoint-for: service|all`).
    pub waypoint: Option<WaypointId>,
    /// How endpoints near the caller are preferred (`trafficDistribution`,
    /// `internalTrafficPolicy: Local`); none: any endpoint.
    pub load_balancing: Option<LoadBalancing>,
    /// Extra identities its endpoints may present (ServiceEntry `subjectAltNames`).
    pub subject_alt_names: Box<[Arc<str>]>,
    /// Authorization policies that target it (`targetRefs` kind Service/ServiceEntry); the
    /// waypoint serving it enforces them.
    pub policies: Box<[PolicyId]>,
    /// Wasm plugins that target it.
    pub plugins: Box<[PluginId]>,
}

impl Service {
    /// The port entry for service port `port`.
    pub fn port(&self, port: u16) -> Option<(usize, &ServicePort)> {
        self.ports.iter().enumerate().find(|(_, p)| p.port == port)
    }

    /// The endpoints of `subset` (a DestinationRule and one of its subsets' names), or all
    /// endpoints for `None`. `None` when that rule defines no such subset for this service.
    pub fn subset_endpoints(
        &self,
        subset: Option<(DestinationRuleId, &str)>,
    ) -> Option<SubsetEndpoints<'_>> {
        let members = match subset {
            None => None,
            Some(subset) => Some(
                &self
                    .subset_position(subset)
                    .map(|i| &self.subsets[i])?
                    .endpoints[..],
            ),
        };
        Some(SubsetEndpoints {
            service: self,
            members,
        })
    }

    /// Where `subset` is in [`Service::subsets`].
    pub fn subset_position(&self, (rule, name): (DestinationRuleId, &str)) -> Option<usize> {
        (self.subsets.iter()).position(|s| s.rule == rule && &*s.name == name)
    }
}

/// Endpoints of a service or of one of its subsets; iterating allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct SubsetEndpoints<'a> {
    service: &'a Service,
    members: Option<&'a [u32]>,
}

impl<'a> SubsetEndpoints<'a> {
    /// How many endpoints.
    pub fn len(&self) -> usize {
        self.members
            .map_or(self.service.endpoints.len(), <[u32]>::len)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`th endpoint.
    pub fn get(&self, i: usize) -> Option<&'a Endpoint> {
        self.service.endpoints.get(self.position(i)?)
    }

    /// Where the `i`th endpoint is among all the service's (for state kept per endpoint).
    pub fn position(&self, i: usize) -> Option<usize> {
        match self.members {
            None => (i < self.service.endpoints.len()).then_some(i),
            Some(m) => m.get(i).map(|&e| e as usize),
        }
    }

    /// Iterates them.
    pub fn iter(self) -> impl Iterator<Item = &'a Endpoint> {
        (0..self.len()).filter_map(move |i| self.get(i))
    }
}

/// Which resource declared a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ServiceKind {
    /// A Kubernetes `Service`.
    Kubernetes,
    /// A `ServiceEntry` host; `internal` for `MESH_INTERNAL`.
    ServiceEntry {
        /// `location: MESH_INTERNAL`.
        internal: bool,
    },
}

/// One service port.
#[derive(Debug, Clone)]
pub struct ServicePort {
    /// Port name, if any.
    pub name: Option<Arc<str>>,
    /// The port clients dial on the VIP.
    pub port: u16,
    /// Where it lands on an endpoint.
    pub target: Target,
    /// The application protocol, from `appProtocol` or the port name.
    pub protocol: AppProtocol,
}

/// A target port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A number.
    Number(u16),
    /// A container port name, resolved per endpoint.
    Named(Arc<str>),
}

/// An endpoint of a service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The workload.
    pub workload: WorkloadId,
    /// The target port for each of the service's ports, in the same order; 0 where a named port
    /// does not exist on this workload (the endpoint is skipped for that port).
    pub ports: Box<[u16]>,
}

impl Endpoint {
    /// The target port for the service port at `port_index`.
    pub fn target_port(&self, port_index: usize) -> Option<u16> {
        self.ports.get(port_index).copied().filter(|&p| p != 0)
    }
}

/// A DestinationRule subset's members.
#[derive(Debug, Clone)]
pub struct Subset {
    /// The DestinationRule defining it.
    pub rule: DestinationRuleId,
    /// The subset name.
    pub name: Arc<str>,
    /// Indexes into the service's `endpoints`.
    pub endpoints: Box<[u32]>,
}

/// The application protocol of a port: decides HTTP handling versus a byte copy in the waypoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// HTTP/1.1 (or h2c upgrade).
    Http,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// TLS: opaque bytes.
    Tls,
    /// Opaque TCP.
    Tcp,
    /// Nothing declared.
    Unspecified,
}

impl AppProtocol {
    /// Whether the waypoint runs its HTTP pipeline for this port.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc
        )
    }
}

/// The protocol of a port, as Istio selects it: `appProtocol` first, then the port name's prefix
/// up to the first `-` (`http-web`, `grpc`, `tcp-db`).
pub(crate) fn app_protocol(app_protocol: Option<&str>, port_name: Option<&str>) -> AppProtocol {
    let from = |s: &str| match s.to_ascii_lowercase().as_str() {
        "http" | "http1" => Some(AppProtocol::Http),
        "http2" | "kubernetes.io/h2c" | "h2c" => Some(AppProtocol::Http2),
        "grpc" | "grpc-web" => Some(AppProtocol::Grpc),
        "https" | "tls" | "kubernetes.io/wss" => Some(AppProtocol::Tls),
        "tcp" | "mongo" | "mysql" | "redis" => Some(AppProtocol::Tcp),
        _ => None,
    };
    app_protocol
        .and_then(from)
        .or_else(|| port_name.and_then(|n| from(n.split_once('-').map_or(n, |(prefix, _)| prefix))))
        .unwrap_or(AppProtocol::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_selection() {
        let cases = [
            (Some("http"), None, AppProtocol::Http),
            (Some("kubernetes.io/h2c"), Some("tcp"), AppProtocol::Http2),
            (None, Some("http-web"), AppProtocol::Http),
            (None, Some("grpc"), AppProtocol::Grpc),
            (None, Some("tcp-db"), AppProtocol::Tcp),
            (None, Some("web"), AppProtocol::Unspecified),
            (Some("bogus"), Some("http"), AppProtocol::Http),
            (None, None, AppProtocol::Unspecified),
        ];
        for (app, name, want) in cases {
            assert_eq!(app_protocol(app, name), want, "{app:?} {name:?}");
        }
    }
}
