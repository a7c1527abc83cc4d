//! The metadata headers an HBONE CONNECT carries, as upstream ztunnel writes and reads them.
//!
//! * `forwarded`: `for="<client ip:port>"`, plus `;host=<service hostname>` when the target was a
//!   known service (the destination uses it to attribute the service in telemetry).
//! * `baggage`: the source workload's metadata as a W3C baggage list (and, on the 200, the
//!   destination's).
//! * `traceparent`: a W3C trace context, random per connection, so one connection can be followed
//!   across proxies in the logs.
//!
//! Parsing is lenient in what it ignores (unknown baggage keys, extra `forwarded` parameters) and
//! strict in what it accepts: a value that does not parse is treated as absent, never guessed.

use std::fmt;
use std::net::SocketAddr;

/// Header names, lowercase as HTTP/2 requires.
pub mod name {
    /// RFC 7239 `forwarded`.
    pub const FORWARDED: &str = "forwarded";
    /// W3C `baggage`.
    pub const BAGGAGE: &str = "baggage";
    /// W3C `traceparent`.
    pub const TRACEPARENT: &str = "traceparent";
}

/// The `forwarded` header of a CONNECT: who the original client was, and which service it called.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// The original client address (`for=`).
    pub client: Option<SocketAddr>,
    /// The service hostname the client addressed (`host=`).
    pub host: Option<String>,
}

impl Forwarded {
    /// Parses the first forwarded element; later elements (added by further hops) are ignored,
    /// because HBONE has exactly one forwarding hop per tunnel.
    pub fn parse(value: &str) -> Forwarded {
        let first = value.split(',').next().unwrap_or_default();
        let mut out = Forwarded::default();
        for pair in first.split(';') {
            let Some((key, val)) = pair.split_once('=') else {
                continue;
            };
            let val = unquote(val.trim());
            match key.trim().to_ascii_lowercase().as_str() {
                "for" => out.client = val.parse().ok(),
                "host" if is_token_host(val) => out.host = Some(val.to_ascii_lowercase()),
                _ => {}
            }
        }
        out
    }
}

impl fmt::Display for Forwarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(client) = self.client {
            write!(f, "for=\"{client}\"")?;
            sep = ";";
        }
        if let Some(host) = &self.host {
            write!(f, "{sep}host={host}")?;
        }
        Ok(())
    }
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

fn is_token_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// A workload's metadata carried in `baggage`, in the keys upstream ztunnel uses: the source's
/// on a CONNECT, the destination's on its 200.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`
    pub cluster: Option<String>,
    /// `k8s.namespace.name`
    pub namespace: Option<String>,
    /// `k8s.<type>.name`: the workload's type (deployment, cronjob, pod, job) and its name.
    pub workload: Option<(WorkloadType, String)>,
    /// `service.name`: the canonical service.
    pub service_name: Option<String>,
    /// `service.version`: the canonical revision.
    pub service_version: Option<String>,
    /// `cloud.region`
    pub region: Option<String>,
    /// `cloud.availability_zone`
    pub zone: Option<String>,
}

/// The kind of controller behind a workload (WDS `workload_type`), as baggage names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkloadType {
    /// `k8s.deployment.name`: a Deployment's pod (through its ReplicaSet).
    Deployment,
    /// `k8s.cronjob.name`: a pod of a CronJob's Job.
    CronJob,
    /// `k8s.pod.name`: a pod on its own, or of any other controller (StatefulSet, DaemonSet).
    #[default]
    Pod,
    /// `k8s.job.name`: a Job's pod.
    Job,
}

impl WorkloadType {
    fn key(self) -> &'static str {
        match self {
            WorkloadType::Deployment => "k8s.deployment.name",
            WorkloadType::CronJob => "k8s.cronjob.name",
            WorkloadType::Pod => "k8s.pod.name",
            WorkloadType::Job => "k8s.job.name",
        }
    }
}

/// Lowercase, as upstream ztunnel names it in baggage keys and its configuration dump.
impl fmt::Display for WorkloadType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkloadType::Deployment => "deployment",
            WorkloadType::CronJob => "cronjob",
            WorkloadType::Pod => "pod",
            WorkloadType::Job => "job",
        })
    }
}

impl Baggage {
    /// Parses a baggage list. Unknown keys, properties (`;k=v`) and malformed members are skipped.
    pub fn parse(value: &str) -> Baggage {
        let mut out = Baggage::default();
        for member in value.split(',') {
            let kv = member.split(';').next().unwrap_or_default();
            let Some((key, val)) = kv.split_once('=') else {
                continue;
            };
            let val = val.trim();
            if val.is_empty() || !val.bytes().all(is_baggage_octet) {
                continue;
            }
            let val = Some(val.to_owned());
            match key.trim() {
                "k8s.cluster.name" => out.cluster = val,
                "k8s.namespace.name" => out.namespace = val,
                "k8s.deployment.name" => out.workload = val.map(|v| (WorkloadType::Deployment, v)),
                "k8s.cronjob.name" => out.workload = val.map(|v| (WorkloadType::CronJob, v)),
                "k8s.pod.name" => out.workload = val.map(|v| (WorkloadType::Pod, v)),
                "k8s.job.name" => out.workload = val.map(|v| (WorkloadType::Job, v)),
                "service.name" => out.service_name = val,
                "service.version" => out.service_version = val,
                "cloud.region" => out.region = val,
                "cloud.availability_zone" => out.zone = val,
                _ => {}
            }
        }
        out
    }
}

/// W3C baggage values are printable ASCII without `"`, `,`, `;`, `\` or spaces.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

impl fmt::Display for Baggage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let workload = self.workload.as_ref().map(|(k, v)| (k.key(), v));
        let items = [
            Some("k8s.cluster.name").zip(self.cluster.as_ref()),
            Some("k8s.namespace.name").zip(self.namespace.as_ref()),
            workload,
            Some("service.name").zip(self.service_name.as_ref()),
            Some("service.version").zip(self.service_version.as_ref()),
            Some("cloud.region").zip(self.region.as_ref()),
            Some("cloud.availability_zone").zip(self.zone.as_ref()),
        ];
        let mut sep = "";
        // Empty and unencodable values are omitted, as upstream does.
        for (key, val) in items.into_iter().flatten() {
            if val.is_empty() || !val.bytes().all(is_baggage_octet) {
                continue;
            }
            write!(f, "{sep}{key}={val}")?;
            sep = ",";
        }
        Ok(())
    }
}

/// A W3C `traceparent` (version 00).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The 128-bit trace id (never zero).
    pub trace_id: u128,
    /// The 64-bit parent span id (never zero).
    pub span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A fresh random trace context, one per outbound connection.
    pub fn random() -> TraceParent {
        TraceParent {
            trace_id: rand::random::<u128>().max(1),
            span_id: rand::random::<u64>().max(1),
            flags: 0,
        }
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; anything else (including all-zero ids) is `None`.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let value = value.trim();
        let mut it = value.split('-');
        let (version, trace, span, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some()
            || version != "00"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !(hex(trace) && hex(span) && hex(flags)) {
            return None;
        }
        let tp = TraceParent {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (tp.trace_id != 0 && tp.span_id != 0).then_some(tp)
    }
}

impl TraceParent {
    /// The trace id as logs show it (32 lowercase hex digits), the same at every hop.
    pub fn trace_id(&self) -> TraceId {
        TraceId(self.trace_id)
    }
}

/// A trace id, displayed as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceId(pub u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The metadata of one CONNECT, in both directions of the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectHeaders {
    /// `forwarded`
    pub forwarded: Option<Forwarded>,
    /// `baggage`
    pub baggage: Option<Baggage>,
    /// `traceparent`
    pub traceparent: Option<TraceParent>,
}

impl ConnectHeaders {
    /// Reads the headers of an inbound CONNECT; absent or unparseable values are `None`.
    pub fn from_map(map: &http::HeaderMap) -> ConnectHeaders {
        let get = |name: &str| map.get(name).and_then(|v| v.to_str().ok());
        ConnectHeaders {
            forwarded: get(name::FORWARDED).map(Forwarded::parse),
            baggage: get(name::BAGGAGE).map(Baggage::parse),
            traceparent: get(name::TRACEPARENT).and_then(TraceParent::parse),
        }
    }

    /// Writes the headers onto an outbound CONNECT request.
    pub fn write_to(&self, map: &mut http::HeaderMap) {
        let mut put = |name: &'static str, value: String| {
            if value.is_empty() {
                return;
            }
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                map.insert(name, v);
            }
        };
        if let Some(f) = &self.forwarded {
            put(name::FORWARDED, f.to_string());
        }
        if let Some(b) = &self.baggage {
            put(name::BAGGAGE, b.to_string());
        }
        if let Some(t) = &self.traceparent {
            put(name::TRACEPARENT, t.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded() {
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            (r#"for="10.0.0.1:5555""#, Some("10.0.0.1:5555"), None),
            (
                r#"for="10.0.0.1:5555";host=reviews.default.svc.cluster.local"#,
                Some("10.0.0.1:5555"),
                Some("reviews.default.svc.cluster.local"),
            ),
            (r#"for="[fd00::1]:80""#, Some("[fd00::1]:80"), None),
            (
                r#"For="10.0.0.1:1" ; Host="A.B""#,
                Some("10.0.0.1:1"),
                Some("a.b"),
            ),
            (
                r#"for="10.0.0.1:1", for="10.0.0.2:2""#,
                Some("10.0.0.1:1"),
                None,
            ),
            (r#"for=unknown;host=a b"#, None, None),
            ("garbage", None, None),
            ("", None, None),
        ];
        for (input, client, host) in cases {
            let f = Forwarded::parse(input);
            assert_eq!(f.client, client.map(|c| c.parse().unwrap()), "{input}");
            assert_eq!(f.host.as_deref(), *host, "{input}");
        }
        let f = Forwarded {
            client: Some("10.1.2.3:4".parse().unwrap()),
            host: Some("svc.ns.svc.cluster.local".into()),
        };
        assert_eq!(
            f.to_string(),
            r#"for="10.1.2.3:4";host=svc.ns.svc.cluster.local"#
        );
        assert_eq!(Forwarded::parse(&f.to_string()), f);
    }

    #[test]
    fn baggage() {
        let b = Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload: Some((WorkloadType::Deployment, "reviews-v1".into())),
            service_name: Some("reviews".into()),
            service_version: Some("v1".into()),
            region: None,
            zone: Some(String::new()),
        };
        let s = b.to_string();
        assert_eq!(
            s,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=reviews-v1,service.name=reviews,service.version=v1"
        );
        let parsed = Baggage::parse(&s);
        assert_eq!(parsed.zone, None);
        assert_eq!(parsed.workload, b.workload);
        assert_eq!(parsed.namespace.as_deref(), Some("default"));
        let odd = Baggage::parse(
            "junk, service.name=x;prop=1 ,k8s.pod.name=p,unknown=1,cloud.region=a b",
        );
        assert_eq!(odd.service_name.as_deref(), Some("x"));
        assert_eq!(odd.workload, Some((WorkloadType::Pod, "p".into())));
        assert_eq!(odd.region, None);
    }

    #[test]
    fn traceparent() {
        let t = TraceParent::random();
        assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = TraceParent::parse(s).unwrap();
        assert_eq!(p.to_string(), s);
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn header_map_round_trip() {
        let h = ConnectHeaders {
            forwarded: Some(Forwarded {
                client: Some("10.0.0.1:1".parse().unwrap()),
                host: None,
            }),
            baggage: Some(Baggage::parse("k8s.namespace.name=ns")),
            traceparent: Some(TraceParent::random()),
        };
        let mut map = http::HeaderMap::new();
        h.write_to(&mut map);
        assert_eq!(ConnectHeaders::from_map(&map), h);
    }
}
