//! Workloads: pods, workload entries and inline ServiceEntry endpoints, one shape for all.

use std::net::IpAddr;
use std::sync::Arc;

use hbone::Identity;
use serde::Serialize;

use super::{Labels, PolicyId, ServiceId, WaypointId, WorkloadId};

/// Something with an address that can send and receive traffic.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Its position in the snapshot.
    pub id: WorkloadId,
    /// Stable id, in Istio's form: `<cluster>//v1/Pod/<ns>/<name>` for pods.
    pub uid: Arc<str>,
    /// Where it came from.
    pub kind: WorkloadKind,
    /// Resource name.
    pub name: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
    /// The SPIFFE identity it presents (its service account's).
    #[serde(serialize_with = "display")]
    pub identity: Identity,
    /// Addresses; empty while a pod has no IP yet.
    pub ips: Box<[IpAddr]>,
    /// Network (empty = the default network).
    pub network: Arc<str>,
    /// The node it runs on; each ztunnel serves its node's workloads.
    pub node: Option<Arc<str>>,
    /// Labels (for selectors and subsets).
    pub labels: Labels,
    /// How traffic reaches it: through its ztunnel (HBONE) or directly (plain TCP).
    pub protocol: Protocol,
    /// Whether it may receive traffic as an endpoint.
    pub ready: bool,
    /// Named ports (`http → 8080`) for named target ports.
    pub named_ports: Box<[(Arc<str>, u16)]>,
    /// Load-balancing weight.
    pub weight: u32,
    /// Telemetry's workload name (the Deployment's name for ReplicaSet pods).
    pub workload_name: Arc<str>,
    /// Telemetry's canonical service name.
    pub canonical_name: Arc<str>,
    /// Telemetry's canonical revision.
    pub canonical_revision: Arc<str>,
    /// The waypoint traffic addressed to this workload must take (`waypoint-for: workload|all`).
    pub waypoint: Option<WaypointId>,
    /// Set when this workload is an instance of a waypoint.
    pub waypoint_instance: Option<WaypointId>,
    /// Set when ztunnel hands this workload's inbound tunnels to one port with a PROXY header
    /// instead of connecting to each tunnel's target (a waypoint sandwiched between ztunnels).
    pub app_tunnel: Option<AppTunnel>,
    /// Services it is an endpoint of.
    pub services: Box<[ServiceId]>,
    /// Selector-scoped authorization policies that select it (namespace-wide and mesh-wide ones
    /// are indexed separately so they are stored once).
    pub selected_policies: Box<[PolicyId]>,
    /// The workload-selector PeerAuthentication that applies, if any.
    pub peer_authentication: Option<usize>,
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Workload {
    /// Whether `ip` is one of its addresses.
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        self.ips.contains(&ip)
    }

    /// The port a named target port resolves to on this workload.
    pub fn named_port(&self, name: &str) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|&(_, p)| p)
    }

    /// An address of the same family as `like`, else the first.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
            .or_else(|| self.ips.first().copied())
    }
}

/// A sandwiched waypoint's inbound: ztunnel terminates HBONE for the waypoint's pod and opens a
/// connection to `port` on it for every tunnel, starting with a PROXY protocol v2 header that
/// names the original client, the tunnel's target (the service `VIP:port` the waypoint routes)
/// and the client's SPIFFE identity, since the waypoint no longer sees the mTLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AppTunnel {
    /// The port the waypoint takes PROXY connections on (15088 by convention); none: each
    /// tunnel's own target port.
    pub port: Option<u16>,
}

/// Which resource a workload came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WorkloadKind {
    /// A `Pod`.
    Pod,
    /// A `WorkloadEntry`.
    WorkloadEntry,
    /// An inline `ServiceEntry` endpoint.
    ServiceEntry,
}

/// How a workload receives mesh traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    /// Captured by ztunnel: reach it with HBONE on port 15008.
    #[serde(rename = "HBONE")]
    Hbone,
    /// Not in the mesh: reach it with plain TCP.
    #[serde(rename = "TCP")]
    Tcp,
}

/// Label naming the canonical service.
pub(crate) const CANONICAL_NAME: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
/// Label naming the canonical revision.
pub(crate) const CANONICAL_REVISION: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

/// The Deployment name of a ReplicaSet pod (`reviews-v1-5b9c7f-x2x4z` → `reviews-v1`), when the
/// pod carries `pod-template-hash`; otherwise the pod name.
pub(crate) fn workload_name<'a>(pod: &'a str, template_hash: Option<&str>) -> &'a str {
    let Some(hash) = template_hash else {
        return pod;
    };
    match pod.rsplit_once('-') {
        Some((rest, _)) => rest
            .strip_suffix(hash)
            .and_then(|r| r.strip_suffix('-'))
            .unwrap_or(pod),
        None => pod,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_names_from_pod_names() {
        assert_eq!(
            workload_name("reviews-v1-5b9c7f-x2x4z", Some("5b9c7f")),
            "reviews-v1"
        );
        assert_eq!(workload_name("reviews-v1-abc", None), "reviews-v1-abc");
        assert_eq!(workload_name("odd", Some("5b9c7f")), "odd");
    }
}
