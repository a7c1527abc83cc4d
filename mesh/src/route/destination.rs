//! `DestinationRule` → [`DestinationPolicy`]: how traffic to a host (or one of its subsets) is
//! balanced, pooled and protected.
//!
//! Every setting gets its documented Istio default, so the waypoint never interprets absence.
//! A subset's `trafficPolicy` overrides the host's section by section (`loadBalancer`,
//! `connectionPool`, `outlierDetection` each replaced whole), which is how Istio merges them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use super::ServiceResolver;
use super::locality_lb::{self, LocalityLb};
use super::lower_common::{Problems, check_export_to, duration, header_name};
use super::spec_destination::{
    ConnectionPoolSettings, ConsistentHashLb, DestinationRuleSpec, H2UpgradePolicy,
    LoadBalancerSettings, OutlierDetectionSettings, SimpleLb, TrafficPolicySpec,
};
use super::upstream_tls::{self, UpstreamTls};
use crate::FieldError;

/// The lowered DestinationRule of one host.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationPolicy {
    /// FQDN of the host, or the wildcard pattern as written (`*.example.com`).
    pub host: Arc<str>,
    /// Policy for traffic not sent to a subset.
    pub traffic: TrafficPolicy,
    /// Subsets, in declaration order.
    pub subsets: Vec<Subset>,
    /// The policy for destination ports with `portLevelSettings` (the host's or a subset's).
    pub ports: Vec<(u16, TrafficPolicy)>,
}

impl DestinationPolicy {
    /// The subset named `name`, which routes refer to.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| &*s.name == name)
    }

    /// The policy for traffic to destination port `port` of `subset` (or of no subset), as
    /// Istio merges it: the host's, its port-level settings, the subset's, and the subset's
    /// port-level settings, each replacing the sections it sets. `None` for an unknown subset.
    pub fn traffic(&self, subset: Option<&str>, port: u16) -> Option<&TrafficPolicy> {
        let (ports, traffic) = match subset {
            Some(name) => {
                let s = self.subset(name)?;
                (&s.ports, &s.traffic)
            }
            None => (&self.ports, &self.traffic),
        };
        let at_port = ports.iter().find(|(p, _)| *p == port);
        Some(at_port.map_or(traffic, |(_, t)| t))
    }
}

/// A named set of endpoints and its policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    /// Name.
    pub name: Arc<str>,
    /// Endpoints carrying all these labels belong to it.
    pub labels: BTreeMap<String, String>,
    /// The subset's policy, already merged over the host's.
    pub traffic: TrafficPolicy,
    /// The subset's policy for destination ports with `portLevelSettings`.
    pub ports: Vec<(u16, TrafficPolicy)>,
}

/// Load balancing, connection limits and outlier detection for one host or subset.
/// `Default` is what a host without a DestinationRule gets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficPolicy {
    /// Endpoint choice.
    pub load_balancer: LoadBalancer,
    /// Connection limits.
    pub connection_pool: ConnectionPool,
    /// Ejection of failing endpoints; `None` = off (Istio's default).
    pub outlier_detection: Option<OutlierDetection>,
    /// How endpoints near the waypoint are preferred (`localityLbSetting`); a preference is
    /// kept only with outlier detection, as istiod sets Envoy's locality priorities only then,
    /// since without ejections traffic would never fail over to a farther endpoint.
    pub locality: LocalityLb,
    /// TLS to originate to endpoints out of the mesh; `None`: plain.
    pub tls: Option<Arc<UpstreamTls>>,
}

/// How an endpoint is chosen.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum LoadBalancer {
    /// In turn.
    RoundRobin,
    /// Fewest outstanding requests of two random picks; Istio's default (`UNSPECIFIED`).
    #[default]
    LeastRequest,
    /// Uniformly random.
    Random,
    /// The original destination address, without balancing.
    Passthrough,
    /// The same key goes to the same endpoint while the endpoint set is stable.
    ConsistentHash(ConsistentHash),
}

/// Consistent hashing: what is hashed and onto which table.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsistentHash {
    /// The request attribute hashed.
    pub key: HashKey,
    /// The hash table.
    pub table: HashTable,
}

/// The request attribute a consistent hash uses.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    /// A request header.
    Header(HeaderName),
    /// A cookie; when missing and `ttl` is set, the proxy generates it.
    Cookie {
        /// Cookie name.
        name: Arc<str>,
        /// Cookie path.
        path: Option<Arc<str>>,
        /// Lifetime of a generated cookie.
        ttl: Option<Duration>,
    },
    /// The client IP.
    SourceIp,
    /// A query parameter.
    QueryParameter(Arc<str>),
}

/// The table a consistent hash maps onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashTable {
    /// Ketama ring.
    RingHash {
        /// Minimum ring entries (default 1024).
        minimum_ring_size: u64,
    },
    /// Maglev table.
    Maglev {
        /// Table size, a prime (default 65537).
        table_size: u64,
    },
}

/// Connection limits; overflow is answered with 503 at once.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionPool {
    /// Connections to all endpoints (default 2^32-1).
    pub max_connections: u32,
    /// Connect deadline (default 10s).
    pub connect_timeout: Duration,
    /// TCP keepalive; `None` = the OS settings.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Maximum connection lifetime; `None` = unlimited.
    pub max_connection_duration: Option<Duration>,
    /// Close TCP connections idle this long (default 1h).
    pub tcp_idle_timeout: Duration,
    /// Requests queued for a connection (default 2^32-1).
    pub http1_max_pending_requests: u32,
    /// Concurrent requests (default 2^32-1).
    pub http2_max_requests: u32,
    /// Requests per connection; 0 = unlimited (default), 1 = no keep-alive.
    pub max_requests_per_connection: u32,
    /// Concurrent retries (default 2^32-1).
    pub max_retries: u32,
    /// Close HTTP connections idle this long (default 1h).
    pub http_idle_timeout: Duration,
    /// HTTP/2 upgrade of HTTP/1.1 upstream connections.
    pub h2_upgrade: H2Upgrade,
    /// Speak the client's protocol to the upstream.
    pub use_client_protocol: bool,
    /// Concurrent streams per HTTP/2 connection (default 2^31-1).
    pub max_concurrent_streams: u32,
}

impl Default for ConnectionPool {
    /// Istio's defaults: effectively unlimited, so only explicit limits shed load.
    fn default() -> Self {
        Self {
            max_connections: u32::MAX,
            connect_timeout: Duration::from_secs(10),
            tcp_keepalive: None,
            max_connection_duration: None,
            tcp_idle_timeout: Duration::from_secs(3600),
            http1_max_pending_requests: u32::MAX,
            http2_max_requests: u32::MAX,
            max_requests_per_connection: 0,
            max_retries: u32::MAX,
            http_idle_timeout: Duration::from_secs(3600),
            h2_upgrade: H2Upgrade::Default,
            use_client_protocol: false,
            max_concurrent_streams: 2_147_483_647,
        }
    }
}

/// TCP keepalive settings; `None` fields keep the OS default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Unanswered probes before the connection is dead.
    pub probes: Option<u32>,
    /// Idle time before the first probe.
    pub time: Option<Duration>,
    /// Time between probes.
    pub interval: Option<Duration>,
}

/// Whether HTTP/1.1 upstream connections are upgraded to HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Upgrade {
    /// The mesh-wide setting (which defaults to not upgrading).
    Default,
    /// Keep HTTP/1.1.
    DoNotUpgrade,
    /// Upgrade.
    Upgrade,
}

/// Outlier detection, with Istio's defaults for absent fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Consecutive 5xx (or connect errors) before ejection; default 5, 0 disables.
    pub consecutive_5xx_errors: u32,
    /// Consecutive 502/503/504 before ejection; `None` = off (default).
    pub consecutive_gateway_errors: Option<u32>,
    /// Consecutive local-origin failures before ejection, when split; `None` = Envoy's 5.
    pub consecutive_local_origin_failures: Option<u32>,
    /// Analysis period (default 10s).
    pub interval: Duration,
    /// Ejection time, multiplied by the number of ejections (default 30s).
    pub base_ejection_time: Duration,
    /// Cap on ejected endpoints, percent (default 10; at least one is always ejectable).
    pub max_ejection_percent: u32,
    /// Ejection stops below this healthy share, percent (default 0).
    pub min_health_percent: u32,
    /// Count local-origin failures separately from upstream responses.
    pub split_external_local_origin_errors: bool,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: None,
            consecutive_local_origin_failures: None,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
            split_external_local_origin_errors: false,
        }
    }
}

/// Lowers one DestinationRule (`namespace`/`name`). A short `host` resolves relative to the
/// rule's namespace; a wildcard host is kept as written for the caller to match; any other host
/// that is not a known service is reported at `spec.host`.
pub fn lower_destination_rule(
    namespace: &str,
    name: &str,
    spec: &DestinationRuleSpec,
    services: &dyn ServiceResolver,
) -> Result<DestinationPolicy, Vec<FieldError>> {
    let mut problems = Problems::default();
    let host: Arc<str> = if spec.host.contains('*') {
        Arc::from(spec.host.as_str())
    } else if let Some(service) = services.host(&spec.host, namespace) {
        service.hostname
    } else {
        problems.push(
            "spec.host",
            format!(
                "no Service or ServiceEntry has host {:?} (short names resolve in namespace {namespace:?}); host must name an existing service or a wildcard",
                spec.host
            ),
        );
        Arc::from(spec.host.as_str())
    };
    check_export_to(&spec.export_to, "DestinationRule", namespace, &mut problems);
    let own = |e: &String| e == "." || e == namespace;
    if spec.workload_selector.is_some() && !spec.export_to.iter().all(own) {
        problems.push(
            "spec.exportTo",
            "a DestinationRule with a workloadSelector cannot be exported beyond its namespace",
        );
    }
    // What is accepted but not applied, said once per load with the rule's name.
    let mut unapplied = Vec::new();
    let base = Sections::lower(
        spec.traffic_policy.as_ref(),
        "spec.trafficPolicy",
        &mut problems,
        &mut unapplied,
    );
    let base_ports = port_sections(
        spec.traffic_policy.as_ref(),
        "spec.trafficPolicy",
        &mut problems,
        &mut unapplied,
    );
    // The host's policy at a port: its port-level settings, whole (what they leave unset is
    // the default, not the host's, as istiod reads them), else its own.
    let host_at = |port: u16| match base_ports.iter().find(|(p, _)| *p == port) {
        Some((_, sections)) => sections.clone(),
        None => base.clone(),
    };
    let mut ports: Vec<u16> = base_ports.iter().map(|(p, _)| *p).collect();
    let mut subsets: Vec<Subset> = Vec::new();
    for (k, subset) in spec.subsets.iter().enumerate() {
        let field = format!("spec.subsets[{k}]");
        if subset.name.is_empty() {
            problems.push(format!("{field}.name"), "every subset needs a name");
        } else if subsets.iter().any(|s| *s.name == *subset.name) {
            problems.push(
                format!("{field}.name"),
                format!(
                    "subset {:?} is defined twice; subset names must be unique",
                    subset.name
                ),
            );
        }
        let field = format!("{field}.trafficPolicy");
        let policy = subset.traffic_policy.as_ref();
        let own = Sections::lower(policy, &field, &mut problems, &mut unapplied);
        let own_ports = port_sections(policy, &field, &mut problems, &mut unapplied);
        let at_ports = (base_ports.iter().chain(&own_ports))
            .map(|(p, _)| *p)
            .collect::<BTreeSet<u16>>()
            .into_iter()
            .map(|port| {
                // The subset's own port-level settings whole, else its sections over the
                // host's policy at that port.
                let merged = match own_ports.iter().find(|(p, _)| *p == port) {
                    Some((_, sections)) => sections.clone(),
                    None => own.clone().over(&host_at(port)),
                };
                (port, merged.resolve())
            })
            .collect();
        ports.extend(own_ports.iter().map(|(p, _)| *p));
        subsets.push(Subset {
            name: Arc::from(subset.name.as_str()),
            labels: subset.labels.clone(),
            traffic: own.over(&base).resolve(),
            ports: at_ports,
        });
    }
    ports.sort_unstable();
    ports.dedup();
    for message in unapplied {
        tracing::warn!(namespace, name, "DestinationRule: {message}");
    }
    let ports = (ports.into_iter())
        .map(|port| (port, host_at(port).resolve()))
        .collect();
    problems.finish(DestinationPolicy {
        host,
        traffic: base.resolve(),
        subsets,
        ports,
    })
}

/// The sections each of `spec`'s `portLevelSettings` sets, by port.
fn port_sections(
    spec: Option<&TrafficPolicySpec>,
    field: &str,
    problems: &mut Problems,
    unapplied: &mut Vec<String>,
) -> Vec<(u16, Sections)> {
    let mut out: Vec<(u16, Sections)> = Vec::new();
    for (k, settings) in spec.iter().flat_map(|s| &s.port_level_settings).enumerate() {
        let field = format!("{field}.portLevelSettings[{k}]");
        let port = settings.port.as_ref().map(|p| p.number);
        let Some(port) = port.and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0) else {
            problems.push(
                format!("{field}.port"),
                "needs a port number from 1 to 65535",
            );
            continue;
        };
        if out.iter().any(|(p, _)| *p == port) {
            unapplied.push(format!(
                "{field}: port {port} is set before; the first applies"
            ));
            continue;
        }
        if settings.connection_pool.is_some() {
            unapplied.push(format!(
                "{field}.connectionPool: its timeouts apply to the port, its connection and \
                 request limits do not (the host's do)"
            ));
        }
        let locality =
            (settings.load_balancer.as_ref()).is_some_and(|lb| lb.locality_lb_setting.is_some());
        if locality || settings.outlier_detection.is_some() {
            unapplied.push(format!(
                "{field}: the preference for near endpoints is the host's, not the port's"
            ));
        }
        let sections = TrafficPolicySpec {
            load_balancer: settings.load_balancer.clone(),
            connection_pool: settings.connection_pool.clone(),
            outlier_detection: settings.outlier_detection.clone(),
            tls: settings.tls.clone(),
            ..TrafficPolicySpec::default()
        };
        out.push((
            port,
            Sections::lower(Some(&sections), &field, problems, unapplied),
        ));
    }
    out
}

/// The sections a traffic policy sets; absent sections are inherited, then defaulted.
#[derive(Debug, Clone, Default)]
struct Sections {
    /// The algorithm and the locality setting, which Istio replaces together (one section).
    load_balancer: Option<(LoadBalancer, LocalityLb)>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierDetection>,
    tls: Option<Option<Arc<UpstreamTls>>>,
}

impl Sections {
    fn lower(
        spec: Option<&TrafficPolicySpec>,
        field: &str,
        problems: &mut Problems,
        unapplied: &mut Vec<String>,
    ) -> Self {
        let Some(spec) = spec else {
            return Self::default();
        };
        Self {
            load_balancer: (spec.load_balancer.as_ref()).map(|lb| {
                let field = format!("{field}.loadBalancer");
                let setting = lb.locality_lb_setting.as_ref();
                let locality = locality_lb::lower(
                    setting,
                    &format!("{field}.localityLbSetting"),
                    problems,
                    unapplied,
                );
                (load_balancer(lb, &field, problems), locality)
            }),
            connection_pool: (spec.connection_pool.as_ref())
                .map(|p| connection_pool(p, &format!("{field}.connectionPool"), problems)),
            outlier_detection: (spec.outlier_detection.as_ref())
                .map(|o| outlier_detection(o, &format!("{field}.outlierDetection"), problems)),
            tls: (spec.tls.as_ref())
                .map(|t| upstream_tls::lower(t, &format!("{field}.tls"), problems)),
        }
    }

    fn over(self, base: &Sections) -> Self {
        Self {
            load_balancer: self.load_balancer.or_else(|| base.load_balancer.clone()),
            connection_pool: self
                .connection_pool
                .or_else(|| base.connection_pool.clone()),
            outlier_detection: self.outlier_detection.or(base.outlier_detection),
            tls: self.tls.or_else(|| base.tls.clone()),
        }
    }

    fn resolve(self) -> TrafficPolicy {
        let (load_balancer, locality) = (self.load_balancer)
            .unwrap_or_else(|| (LoadBalancer::default(), LocalityLb::mesh_default()));
        TrafficPolicy {
            load_balancer,
            connection_pool: self.connection_pool.unwrap_or_default(),
            locality: locality.needing_ejections(self.outlier_detection.is_some()),
            outlier_detection: self.outlier_detection,
            tls: self.tls.flatten(),
        }
    }
}

fn load_balancer(lb: &LoadBalancerSettings, field: &str, problems: &mut Problems) -> LoadBalancer {
    match (lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => {
            problems.push(field, "set simple or consistentHash, not both");
            LoadBalancer::default()
        }
        (Some(SimpleLb::RoundRobin), None) => LoadBalancer::RoundRobin,
        (Some(SimpleLb::Random), None) => LoadBalancer::Random,
        (Some(SimpleLb::Passthrough), None) => LoadBalancer::Passthrough,
        (Some(SimpleLb::Unspecified | SimpleLb::LeastConn | SimpleLb::LeastRequest), None)
        | (None, None) => LoadBalancer::LeastRequest,
        (None, Some(hash)) => consistent_hash(hash, &format!("{field}.consistentHash"), problems)
            .map_or_else(LoadBalancer::default, LoadBalancer::ConsistentHash),
    }
}

/// RFC 9110's `tchar`: what a cookie name (a token) may contain.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn consistent_hash(
    hash: &ConsistentHashLb,
    field: &str,
    problems: &mut Problems,
) -> Option<ConsistentHash> {
    let mut keys: Vec<HashKey> = Vec::new();
    if let Some(header) = &hash.http_header_name {
        keys.extend(
            problems
                .check(header_name(header, &format!("{field}.httpHeaderName")))
                .map(HashKey::Header),
        );
    }
    if let Some(cookie) = &hash.http_cookie {
        let ttl = (cookie.ttl.as_deref())
            .and_then(|t| problems.check(duration(t, &format!("{field}.httpCookie.ttl"))));
        // A generated cookie goes out in a `set-cookie` header: its name must be a token and
        // its path must not end the attribute early.
        if cookie.name.is_empty() || !cookie.name.bytes().all(is_token_char) {
            problems.push(
                format!("{field}.httpCookie.name"),
                format!(
                    "{:?} is not a valid cookie name; use letters, digits and !#$%&'*+-.^_`|~",
                    cookie.name
                ),
            );
        }
        if let Some(path) = &cookie.path
            && !path.bytes().all(|b| b.is_ascii_graphic() && b != b';')
        {
            problems.push(
                format!("{field}.httpCookie.path"),
                format!("{path:?} is not a valid cookie path; it may not contain ';' or spaces"),
            );
        }
        keys.push(HashKey::Cookie {
            name: Arc::from(cookie.name.as_str()),
            path: cookie.path.as_deref().map(Arc::from),
            ttl,
        });
    }
    if hash.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(param) = &hash.http_query_parameter_name {
        keys.push(HashKey::QueryParameter(Arc::from(param.as_str())));
    }
    const KEYS: &str = "httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName";
    let key = match keys.len() {
        1 => keys.pop(),
        0 if hash.http_header_name.is_some() => None, // the bad header name was reported
        0 => {
            problems.push(field, format!("set one of {KEYS}"));
            None
        }
        _ => {
            problems.push(field, format!("set only one of {KEYS}"));
            None
        }
    }?;
    let ring = |size: Option<u64>| HashTable::RingHash {
        minimum_ring_size: size.or(hash.minimum_ring_size).unwrap_or(1024),
    };
    let table = match (&hash.ring_hash, &hash.maglev) {
        (Some(_), Some(_)) => {
            problems.push(field, "set ringHash or maglev, not both");
            return None;
        }
        (Some(r), None) => ring(r.minimum_ring_size),
        (None, Some(m)) => HashTable::Maglev {
            table_size: m.table_size.unwrap_or(65537),
        },
        (None, None) => ring(None),
    };
    Some(ConsistentHash { key, table })
}

fn connection_pool(
    p: &ConnectionPoolSettings,
    field: &str,
    problems: &mut Problems,
) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    let mut time = |text: &Option<String>, at: &str| {
        (text.as_deref()).and_then(|t| problems.check(duration(t, &format!("{field}.{at}"))))
    };
    // A limit of 0 is unset, as Istio reads these fields (it applies only values above zero):
    // taken literally it would refuse every request.
    let or = |value: Option<u32>, default: u32| value.filter(|&n| n > 0).unwrap_or(default);
    if let Some(tcp) = &p.tcp {
        out.max_connections = or(tcp.max_connections, out.max_connections);
        out.connect_timeout =
            time(&tcp.connect_timeout, "tcp.connectTimeout").unwrap_or(out.connect_timeout);
        out.tcp_keepalive = tcp.tcp_keepalive.as_ref().map(|k| TcpKeepalive {
            probes: k.probes,
            time: time(&k.time, "tcp.tcpKeepalive.time"),
            interval: time(&k.interval, "tcp.tcpKeepalive.interval"),
        });
        out.max_connection_duration =
            time(&tcp.max_connection_duration, "tcp.maxConnectionDuration");
        out.tcp_idle_timeout =
            time(&tcp.idle_timeout, "tcp.idleTimeout").unwrap_or(out.tcp_idle_timeout);
    }
    if let Some(http) = &p.http {
        out.http1_max_pending_requests = or(
            http.http1_max_pending_requests,
            out.http1_max_pending_requests,
        );
        out.http2_max_requests = or(http.http2_max_requests, out.http2_max_requests);
        out.max_requests_per_connection = http.max_requests_per_connection.unwrap_or(0);
        out.max_retries = or(http.max_retries, out.max_retries);
        out.http_idle_timeout =
            time(&http.idle_timeout, "http.idleTimeout").unwrap_or(out.http_idle_timeout);
        out.h2_upgrade = match http.h2_upgrade_policy {
            None | Some(H2UpgradePolicy::Default) => H2Upgrade::Default,
            Some(H2UpgradePolicy::DoNotUpgrade) => H2Upgrade::DoNotUpgrade,
            Some(H2UpgradePolicy::Upgrade) => H2Upgrade::Upgrade,
        };
        out.use_client_protocol = http.use_client_protocol.unwrap_or(false);
        out.max_concurrent_streams = or(http.max_concurrent_streams, out.max_concurrent_streams);
    }
    out
}

fn outlier_detection(
    o: &OutlierDetectionSettings,
    field: &str,
    problems: &mut Problems,
) -> OutlierDetection {
    let defaults = OutlierDetection::default();
    let mut time = |text: &Option<String>, at: &str| {
        (text.as_deref()).and_then(|t| problems.check(duration(t, &format!("{field}.{at}"))))
    };
    let interval = time(&o.interval, "interval").unwrap_or(defaults.interval);
    let base_ejection_time =
        time(&o.base_ejection_time, "baseEjectionTime").unwrap_or(defaults.base_ejection_time);
    let mut share = |value: Option<u32>, at: &str, default: u32| match value {
        Some(v) if v > 100 => {
            problems.push(
                format!("{field}.{at}"),
                format!("{v} is not a percentage; use 0 to 100"),
            );
            default
        }
        Some(v) => v,
        None => default,
    };
    OutlierDetection {
        consecutive_5xx_errors: o
            .consecutive_5xx_errors
            .unwrap_or(defaults.consecutive_5xx_errors),
        consecutive_gateway_errors: o.consecutive_gateway_errors.filter(|&n| n > 0),
        consecutive_local_origin_failures: o.consecutive_local_origin_failures,
        interval,
        base_ejection_time,
        max_ejection_percent: share(
            o.max_ejection_percent,
            "maxEjectionPercent",
            defaults.max_ejection_percent,
        ),
        min_health_percent: share(
            o.min_health_percent,
            "minHealthPercent",
            defaults.min_health_percent,
        ),
        split_external_local_origin_errors: o.split_external_local_origin_errors.unwrap_or(false),
    }
}

#[cfg(test)]
#[path = "destination_tests.rs"]
mod tests;
