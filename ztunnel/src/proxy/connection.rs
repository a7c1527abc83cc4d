//! One guard per connection: it writes exactly one set of metrics and one access log line,
//! however the connection ends (completed, failed, refused, or its task dropped).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hbone::Copied;
use hbone::headers::TraceParent;
use mesh::model::Workload;

use crate::metrics::{Metrics, TcpLabels};

/// Which way the connection goes, from this ztunnel's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a local workload.
    Outbound,
    /// To a local workload.
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// A workload as the access log names it: its name, namespace and cluster in fields of their
/// own (`src.workload`, `src.namespace`, `src.cluster`), as upstream logs them.
#[derive(Debug, Clone)]
pub struct LoggedWorkload {
    name: Arc<str>,
    namespace: Arc<str>,
    cluster: Arc<str>,
}

impl LoggedWorkload {
    /// `workload`, of the cluster `cluster`.
    pub fn new(workload: &Workload, cluster: &Arc<str>) -> Self {
        Self {
            name: workload.name.clone(),
            namespace: workload.namespace.clone(),
            cluster: cluster.clone(),
        }
    }
}

/// What the access log says about the two ends.
#[derive(Debug, Clone, Default)]
pub struct Ends {
    /// Client address.
    pub src_addr: Option<SocketAddr>,
    /// Client workload, when one has the client's address.
    pub src_workload: Option<LoggedWorkload>,
    /// Client identity (only with mTLS).
    pub src_identity: Option<String>,
    /// Where the bytes went: outbound the next hop, inbound the address they arrived on (for
    /// a tunnel, port 15008), as upstream logs them.
    pub dst_addr: Option<SocketAddr>,
    /// The CONNECT target, when tunnelled: as sent outbound, as received inbound (a hostname
    /// authority included).
    pub dst_hbone_addr: Option<String>,
    /// Destination service hostname.
    pub dst_service: Option<String>,
    /// Destination workload.
    pub dst_workload: Option<LoggedWorkload>,
    /// Destination identity (only with mTLS).
    pub dst_identity: Option<String>,
    /// The connection's trace context: made by the client's ztunnel and sent as `traceparent`,
    /// taken up by the server's, so one connection is found in both logs by its trace id.
    pub trace: Option<TraceParent>,
}

/// One `access` event with both ends' fields, as upstream logs them; a macro because an
/// event's level and message are part of its static metadata. The fields are computed only
/// when the level is enabled.
macro_rules! access {
    ($level:ident, $direction:expr, $ends:expr, $($rest:tt)*) => {{
        let e: &Ends = $ends;
        tracing::$level!(
            target: "access",
            direction = $direction.as_str(),
            src.addr = %addr(&e.src_addr),
            src.workload = %name(&e.src_workload),
            src.namespace = %namespace(&e.src_workload),
            src.identity = %show(&e.src_identity),
            src.cluster = %cluster(&e.src_workload),
            dst.addr = %addr(&e.dst_addr),
            dst.hbone_addr = %show(&e.dst_hbone_addr),
            dst.service = %show(&e.dst_service),
            dst.workload = %name(&e.dst_workload),
            dst.namespace = %namespace(&e.dst_workload),
            dst.identity = %show(&e.dst_identity),
            dst.cluster = %cluster(&e.dst_workload),
            trace_id = e.trace.map(|t| tracing::field::display(t.trace_id())),
            $($rest)*
        )
    }};
}
fn show(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or_default()
}

fn addr(v: &Option<SocketAddr>) -> String {
    v.map(|a| a.to_string()).unwrap_or_default()
}

fn name(w: &Option<LoggedWorkload>) -> &str {
    w.as_ref().map_or("", |w| &w.name)
}

fn namespace(w: &Option<LoggedWorkload>) -> &str {
    w.as_ref().map_or("", |w| &w.namespace)
}

fn cluster(w: &Option<LoggedWorkload>) -> &str {
    w.as_ref().map_or("", |w| &w.cluster)
}

/// Records one connection.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    labels: TcpLabels,
    direction: Direction,
    ends: Ends,
    started: Instant,
    copied: Copied,
    error: Option<String>,
    established: bool,
}

impl ConnectionGuard {
    /// Starts recording; counts the connection as opened, and logs it at debug level as
    /// upstream does (`connection opened`), with what is known of the two ends so far.
    pub fn open(
        metrics: Arc<Metrics>,
        labels: TcpLabels,
        direction: Direction,
        ends: Ends,
    ) -> Self {
        metrics.opened.get_or_create(&labels).inc();
        access!(debug, direction, &ends, "connection opened");
        Self {
            metrics,
            labels,
            direction,
            ends,
            started: Instant::now(),
            copied: Copied::default(),
            error: None,
            established: false,
        }
    }

    /// The destination's address, once known (a DNS name, resolved).
    pub fn resolved(&mut self, addr: SocketAddr) {
        self.ends.dst_addr = Some(addr);
    }

    /// The connection reached the destination.
    pub fn established(&mut self) {
        self.established = true;
    }

    /// Bytes moved (request direction first).
    pub fn copied(&mut self, copied: Copied) {
        self.copied = copied;
    }

    /// Why it failed, and the Istio response flag for metrics (`DENY`, `CONNECT`, ...).
    pub fn failed(&mut self, flag: &str, error: impl std::fmt::Display) {
        self.labels.response_flags = flag.to_owned();
        self.error = Some(error.to_string());
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let m = &self.metrics;
        if !self.established {
            m.failed.get_or_create(&self.labels).inc();
        }
        m.closed.get_or_create(&self.labels).inc();
        m.received_bytes
            .get_or_create(&self.labels)
            .inc_by(self.copied.a_to_b);
        m.sent_bytes
            .get_or_create(&self.labels)
            .inc_by(self.copied.b_to_a);
        let duration = format!("{}ms", self.started.elapsed().as_millis());
        let failure = self.error.as_deref().unwrap_or_default();
        let flags = &self.labels.response_flags;
        // As upstream logs them, from the logging ztunnel's side of the application: outbound,
        // sent is what the client sent; inbound, what went back to the caller.
        let (bytes_sent, bytes_recv) = match self.direction {
            Direction::Outbound => (self.copied.a_to_b, self.copied.b_to_a),
            Direction::Inbound => (self.copied.b_to_a, self.copied.a_to_b),
        };
        if self.error.is_none() {
            access!(info, self.direction, &self.ends, bytes_sent, bytes_recv, duration = %duration,
                response_flags = %flags, error = %failure, "connection complete");
        } else {
            access!(error, self.direction, &self.ends, bytes_sent, bytes_recv, duration = %duration,
                response_flags = %flags, error = %failure, "connection complete");
        }
    }
}
