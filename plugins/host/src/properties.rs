//! Properties plugins read with `proxy_get_property`, synthesized from the stream and the proxy
//! with Envoy's encodings: strings raw, integers as 8-byte little-endian, booleans as one byte,
//! timestamps as nanoseconds, maps in the header pairs encoding.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use crate::Headers;
use crate::headers::encode_pairs;

/// What the embedder knows about a request, shared by every plugin of its chain. Fixed facts are
/// set before the request reaches a plugin; the rest is filled in as the request goes, so a
/// plugin reads what is known by its callback (everything, by `on_log`).
#[derive(Debug)]
pub struct StreamInfo {
    /// The original client (from the tunnel's forwarded address).
    pub source: SocketAddr,
    /// Where the request was sent (the service VIP or workload address and port).
    pub destination: SocketAddr,
    /// The SPIFFE identity of the peer that opened the tunnel.
    pub peer_identity: Option<String>,
    /// An id unique to the downstream connection.
    pub connection_id: u64,
    /// The downstream protocol as Envoy names it: `HTTP/1.0`, `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'static str,
    /// When the request arrived.
    pub start: SystemTime,
    /// The request headers as they left the request phase, set by the embedder when the request
    /// phase ends so later phases (and `on_log`) can still read them.
    pub request: OnceLock<Headers>,
    /// The response headers as they left the response phase, for `on_log`.
    pub response: OnceLock<Headers>,
    /// The response trailers as they left the plugins, if the response had any.
    pub response_trailers: OnceLock<Headers>,
    /// The route the request took, once chosen.
    pub route_name: OnceLock<String>,
    /// The destination cluster (`outbound|port|subset|host`), once chosen.
    pub cluster_name: OnceLock<String>,
    /// The endpoint of the latest upstream attempt.
    pub upstream: Mutex<Option<SocketAddr>>,
    /// Request body bytes received so far.
    pub request_body_bytes: AtomicU64,
    /// Response body bytes sent so far.
    pub response_body_bytes: AtomicU64,
    /// Why the response is what it is (Envoy's response code details), known at the end.
    pub response_code_details: OnceLock<String>,
    /// Envoy's response flags as short names (`UF`, `NR,DI`; `-` or empty when none), known at
    /// the end. Plugins read them as Envoy's bit set.
    pub response_flags: OnceLock<String>,
}

impl StreamInfo {
    /// Facts about a new request.
    pub fn new(source: SocketAddr, destination: SocketAddr, peer_identity: Option<String>) -> Self {
        StreamInfo {
            source,
            destination,
            peer_identity,
            connection_id: 0,
            protocol: "HTTP/1.1",
            start: SystemTime::now(),
            request: OnceLock::new(),
            response: OnceLock::new(),
            response_trailers: OnceLock::new(),
            route_name: OnceLock::new(),
            cluster_name: OnceLock::new(),
            upstream: Mutex::new(None),
            request_body_bytes: AtomicU64::new(0),
            response_body_bytes: AtomicU64::new(0),
            response_code_details: OnceLock::new(),
            response_flags: OnceLock::new(),
        }
    }

    fn upstream(&self) -> Option<SocketAddr> {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Facts about the proxy that every plugin can read under `node`.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// `node.id`, e.g. `waypoint~10.0.0.5~waypoint-0.default~default.svc.cluster.local`.
    pub id: String,
    /// `node.cluster`: the proxy's own service.
    pub cluster: String,
    /// `node.metadata.*` as strings: NAMESPACE, WORKLOAD_NAME, SERVICE_ACCOUNT, CLUSTER_ID...
    pub metadata: Vec<(String, String)>,
}

/// What a property lookup sees.
pub(crate) struct View<'a> {
    pub(crate) info: Option<&'a StreamInfo>,
    /// Request headers while the request phase lends them.
    pub(crate) request: Option<&'a Headers>,
    /// Response headers while the response phase lends them.
    pub(crate) response: Option<&'a Headers>,
    pub(crate) node: &'a NodeInfo,
    pub(crate) plugin_name: &'a str,
    pub(crate) root_id: &'a str,
}

impl View<'_> {
    fn request_headers(&self) -> Option<&Headers> {
        self.request.or_else(|| self.info?.request.get())
    }

    fn response_headers(&self) -> Option<&Headers> {
        self.response.or_else(|| self.info?.response.get())
    }

    /// The encoded value at `path` (segments as the plugin sent them), or `None`.
    pub(crate) fn get(&self, path: &[&str]) -> Option<Vec<u8>> {
        let text = |s: &str| Some(s.as_bytes().to_vec());
        let int = |n: i64| Some(n.to_le_bytes().to_vec());
        match path {
            ["plugin_name"] => text(self.plugin_name),
            ["plugin_root_id"] => text(self.root_id),
            ["plugin_vm_id"] => text(""),
            ["listener_direction"] => int(1),
            ["node", "id"] => text(&self.node.id),
            ["node", "cluster"] => text(&self.node.cluster),
            ["node", "metadata"] => Some(encode_string_map(&self.node.metadata)),
            ["node", "metadata", key] => self
                .node
                .metadata
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| text(v)),
            ["request", field] => self.request_field(field),
            ["request", "headers", name] => self.request_headers()?.get(name).map(<[u8]>::to_vec),
            ["response", "code"] => {
                let status = self.response_headers()?.get_str(":status")?;
                int(status.parse().ok()?)
            }
            ["response", "code_details"] => text(self.info?.response_code_details.get()?),
            ["response", "flags"] => int(flag_bits(self.info?.response_flags.get()?)),
            ["response", "grpc_status"] => {
                let from = |h: &Headers| h.get_str("grpc-status")?.parse::<i64>().ok();
                let info = self.info?;
                int(info
                    .response_trailers
                    .get()
                    .and_then(from)
                    .or_else(|| self.response_headers().and_then(from))?)
            }
            ["response", "headers"] => Some(self.response_headers()?.encode()),
            ["response", "headers", name] => self.response_headers()?.get(name).map(<[u8]>::to_vec),
            ["response", "trailers"] => Some(self.info?.response_trailers.get()?.encode()),
            ["response", "trailers", name] => self
                .info?
                .response_trailers
                .get()?
                .get(name)
                .map(<[u8]>::to_vec),
            ["response", "size"] => int(load(&self.info?.response_body_bytes)),
            ["response", "total_size"] => {
                let headers = self.response_headers().map_or(0, header_bytes);
                int(headers + load(&self.info?.response_body_bytes))
            }
            ["upstream", "address"] => text(&self.info?.upstream()?.to_string()),
            ["upstream", "port"] => int(self.info?.upstream()?.port().into()),
            ["source", "address"] => text(&self.info?.source.to_string()),
            ["source", "port"] => int(self.info?.source.port().into()),
            ["destination", "address"] => text(&self.info?.destination.to_string()),
            ["destination", "port"] => int(self.info?.destination.port().into()),
            ["connection", "id"] => int(self.info?.connection_id as i64),
            ["connection", "mtls"] => Some(vec![u8::from(self.info?.peer_identity.is_some())]),
            ["connection", "uri_san_peer_certificate"] => text(self.info?.peer_identity.as_ref()?),
            ["route_name"] | ["xds", "route_name"] => text(self.info?.route_name.get()?),
            ["cluster_name"] | ["xds", "cluster_name"] => text(self.info?.cluster_name.get()?),
            _ => None,
        }
    }

    fn request_field(&self, field: &str) -> Option<Vec<u8>> {
        let headers = self.request_headers()?;
        let header = |name: &str| headers.get(name).map(<[u8]>::to_vec);
        match field {
            "path" => header(":path"),
            "url_path" => {
                let path = headers.get(":path")?;
                let end = path.iter().position(|&b| b == b'?').unwrap_or(path.len());
                Some(path[..end].to_vec())
            }
            "query" => {
                let path = headers.get(":path")?;
                let start = path.iter().position(|&b| b == b'?')? + 1;
                Some(path[start..].to_vec())
            }
            "host" => header(":authority"),
            "scheme" => header(":scheme"),
            "method" => header(":method"),
            "id" => header("x-request-id"),
            "useragent" => header("user-agent"),
            "referer" => header("referer"),
            "protocol" => Some(self.info?.protocol.as_bytes().to_vec()),
            "size" => Some(load(&self.info?.request_body_bytes).to_le_bytes().to_vec()),
            "total_size" => {
                let total = header_bytes(headers) + load(&self.info?.request_body_bytes);
                Some(total.to_le_bytes().to_vec())
            }
            "headers" => Some(headers.encode()),
            "time" => {
                let since = self
                    .info?
                    .start
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()?;
                Some((since.as_nanos() as i64).to_le_bytes().to_vec())
            }
            "duration" => {
                let elapsed = self.info?.start.elapsed().ok()?;
                Some((elapsed.as_nanos() as i64).to_le_bytes().to_vec())
            }
            _ => None,
        }
    }
}

/// Envoy's `ResponseFlag` bits for the short names of its access log.
fn flag_bits(flags: &str) -> i64 {
    const BITS: [(&str, i64); 19] = [
        ("LH", 0x1),
        ("UH", 0x2),
        ("UT", 0x4),
        ("LR", 0x8),
        ("UR", 0x10),
        ("UF", 0x20),
        ("UC", 0x40),
        ("UO", 0x80),
        ("NR", 0x100),
        ("DI", 0x200),
        ("FI", 0x400),
        ("RL", 0x800),
        ("UAEX", 0x1000),
        ("RLSE", 0x2000),
        ("DC", 0x4000),
        ("URX", 0x8000),
        ("SI", 0x10000),
        ("IH", 0x20000),
        ("DPE", 0x40000),
    ];
    flags
        .split(',')
        .filter_map(|f| BITS.iter().find(|(name, _)| *name == f.trim()))
        .fold(0, |bits, (_, bit)| bits | bit)
}

fn load(counter: &AtomicU64) -> i64 {
    counter.load(Ordering::Relaxed) as i64
}

/// The uncompressed size of a header block, as Envoy approximates it: names and values.
fn header_bytes(headers: &Headers) -> i64 {
    headers
        .iter()
        .map(|(n, v)| (n.len() + v.len()) as i64)
        .sum()
}

/// Encodes a string map in the pairs format (how Envoy serializes CEL maps).
pub(crate) fn encode_string_map(pairs: &[(String, String)]) -> Vec<u8> {
    encode_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StreamInfo {
        StreamInfo::new(
            "10.0.0.1:40000".parse().unwrap(),
            "10.96.0.5:8080".parse().unwrap(),
            Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
        )
    }

    #[test]
    fn envoy_encodings() {
        let info = info();
        let req: Headers = [
            (":method", &b"GET"[..]),
            (":path", b"/a/b?x=1"),
            (":authority", b"svc"),
        ]
        .into_iter()
        .collect();
        let node = NodeInfo {
            metadata: vec![("NAMESPACE".into(), "default".into())],
            ..NodeInfo::default()
        };
        let view = View {
            info: Some(&info),
            request: Some(&req),
            response: None,
            node: &node,
            plugin_name: "default.p",
            root_id: "p",
        };
        assert_eq!(view.get(&["request", "url_path"]).unwrap(), b"/a/b");
        assert_eq!(view.get(&["request", "query"]).unwrap(), b"x=1");
        assert_eq!(view.get(&["request", "host"]).unwrap(), b"svc");
        assert_eq!(
            view.get(&["destination", "port"]).unwrap(),
            8080i64.to_le_bytes()
        );
        assert_eq!(view.get(&["connection", "mtls"]).unwrap(), [1]);
        assert_eq!(
            view.get(&["connection", "uri_san_peer_certificate"])
                .unwrap(),
            b"spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(
            view.get(&["node", "metadata", "NAMESPACE"]).unwrap(),
            b"default"
        );
        assert_eq!(view.get(&["plugin_name"]).unwrap(), b"default.p");
        assert!(view.get(&["response", "code"]).is_none());
        assert!(view.get(&["no", "such"]).is_none());
        assert_eq!(view.get(&["request", "time"]).unwrap().len(), 8);
    }

    #[test]
    fn what_the_embedder_fills_in_as_the_request_goes() {
        let mut info = info();
        info.protocol = "HTTP/2";
        let req: Headers = [(":path", &b"/p"[..]), ("x-a", b"bc")]
            .into_iter()
            .collect();
        info.request.set(req).unwrap();
        info.request_body_bytes.store(10, Ordering::Relaxed);
        info.response_body_bytes.store(7, Ordering::Relaxed);
        *info.upstream.lock().unwrap() = Some("10.1.2.3:8080".parse().unwrap());
        let trailers: Headers = [("grpc-status", &b"7"[..])].into_iter().collect();
        info.response_trailers.set(trailers).unwrap();
        info.response_code_details
            .set("via_upstream".into())
            .unwrap();
        info.response_flags.set("UF,URX".into()).unwrap();
        let node = NodeInfo::default();
        let resp: Headers = [(":status", &b"200"[..])].into_iter().collect();
        let view = View {
            info: Some(&info),
            request: None,
            response: Some(&resp),
            node: &node,
            plugin_name: "",
            root_id: "",
        };
        let int = |n: i64| n.to_le_bytes().to_vec();
        assert_eq!(view.get(&["request", "protocol"]).unwrap(), b"HTTP/2");
        assert_eq!(view.get(&["request", "size"]).unwrap(), int(10));
        // ":path" + "/p" + "x-a" + "bc", then the body.
        assert_eq!(view.get(&["request", "total_size"]).unwrap(), int(12 + 10));
        assert_eq!(view.get(&["response", "size"]).unwrap(), int(7));
        assert_eq!(view.get(&["response", "total_size"]).unwrap(), int(10 + 7));
        assert_eq!(view.get(&["response", "grpc_status"]).unwrap(), int(7));
        assert_eq!(
            view.get(&["response", "trailers", "grpc-status"]).unwrap(),
            b"7"
        );
        assert_eq!(
            view.get(&["response", "code_details"]).unwrap(),
            b"via_upstream"
        );
        assert_eq!(
            view.get(&["response", "flags"]).unwrap(),
            int(0x20 | 0x8000)
        );
        assert_eq!(
            view.get(&["upstream", "address"]).unwrap(),
            b"10.1.2.3:8080"
        );
        assert_eq!(view.get(&["upstream", "port"]).unwrap(), int(8080));
    }

    #[test]
    fn no_flags_is_zero() {
        assert_eq!(flag_bits("-"), 0);
        assert_eq!(flag_bits(""), 0);
        assert_eq!(flag_bits("NR"), 0x100);
    }

    #[test]
    fn later_phases_read_the_final_request() {
        let info = info();
        let req: Headers = [(":path", &b"/final"[..])].into_iter().collect();
        info.request.set(req).unwrap();
        let node = NodeInfo::default();
        let view = View {
            info: Some(&info),
            request: None,
            response: None,
            node: &node,
            plugin_name: "",
            root_id: "",
        };
        assert_eq!(view.get(&["request", "path"]).unwrap(), b"/final");
    }
}
