//! Istio's HTTP metrics with Istio's names and labels (`reporter="waypoint"`), so dashboards
//! built for Envoy waypoints work unchanged, plus TCP metrics for the L4 path and the
//! waypoint's own counters.

use std::sync::{Arc, OnceLock};

use hbone::headers::Baggage;
use mesh::Snapshot;
use mesh::model::{Service, Workload};
use mesh::telemetry::{Peer, Traffic};
use plugins::{HISTOGRAM_BUCKETS, MetricValue, PluginMetrics};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Istio's standard labels, in Istio's order: the reporter, who talked to whom, then how.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Labels {
    pub reporter: &'static str,
    #[prometheus(flatten)]
    pub traffic: Traffic,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

/// Which HBONE leg and what is counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HboneLabels {
    /// `downstream` (tunnels from ztunnels) or `upstream` (tunnels to endpoints).
    pub direction: &'static str,
    /// `connections` or `streams`.
    pub kind: &'static str,
}

impl Metrics {
    /// Records what an HBONE server or pool has open.
    pub fn sample_hbone(&self, direction: &'static str, stats: &hbone::Stats) {
        for (kind, value) in [
            ("connections", stats.connections.get()),
            ("streams", stats.streams.get()),
        ] {
            self.hbone
                .get_or_create(&HboneLabels { direction, kind })
                .set(value as i64);
        }
    }
}

/// Who talked to whom, for one request or connection.
#[derive(Debug, Clone, Copy)]
pub struct Parties<'a> {
    /// The snapshot the names come from.
    pub snapshot: &'a Snapshot,
    /// The original client, if it is a known workload.
    pub source: Option<&'a Workload>,
    /// The client's identity as its ztunnel presented it.
    pub source_identity: &'a hbone::Identity,
    /// The same, as text.
    pub source_principal: &'a str,
    /// What the client's ztunnel said of it (`baggage`), for a client the configuration does
    /// not know by address.
    pub source_baggage: Option<&'a Baggage>,
    /// The destination service, if the request was addressed to one.
    pub service: Option<&'a Service>,
    /// The endpoint that answered, if one was chosen.
    pub destination: Option<&'a Workload>,
}

impl Labels {
    /// Labels for a request between `parties`.
    pub fn new(
        parties: &Parties<'_>,
        request_protocol: &'static str,
        response_code: u16,
        response_flags: &str,
    ) -> Self {
        let cluster = &parties.snapshot.options().cluster_id;
        let source = Peer::caller(
            parties.source,
            parties.source_identity,
            parties.source_principal,
            parties.source_baggage,
            cluster,
        );
        Self {
            reporter: "waypoint",
            traffic: Traffic::new(
                source,
                parties.service,
                Peer::new(parties.destination, cluster),
            ),
            request_protocol,
            response_code,
            response_flags: response_flags.to_owned(),
            connection_security_policy: "mutual_tls",
        }
    }
}

/// The waypoint's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// `istio_requests_total`.
    pub requests: Family<Labels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub duration: Family<Labels, Histogram>,
    /// `istio_request_bytes`.
    pub request_bytes: Family<Labels, Histogram>,
    /// `istio_response_bytes`.
    pub response_bytes: Family<Labels, Histogram>,
    /// `istio_tcp_connections_opened_total` (L4 path).
    pub tcp_opened: Family<Labels, Counter>,
    /// `istio_tcp_connections_closed_total` (L4 path).
    pub tcp_closed: Family<Labels, Counter>,
    /// `istio_tcp_received_bytes_total` (L4 path, client to server).
    pub tcp_received: Family<Labels, Counter>,
    /// `istio_tcp_sent_bytes_total` (L4 path, server to client).
    pub tcp_sent: Family<Labels, Counter>,
    /// Tunnels refused because the destination is not served here.
    pub refused_tunnels: Counter,
    /// Open HBONE connections and streams, downstream (from ztunnels) and upstream (to
    /// endpoints); sampled every second.
    pub hbone: Family<HboneLabels, Gauge>,
    /// Configuration snapshots applied.
    pub config_applied: Gauge,
    /// Configuration changes rejected as invalid.
    pub config_rejected: Gauge,
    /// Version of the snapshot in force: published only once its plugins are loaded.
    pub config_version: Gauge,
    /// Metrics Wasm plugins define, once the plugin host exists.
    pub plugins: Arc<OnceLock<Arc<PluginMetrics>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        // Envoy's default buckets are 0.5 ms … 3,600,000 ms; a factor-of-2 series covers the
        // same range in fewer buckets.
        let millis = || Histogram::new(exponential_buckets(0.5, 2.0, 23));
        let bytes = || Histogram::new(exponential_buckets(1.0, 4.0, 16));
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(millis),
            request_bytes: Family::new_with_constructor(bytes),
            response_bytes: Family::new_with_constructor(bytes),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_received: Family::default(),
            tcp_sent: Family::default(),
            refused_tunnels: Counter::default(),
            hbone: Family::default(),
            config_applied: Gauge::default(),
            config_rejected: Gauge::default(),
            config_version: Gauge::default(),
            plugins: Arc::default(),
        }
    }
}

impl Metrics {
    /// Registers everything under Istio's names.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Requests", self.requests.clone());
        istio.register(
            "request_duration_milliseconds",
            "Request duration",
            self.duration.clone(),
        );
        istio.register("request_bytes", "Request sizes", self.request_bytes.clone());
        istio.register(
            "response_bytes",
            "Response sizes",
            self.response_bytes.clone(),
        );
        istio.register(
            "tcp_connections_opened",
            "Connections opened",
            self.tcp_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "Connections closed",
            self.tcp_closed.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes in the request direction (client to server)",
            self.tcp_received.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes in the response direction (server to client)",
            self.tcp_sent.clone(),
        );
        let w = registry.sub_registry_with_prefix("waypoint");
        w.register(
            "tunnels_refused",
            "HBONE tunnels refused because the destination is not served by this waypoint",
            self.refused_tunnels.clone(),
        );
        w.register(
            "hbone_open",
            "Open HBONE connections and streams, by direction",
            self.hbone.clone(),
        );
        w.register(
            "config_applied",
            "Configuration snapshots applied",
            self.config_applied.clone(),
        );
        w.register(
            "config_rejected",
            "Configuration changes rejected as invalid",
            self.config_rejected.clone(),
        );
        w.register(
            "config_version",
            "Version of the configuration snapshot in force (plugins loaded)",
            self.config_version.clone(),
        );
        registry.register_collector(Box::new(PluginCollector(self.plugins.clone())));
    }
}

/// Plugin metrics under Envoy's prefix for them, `wasmcustom_`, with anything Prometheus does
/// not allow in a name turned into `_`.
#[derive(Debug)]
struct PluginCollector(Arc<OnceLock<Arc<PluginMetrics>>>);

impl Collector for PluginCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(metrics) = self.0.get() else {
            return Ok(());
        };
        for (name, value) in metrics.snapshot() {
            let name: String = format!("wasmcustom_{name}")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let help = "Defined by a Wasm plugin";
            match value {
                MetricValue::Counter(v) => {
                    // The text encoder adds `_total` to counters.
                    let name = name.strip_suffix("_total").unwrap_or(&name);
                    let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                    ConstCounter::new(v).encode(m)?;
                }
                MetricValue::Gauge(v) => {
                    let m = encoder.encode_descriptor(&name, help, None, MetricType::Gauge)?;
                    ConstGauge::new(v).encode(m)?;
                }
                MetricValue::Histogram {
                    buckets,
                    count,
                    sum,
                } => {
                    let mut previous = 0;
                    let mut per_bucket: Vec<(f64, u64)> = HISTOGRAM_BUCKETS
                        .iter()
                        .zip(&buckets)
                        .map(|(&bound, &cumulative)| {
                            let n = cumulative - previous;
                            previous = cumulative;
                            (bound, n)
                        })
                        .collect();
                    per_bucket.push((f64::MAX, count - previous));
                    let mut m =
                        encoder.encode_descriptor(&name, help, None, MetricType::Histogram)?;
                    m.encode_histogram::<Vec<(String, String)>>(
                        sum as f64,
                        count,
                        &per_bucket,
                        None,
                    )?;
                }
            }
        }
        Ok(())
    }
}
