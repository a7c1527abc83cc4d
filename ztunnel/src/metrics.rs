//! Telemetry declared in one place: Istio's TCP metrics with Istio's names and labels, so
//! existing dashboards and alerts work unchanged.

use std::sync::Arc;

use hbone::headers::Baggage;
use mesh::Snapshot;
use mesh::model::{Service, Workload};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which end of the connection reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are lowercase on the wire
pub enum Reporter {
    /// The client's ztunnel.
    source,
    /// The server's ztunnel.
    destination,
}

/// Istio's traffic labels, in Istio's order. Unknown values render as `unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

const UNKNOWN: &str = "unknown";

impl TcpLabels {
    /// Labels for a connection between `source` and `destination` (either may be unknown).
    pub fn new(
        reporter: Reporter,
        snapshot: &Snapshot,
        source: Option<&Workload>,
        destination: Option<&Workload>,
        service: Option<&Service>,
        mutual_tls: bool,
    ) -> Self {
        let cluster = snapshot.options().cluster_id.clone();
        let text = |s: Option<&str>| s.map_or(UNKNOWN.to_owned(), str::to_owned);
        let principal =
            |w: Option<&Workload>| w.map_or(UNKNOWN.to_owned(), |w| w.identity.to_string());
        Self {
            reporter,
            source_workload: text(source.map(|w| &*w.workload_name)),
            source_canonical_service: text(source.map(|w| &*w.canonical_name)),
            source_canonical_revision: text(source.map(|w| &*w.canonical_revision)),
            source_workload_namespace: text(source.map(|w| &*w.namespace)),
            source_principal: principal(source),
            source_app: text(source.map(|w| &*w.canonical_name)),
            source_version: text(source.map(|w| &*w.canonical_revision)),
            source_cluster: text(source.map(|_| cluster.as_str())),
            destination_service: text(service.map(|s| &*s.hostname)),
            destination_service_namespace: text(service.map(|s| &*s.namespace)),
            destination_service_name: text(service.map(|s| &*s.name)),
            destination_workload: text(destination.map(|w| &*w.workload_name)),
            destination_canonical_service: text(destination.map(|w| &*w.canonical_name)),
            destination_canonical_revision: text(destination.map(|w| &*w.canonical_revision)),
            destination_workload_namespace: text(destination.map(|w| &*w.namespace)),
            destination_principal: principal(destination),
            destination_app: text(destination.map(|w| &*w.canonical_name)),
            destination_version: text(destination.map(|w| &*w.canonical_revision)),
            destination_cluster: text(destination.map(|_| cluster.as_str())),
            request_protocol: "tcp".to_owned(),
            response_flags: "-".to_owned(),
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "unknown" }
                .to_owned(),
        }
    }
}

impl TcpLabels {
    /// Fills in a source the configuration does not know by its address (a peer behind a
    /// gateway, in another cluster, or dialling from an address that is not its workload's), as
    /// upstream does: its principal and namespace from what mTLS proved, the rest from the
    /// `baggage` it sent, which is its own word and is used for telemetry only.
    #[must_use]
    pub fn with_peer(mut self, peer: &hbone::Identity, baggage: Option<&Baggage>) -> Self {
        if self.source_principal != UNKNOWN {
            return self;
        }
        self.source_principal = peer.to_string();
        self.source_workload_namespace = peer.namespace().to_owned();
        let Some(b) = baggage else {
            return self;
        };
        let set = |label: &mut String, value: Option<&String>| {
            if let Some(v) = value {
                v.clone_into(label);
            }
        };
        set(
            &mut self.source_workload,
            b.workload.as_ref().map(|(_, name)| name),
        );
        set(&mut self.source_canonical_service, b.service_name.as_ref());
        set(&mut self.source_app, b.service_name.as_ref());
        set(
            &mut self.source_canonical_revision,
            b.service_version.as_ref(),
        );
        set(&mut self.source_version, b.service_version.as_ref());
        set(&mut self.source_cluster, b.cluster.as_ref());
        self
    }
}

/// The ztunnel's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `istio_tcp_connections_opened_total`.
    pub opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total`: the request direction (client to server), for both
    /// reporters, as Istio counts it.
    pub received_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total`: the response direction.
    pub sent_bytes: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_failed_total`.
    pub failed: Family<TcpLabels, Counter>,
    /// Live connections closed because a new policy denies them.
    pub late_rejections: Counter,
    /// Configuration changes applied and rejected.
    pub config_applied: Gauge,
    /// Configuration changes rejected.
    pub config_rejected: Gauge,
}

impl Metrics {
    /// Registers everything under Istio's names.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register(
            "tcp_connections_opened",
            "Connections opened",
            self.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "Connections closed",
            self.closed.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes in the request direction (client to server)",
            self.received_bytes.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes in the response direction (server to client)",
            self.sent_bytes.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "Connections that failed before or while connecting",
            self.failed.clone(),
        );
        let z = registry.sub_registry_with_prefix("ztunnel");
        z.register(
            "authorization_late_rejections",
            "Live connections closed because a configuration change denies them",
            self.late_rejections.clone(),
        );
        z.register(
            "config_applied",
            "Configuration snapshots applied",
            self.config_applied.clone(),
        );
        z.register(
            "config_rejected",
            "Configuration changes rejected as invalid",
            self.config_rejected.clone(),
        );
    }
}
