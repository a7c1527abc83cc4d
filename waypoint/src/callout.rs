//! HTTP calls Wasm plugins make (`dispatch_http_call`), sent into the mesh.
//!
//! The upstream is what Istio plugins name: an Envoy cluster, as a sidecar names it
//! (`outbound|<port>|<subset>|<host>`) or as a waypoint does (`inbound-vip|<port>|http[/<subset>]|
//! <host>`, the form [`cluster_name`] gives plugins), or a plain `host:port` (a service hostname
//! or VIP). The call goes where the waypoint's own
//! traffic goes: an endpoint chosen by the service's load balancer, over HBONE from the
//! waypoint's identity, as HTTP/1.1.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use hbone::{Authority, ConnectHeaders, ConnectRequest, HBONE_PORT};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use mesh::model::ServiceId;
use plugins::{CallFuture, CallRequest, CallResponse, Dispatcher, Headers};

use crate::state::{Shared, View};

/// Largest answer a plugin call may return.
const MAX_BODY: usize = 1 << 20;

/// Sends plugin calls through the waypoint; bound to the waypoint once it exists (the plugin
/// host is created first).
#[derive(Debug, Clone, Default)]
pub(crate) struct MeshCalls(Arc<OnceLock<Weak<Shared>>>);

impl MeshCalls {
    pub(crate) fn bind(&self, shared: &Arc<Shared>) {
        let _ = self.0.set(Arc::downgrade(shared));
    }
}

/// A service port a plugin named.
#[derive(Debug, PartialEq, Eq)]
struct Upstream<'a> {
    host: &'a str,
    port: u16,
    subset: Option<&'a str>,
}

/// The Envoy cluster an Istio waypoint sends a service port's requests to; plugins read it as
/// `cluster_name` and may call it back.
pub(crate) fn cluster_name(port: u16, subset: Option<&str>, host: &str) -> String {
    match subset {
        Some(subset) => format!("inbound-vip|{port}|http/{subset}|{host}"),
        None => format!("inbound-vip|{port}|http|{host}"),
    }
}

/// Parses `outbound|port|subset|host`, `inbound-vip|port|protocol[/subset]|host` or
/// `host:port`.
fn parse(upstream: &str) -> Option<Upstream<'_>> {
    if let Some(rest) = upstream.strip_prefix("outbound|") {
        let mut parts = rest.splitn(3, '|');
        let port = parts.next()?.parse().ok()?;
        let subset = parts.next().filter(|s| !s.is_empty());
        let host = parts.next().filter(|h| !h.is_empty())?;
        return Some(Upstream { host, port, subset });
    }
    if let Some(rest) = upstream.strip_prefix("inbound-vip|") {
        let mut parts = rest.splitn(3, '|');
        let port = parts.next()?.parse().ok()?;
        let subset = parts.next()?.split_once('/').map(|(_, subset)| subset);
        let host = parts.next().filter(|h| !h.is_empty())?;
        return Some(Upstream { host, port, subset });
    }
    let (host, port) = upstream.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some(Upstream {
        host,
        port: port.parse().ok()?,
        subset: None,
    })
}

/// The service a plugin named, by hostname or VIP.
fn resolve(view: &View, up: &Upstream<'_>) -> Option<(ServiceId, usize)> {
    let snapshot = &view.snapshot;
    let (id, service) = match up.host.parse::<IpAddr>() {
        Ok(ip) => {
            let (id, service, _) = snapshot.service_by_vip_port(ip, up.port)?;
            (id, service)
        }
        Err(_) => snapshot.service_by_host(up.host)?,
    };
    let (port_index, _) = service.port(up.port)?;
    Some((id, port_index))
}

impl Dispatcher for MeshCalls {
    fn dispatch(&self, upstream: &str, request: CallRequest) -> Option<CallFuture> {
        let shared = self.0.get()?.upgrade()?;
        let view = shared.view();
        let up = parse(upstream)?;
        let (id, port_index) = resolve(&view, &up)?;
        let snapshot = &view.snapshot;
        let chosen = view.subset(id, up.subset).and_then(|subset| {
            view.balancer.choose(
                snapshot,
                id,
                port_index,
                subset,
                &mesh::route::TrafficPolicy::default(),
                None,
                &[],
                Instant::now(),
            )
        });
        let service = snapshot.service(id);
        let Some(chosen) = chosen else {
            // A known service with no endpoint: the call fails like Envoy's "no healthy upstream".
            return Some(Box::pin(async { Err("no healthy upstream".to_owned()) }));
        };
        let workload = snapshot.workload(chosen.workload);
        let ip = *workload.ips.first()?;
        let target = SocketAddr::new(ip, chosen.target_port);
        let connect = ConnectRequest {
            src: shared.identity.clone(),
            dst_identities: vec![workload.identity.clone()],
            next_hop: SocketAddr::new(ip, HBONE_PORT),
            authority: Authority::Addr(target),
            headers: ConnectHeaders {
                forwarded: Some(hbone::headers::Forwarded {
                    client: None,
                    host: Some(service.hostname.to_string()),
                }),
                ..ConnectHeaders::default()
            },
        };
        let http_request = build(&request).ok()?;
        tracing::debug!(upstream, %target, "wasm plugin http call");
        Some(Box::pin(async move {
            // Counted as an active request on the endpoint while the call runs.
            let _chosen = chosen;
            send(&shared, connect, http_request).await
        }))
    }
}

/// The request the plugin described, as HTTP/1.1.
fn build(request: &CallRequest) -> Result<http::Request<Full<Bytes>>, http::Error> {
    let h = &request.headers;
    let mut builder = http::Request::builder()
        .method(h.get(":method").unwrap_or(b"GET"))
        .uri(h.get_str(":path").unwrap_or("/"))
        .header(http::header::HOST, h.get(":authority").unwrap_or_default());
    for (name, value) in h.iter().filter(|(n, _)| !n.starts_with(':')) {
        builder = builder.header(name, value);
    }
    builder.body(Full::new(request.body.clone()))
}

async fn send(
    shared: &Shared,
    connect: ConnectRequest,
    request: http::Request<Full<Bytes>>,
) -> Result<CallResponse, String> {
    let stream = shared
        .pool
        .connect(connect)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let mut headers = Headers::new();
    headers.push(":status", parts.status.as_str());
    for (name, value) in &parts.headers {
        headers.push(name.as_str(), value.as_bytes());
    }
    Ok(CallResponse {
        headers,
        body,
        trailers: Headers::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_names() {
        assert_eq!(
            parse("outbound|8080||auth.default.svc.cluster.local"),
            Some(Upstream {
                host: "auth.default.svc.cluster.local",
                port: 8080,
                subset: None
            })
        );
        assert_eq!(
            parse("outbound|80|v2|reviews.default.svc.cluster.local").map(|u| u.subset),
            Some(Some("v2"))
        );
        assert_eq!(
            parse("auth:9000").map(|u| (u.host, u.port)),
            Some(("auth", 9000))
        );
        assert_eq!(parse("[fd00::1]:80").map(|u| u.host), Some("fd00::1"));
        assert_eq!(
            parse("inbound-vip|9080|http/v1|reviews.default.svc.cluster.local"),
            Some(Upstream {
                host: "reviews.default.svc.cluster.local",
                port: 9080,
                subset: Some("v1")
            })
        );
        assert_eq!(
            parse(&cluster_name(8080, None, "lapi.sec.svc.cluster.local")),
            Some(Upstream {
                host: "lapi.sec.svc.cluster.local",
                port: 8080,
                subset: None
            })
        );
        assert_eq!(parse("inbound|80||x"), None);
        assert_eq!(parse("inbound-vip|80|http|"), None);
        assert_eq!(parse("outbound|x||host"), None);
        assert_eq!(parse("outbound|80||"), None);
        assert_eq!(parse("no-port"), None);
    }
}
