//! Workloads: pods, workload entries and inline ServiceEntry endpoints, one shape for all.

use std::net::IpAddr;
use std::sync::Arc;

use hbone::Identity;
use hbone::headers::{Baggage, WorkloadType};
use serde::Serialize;

use crate::resource::ObjectMeta;

use super::{Labels, Locality, PolicyId, ServiceId, WaypointId, WorkloadId};

/// Something with an address that can send and receive traffic.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Its position in the snapshot.
    pub id: WorkloadId,
    /// Stable id, in Istio's form: `<cluster>//Pod/<ns>/<name>` for pods.
    pub uid: Arc<str>,
    /// Where it came from.
    pub kind: WorkloadKind,
    /// Resource name.
    pub name: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
    /// The SPIFFE identity it presents (its service account's).
    pub identity: Identity,
    /// Addresses; empty while a pod has no IP yet, and for a DNS name.
    pub ips: Box<[IpAddr]>,
    /// The DNS name a `resolution: DNS` ServiceEntry endpoint (or host) is: it has no address
    /// of its own, and whoever sends it traffic resolves the name at the time, as upstream
    /// ztunnel resolves a workload's hostname.
    pub hostname: Option<Arc<str>>,
    /// Network (empty = the default network).
    pub network: Arc<str>,
    /// The node it runs on; each ztunnel serves its node's workloads.
    pub node: Option<Arc<str>>,
    /// Where it runs (its node's region, zone and subzone), for services that prefer near
    /// endpoints.
    pub locality: Locality,
    /// Labels (for selectors and subsets).
    pub labels: Labels,
    /// How traffic reaches it: through its ztunnel (HBONE) or directly (plain TCP).
    pub protocol: Protocol,
    /// Whether it may receive traffic as an endpoint.
    pub ready: bool,
    /// Whether it has an address and has not ended (running or still starting), ready or not:
    /// a Service that publishes not-ready addresses takes it as an endpoint all the same.
    pub running: bool,
    /// Named ports (`http → 8080`) for named target ports.
    pub named_ports: Box<[(Arc<str>, u16)]>,
    /// Load-balancing weight.
    pub weight: u32,
    /// Telemetry's workload name (the Deployment's name for ReplicaSet pods).
    pub workload_name: Arc<str>,
    /// The type of that workload, which baggage names it by.
    pub workload_type: WorkloadType,
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

fn known(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
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

    /// Its metadata as a CONNECT's (or its 200's) `baggage` names it, in `cluster`, so a peer that
    /// cannot look it up by address can still label its telemetry.
    pub fn baggage(&self, cluster: &str) -> Baggage {
        Baggage {
            cluster: Some(cluster.to_owned()),
            namespace: Some(self.namespace.to_string()),
            workload: Some((self.workload_type, self.workload_name.to_string())),
            service_name: Some(self.canonical_name.to_string()),
            service_version: Some(self.canonical_revision.to_string()),
            region: known(&self.locality.region),
            zone: known(&self.locality.zone),
        }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Captured by ztunnel: reach it with HBONE on port 15008.
    Hbone,
    /// Not in the mesh: reach it with plain TCP.
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

/// The workload a pod belongs to in telemetry, and its type, as istiod derives them: the
/// managing controller of a generated pod (a ReplicaSet carrying the pod's `pod-template-hash`
/// stands for its Deployment, a Job named `<name>-<8 to 10 digits>` for its CronJob); the pod
/// itself otherwise.
///
/// A pod written by hand (no `generateName`, no owner) that carries `pod-template-hash` is taken
/// for a Deployment's pod, its name less the hash and the random suffix, so a local mesh written
/// as plain pods is named as the cluster it imitates would be.
pub(crate) fn workload_name_and_type(pod: &ObjectMeta) -> (&str, WorkloadType) {
    let hash = pod.labels.get("pod-template-hash").map(String::as_str);
    let controller = pod.generate_name.as_ref().and(pod.controller());
    let Some(owner) = controller else {
        return match hash.and_then(|h| deployment_of_pod(&pod.name, h)) {
            Some(deployment) if pod.owner_references.is_empty() => {
                (deployment, WorkloadType::Deployment)
            }
            _ => (&pod.name, WorkloadType::Pod),
        };
    };
    match owner.kind.as_str() {
        "ReplicaSet" => match hash.and_then(|h| owner.name.strip_suffix(h)?.strip_suffix('-')) {
            Some(deployment) => (deployment, WorkloadType::Deployment),
            None => (&owner.name, WorkloadType::Pod),
        },
        "Job" => match cron_job_of_job(&owner.name) {
            Some(cron_job) => (cron_job, WorkloadType::CronJob),
            None => (&owner.name, WorkloadType::Job),
        },
        "Deployment" => (&owner.name, WorkloadType::Deployment),
        "CronJob" => (&owner.name, WorkloadType::CronJob),
        _ => (&owner.name, WorkloadType::Pod),
    }
}

/// `reviews-v1-5b9c7f-x2x4z` with hash `5b9c7f` → `reviews-v1`.
fn deployment_of_pod<'a>(pod: &'a str, hash: &str) -> Option<&'a str> {
    let (rest, _) = pod.rsplit_once('-')?;
    rest.strip_suffix(hash)?.strip_suffix('-')
}

/// `backup-28911460` → `backup`: a CronJob names each Job after its scheduled minute.
fn cron_job_of_job(job: &str) -> Option<&str> {
    let (name, stamp) = job.rsplit_once('-')?;
    let is_stamp = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (is_stamp && !name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(yaml: &str) -> ObjectMeta {
        serde_yaml::from_str(yaml).expect("metadata")
    }

    #[test]
    fn workload_names_and_types() {
        let cases = [
            // A Deployment's pod, through its ReplicaSet.
            (
                "{name: reviews-v1-5b9c7f-x2x4z, generateName: reviews-v1-5b9c7f-, labels: {pod-template-hash: 5b9c7f}, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-5b9c7f, controller: true}]}",
                "reviews-v1",
                WorkloadType::Deployment,
            ),
            // A ReplicaSet of its own (the hash is not its suffix).
            (
                "{name: rs-abcde, generateName: rs-, labels: {pod-template-hash: 5b9c7f}, ownerReferences: [{kind: ReplicaSet, name: rs, controller: true}]}",
                "rs",
                WorkloadType::Pod,
            ),
            // A CronJob's Job, and a Job of its own.
            (
                "{name: backup-28911460-q7x2p, generateName: backup-28911460-, ownerReferences: [{apiVersion: batch/v1, kind: Job, name: backup-28911460, controller: true}]}",
                "backup",
                WorkloadType::CronJob,
            ),
            (
                "{name: migrate-q7x2p, generateName: migrate-, ownerReferences: [{kind: Job, name: migrate, controller: true}]}",
                "migrate",
                WorkloadType::Job,
            ),
            (
                "{name: migrate-1234567-q7x2p, generateName: migrate-1234567-, ownerReferences: [{kind: Job, name: migrate-1234567, controller: true}]}",
                "migrate-1234567",
                WorkloadType::Job,
            ),
            // Other controllers name the workload but type it a pod.
            (
                "{name: db-0, generateName: db-, ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, controller: true}]}",
                "db",
                WorkloadType::Pod,
            ),
            // Owners that do not control it, or a name not generated: the pod itself.
            (
                "{name: p-abcde, generateName: p-, ownerReferences: [{kind: ReplicaSet, name: p}]}",
                "p-abcde",
                WorkloadType::Pod,
            ),
            (
                "{name: fixed, ownerReferences: [{kind: StatefulSet, name: s, controller: true}]}",
                "fixed",
                WorkloadType::Pod,
            ),
            // Written by hand as a Deployment's pod would be named.
            (
                "{name: reviews-v1-5b9c7f-x2x4z, labels: {pod-template-hash: 5b9c7f}}",
                "reviews-v1",
                WorkloadType::Deployment,
            ),
            (
                "{name: reviews-v1-abc}",
                "reviews-v1-abc",
                WorkloadType::Pod,
            ),
            (
                "{name: odd, labels: {pod-template-hash: 5b9c7f}}",
                "odd",
                WorkloadType::Pod,
            ),
        ];
        for (yaml, name, kind) in cases {
            let m = meta(yaml);
            assert_eq!(workload_name_and_type(&m), (name, kind), "{yaml}");
        }
    }
}
