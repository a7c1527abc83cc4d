//! Telemetry declared in one place: Istio's TCP metrics with Istio's names and labels, so
//! existing dashboards and alerts work unchanged.

use std::sync::Arc;

use mesh::model::Service;
use mesh::telemetry::{Peer, Traffic};
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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

/// Istio's TCP labels, in Istio's order: the reporter, who talked to whom, then how.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    #[prometheus(flatten)]
    pub traffic: Traffic,
    pub request_protocol: &'static str,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    /// Labels for a connection from `source` to `destination`, addressed to `service` when the
    /// caller named one.
    pub fn new(
        reporter: Reporter,
        source: Peer,
        service: Option<&Service>,
        destination: Peer,
        mutual_tls: bool,
    ) -> Self {
        Self {
            reporter,
            traffic: Traffic::new(source, service, destination),
            request_protocol: "tcp",
            response_flags: "-".to_owned(),
            connection_security_policy: if mutual_tls { "mutual_tls" } else { "unknown" },
        }
    }
}

/// The transport a DNS query came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are lowercase on the wire
pub enum DnsProtocol {
    udp,
    tcp,
}

/// The labels upstream's DNS metrics carry: what was asked, over what, and by which workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    /// The record type asked, lowercase (`a`, `aaaa`, `srv`).
    pub request_query_type: String,
    pub request_protocol: DnsProtocol,
    /// The asking workload's canonical service (`unknown` once it has left the mesh).
    pub source_canonical_service: String,
    /// Its canonical revision.
    pub source_canonical_revision: String,
}

/// The labels of `istio_on_demand_dns_total`, as upstream's: the workload whose connection
/// needed a name resolved, and the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OnDemandDnsLabels {
    pub source: Peer,
    pub hostname: String,
}

impl EncodeLabelSet for OnDemandDnsLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        self.source.encode("source", encoder)?;
        ("hostname", self.hostname.as_str()).encode(encoder.encode_label())
    }
}

/// The ztunnel's metrics.
#[derive(Debug)]
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
    /// `istio_dns_requests_total`: queries the DNS proxy received.
    pub dns_requests: Family<DnsLabels, Counter>,
    /// `istio_dns_upstream_requests_total`: queries it forwarded.
    pub dns_upstream_requests: Family<DnsLabels, Counter>,
    /// `istio_dns_upstream_failures_total`: forwarded queries no upstream resolver answered.
    pub dns_upstream_failures: Family<DnsLabels, Counter>,
    /// `istio_dns_upstream_request_duration_seconds`.
    pub dns_upstream_duration: Family<DnsLabels, Histogram>,
    /// `istio_on_demand_dns_total`: connections to an endpoint known by name, each of which
    /// looked the name up (answered from the cache or not).
    pub on_demand_dns: Family<OnDemandDnsLabels, Counter>,
    /// Queries that were not DNS messages (answered `FORMERR` when they had an id).
    pub dns_malformed: Counter,
    /// UDP queries dropped because too many were in flight for their workload.
    pub dns_dropped: Counter,
    /// `workload_manager_active_proxy_count`: workloads served (a proxy each).
    pub proxies_active: Gauge,
    /// `workload_manager_pending_proxy_count`: pods the node agent announced that are not
    /// served: the configuration names them on another node or outside the mesh, or their
    /// proxy could not start.
    pub proxies_pending: Gauge,
    /// `workload_manager_proxies_started_total`.
    pub proxies_started: Counter,
    /// `workload_manager_proxies_stopped_total`.
    pub proxies_stopped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            opened: Family::default(),
            closed: Family::default(),
            received_bytes: Family::default(),
            sent_bytes: Family::default(),
            failed: Family::default(),
            late_rejections: Counter::default(),
            config_applied: Gauge::default(),
            config_rejected: Gauge::default(),
            dns_requests: Family::default(),
            dns_upstream_requests: Family::default(),
            dns_upstream_failures: Family::default(),
            // 0.5 ms to about 4 s.
            dns_upstream_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
            on_demand_dns: Family::default(),
            dns_malformed: Counter::default(),
            dns_dropped: Counter::default(),
            proxies_active: Gauge::default(),
            proxies_pending: Gauge::default(),
            proxies_started: Counter::default(),
            proxies_stopped: Counter::default(),
        }
    }
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
        istio.register(
            "dns_requests",
            "DNS queries received by the DNS proxy",
            self.dns_requests.clone(),
        );
        istio.register(
            "dns_upstream_requests",
            "DNS queries forwarded to upstream resolvers",
            self.dns_upstream_requests.clone(),
        );
        istio.register(
            "dns_upstream_failures",
            "Forwarded DNS queries no upstream resolver answered",
            self.dns_upstream_failures.clone(),
        );
        istio.register(
            "dns_upstream_request_duration_seconds",
            "Time upstream resolvers took to answer",
            self.dns_upstream_duration.clone(),
        );
        istio.register(
            "on_demand_dns",
            "Connections whose endpoint's name was looked up",
            self.on_demand_dns.clone(),
        );
        let manager = registry.sub_registry_with_prefix("workload_manager");
        manager.register(
            "active_proxy_count",
            "Workloads served, a proxy each",
            self.proxies_active.clone(),
        );
        manager.register(
            "pending_proxy_count",
            "Pods announced by the node agent and not served yet",
            self.proxies_pending.clone(),
        );
        manager.register(
            "proxies_started",
            "Workload proxies started",
            self.proxies_started.clone(),
        );
        manager.register(
            "proxies_stopped",
            "Workload proxies stopped",
            self.proxies_stopped.clone(),
        );
        let z = registry.sub_registry_with_prefix("ztunnel");
        z.register(
            "dns_malformed_requests",
            "DNS queries that were not DNS messages",
            self.dns_malformed.clone(),
        );
        z.register(
            "dns_dropped_requests",
            "DNS queries over UDP dropped because too many were in flight",
            self.dns_dropped.clone(),
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The series upstream's dashboards read besides the traffic ones, under upstream's names.
    #[test]
    fn workload_manager_series_have_upstream_names() {
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.proxies_started.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for series in [
            "workload_manager_active_proxy_count 0\n",
            "workload_manager_pending_proxy_count 0\n",
            "workload_manager_proxies_started_total 1\n",
            "workload_manager_proxies_stopped_total 0\n",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }
}
