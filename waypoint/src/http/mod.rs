//! main_internal: the HTTP lifecycle of one request, as Pingora phases.
//!
//! * `request_filter`: resolve the destination in the current snapshot ([`crate::state`]) →
//!   L7 authorization (403 `RBAC: access denied`) → route selection (404 when routes are
//!   attached and none matches) → CORS preflights, redirects, direct responses and injected
//!   faults answer here → the backend (service, port, subset) is picked by weight → mirrors
//!   start.
//! * `upstream_peer`: each attempt chooses an endpoint ([`crate::balance`]), skipping those
//!   already tried, after Envoy's jittered backoff, and connects through
//!   [`crate::originate`] with the attempt's deadline; a service that picks no endpoint (a
//!   ServiceEntry resolved `NONE`) goes to the address the caller dialled
//!   ([`crate::state::Hop::to_service`]).
//! * `upstream_request_filter` / `response_filter`: header modifiers, rewrites, CORS headers.
//! * `upstream_response_filter`, `fail_to_connect`, `error_while_proxy`: Istio's retry policy
//!   ([`retry`]) and outlier-detection reports.
//! * `fail_to_proxy`: the final status with Envoy's response flags (`UF`, `UH`, `UT`, `URX`).
//! * `logging`: Istio's request metrics and one access-log line.

mod cors;
mod mirror;
mod replay;
mod retry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hbone::{Authority, ConnectRequest, HBONE_PORT};
use http::{HeaderName, HeaderValue};
use mesh::Snapshot;
use mesh::authz::{self, Attributes, HttpAttributes};
use mesh::model::{AppProtocol, Protocol, ServiceId, WorkloadId};
use mesh::route::{HeaderModifier, RequestView, RetryPolicy, RouteRule, RuleAction, TrafficPolicy};
use pingora_core::protocols::http::ServerSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use plugins::LocalResponse;
use rand::Rng;
use tokio::time::Instant;

use crate::balance::{self, Chosen, Outcome, hash_key};
use crate::callout;
use crate::keepalive::Attempt;
use crate::limits::{Admitted, Overflow, RetryOverflow, Retrying};
use crate::metrics::{Labels, Parties};
use crate::origin_tls::{self, TlsPeers};
use crate::originate::{HboneConnector, KeepAlive};
use crate::resolve::NoAddress;
use crate::state::{Hop, Shared, Target, View};
use crate::tunnel::{self, Tunnel};
use crate::wasm::{self, Chain, Decision};

/// The `ProxyHttp` implementation: one per waypoint, shared by every request.
#[derive(Debug)]
pub struct Waypoint {
    shared: Arc<Shared>,
}

impl Waypoint {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// Where the request goes, once routing has decided.
#[derive(Debug, Clone)]
enum Upstream {
    /// A service port, possibly narrowed to a DestinationRule subset.
    Service {
        id: ServiceId,
        port_index: usize,
        subset: Option<Arc<str>>,
        /// Index of the weighted backend in the rule, for its header modifiers.
        backend: Option<usize>,
    },
    /// The addressed workload itself (`waypoint-for: workload`).
    Workload { id: WorkloadId, port: u16 },
}

/// Per-request state shared across phases.
#[derive(Debug)]
pub struct RequestCtx {
    start: Instant,
    view: Option<Arc<View>>,
    tunnel: Option<Arc<Tunnel>>,
    target: Option<Target>,
    /// `(rule, match)` indexes in the destination's route table.
    rule: Option<(usize, usize)>,
    upstream: Option<Upstream>,
    retry: Option<RetryPolicy>,
    hash: Option<u64>,
    /// The endpoint of the current attempt; holds its active-request count.
    endpoint: Option<Chosen>,
    /// This request's place under the service's connection-pool limits.
    admitted: Option<Admitted>,
    /// The last endpoint tried (none for the address the caller dialled) and its address,
    /// for logs and metrics.
    last: Option<(Option<WorkloadId>, SocketAddr)>,
    tried: Vec<WorkloadId>,
    attempts: u32,
    /// Overall route timeout.
    deadline: Option<Instant>,
    /// End of the current attempt (per-try timeout, capped by the overall deadline).
    try_deadline: Option<Instant>,
    /// A status the last attempt answered that the retry policy retries.
    retriable_status: Option<u16>,
    /// Envoy response flags (`-` when none).
    flags: &'static str,
    /// Why the waypoint answered itself, for the access log.
    details: &'static str,
    status: u16,
    /// The allowed CORS `Origin` to echo on the response.
    cors_origin: Option<HeaderValue>,
    /// A consistent-hash cookie the waypoint made up for this client, to set on the response.
    set_cookie: Option<HeaderValue>,
    /// This request's place among the service's retries in flight (`maxRetries`).
    retrying: Option<Retrying>,
    /// The current attempt's marks, when its tunnel may be parked for the next request to the
    /// endpoint (HTTP/1.1 upstreams).
    attempt: Option<Arc<Attempt>>,
    /// A parked tunnel already failed this request once (and was retried).
    stale_retried: bool,
    /// The current attempt's upstream sent its response head.
    upstream_answered: bool,
    /// For an attempt on a plain HTTP/1.1 connection: its `maxRequestsPerConnection` (0: no
    /// limit).
    plain_max_requests: Option<u32>,
    /// The current attempt's plain connection has carried its last request: ask for it to
    /// close after this one.
    close_upstream: bool,
    mirrors: Vec<mirror::Sender>,
    /// The request body as it went upstream, for a retry to replay (kept only where plugins
    /// run: elsewhere Pingora's replay is what went).
    sent: replay::Sent,
    /// The request's Wasm plugins, if any apply.
    wasm: Option<Chain>,
    /// An answer a plugin gave after the request started upstream, sent by `fail_to_proxy`.
    wasm_answer: Option<Deferred>,
}

impl RequestCtx {
    fn rule<'v>(&self, view: &'v View) -> Option<&'v RouteRule> {
        let (Some(Target::Service { id, port, .. }), Some((r, _))) = (self.target, self.rule)
        else {
            return None;
        };
        view.snapshot
            .routes(&view.namespace, id, port)?
            .rules()
            .get(r)
    }

    /// Tells the balancer how an attempt on `chosen` went, judged by the outlier detection of
    /// the policy the attempt went out under (its service, port and subset).
    fn report(&self, chosen: &Chosen, outcome: Outcome) {
        let Some(view) = &self.view else { return };
        let detection = match &self.upstream {
            Some(Upstream::Service {
                id,
                port_index,
                subset,
                ..
            }) => traffic_policy(view, *id, *port_index, subset.as_deref())
                .and_then(|t| t.outlier_detection.as_ref()),
            _ => None,
        };
        let now = std::time::Instant::now();
        (view.balancer).report(chosen.workload, outcome, detection, now);
    }

    /// Where the request goes; plugins see it as the Envoy cluster an Istio waypoint would name.
    fn set_upstream(&mut self, snapshot: &Snapshot, upstream: Upstream) {
        if let (
            Some(chain),
            Upstream::Service {
                id,
                port_index,
                subset,
                ..
            },
        ) = (&self.wasm, &upstream)
        {
            let service = snapshot.service(*id);
            let name = callout::cluster_name(
                service.ports[*port_index].port,
                subset.as_deref(),
                &service.hostname,
            );
            let _ = chain.info().cluster_name.set(name);
        }
        self.upstream = Some(upstream);
    }

    /// Takes a place among the upstream service's retries in flight for the next attempt; none
    /// left is Envoy's retry overflow (`UO`), and the attempt's failure stands.
    fn take_retry_budget(&mut self) -> bool {
        let (Some(view), Some(Upstream::Service { id, .. })) = (&self.view, &self.upstream) else {
            return true;
        };
        match view.breakers.retry(&view.snapshot.service(*id).hostname) {
            Ok(place) => {
                self.retrying = place;
                true
            }
            Err(RetryOverflow) => {
                self.flag("UO");
                false
            }
        }
    }

    fn flag(&mut self, flag: &'static str) {
        if self.flags == "-" {
            self.flags = flag;
        }
    }
}

/// An answer the waypoint gives itself.
#[derive(Debug)]
struct Local {
    status: u16,
    headers: Vec<(http::HeaderName, HeaderValue)>,
    body: Bytes,
    /// No answer at all: a plugin closed the stream (`proxy_close_stream`), which resets it.
    reset: bool,
}

/// A plugin's answer that `fail_to_proxy` sends, once Pingora has given up the upstream.
#[derive(Debug)]
enum Deferred {
    /// Given on the request (its body): the response callbacks still see it, as they see any
    /// answer the waypoint gives.
    Request(Local),
    /// Given by a response callback: it replaces the response and goes out as it is.
    Response(Local),
}

/// The error that carries a plugin's `proxy_close_stream` to `fail_to_proxy`, which resets the
/// downstream stream instead of answering.
const CLOSED_BY_PLUGIN: ErrorType = ErrorType::Custom("WasmCloseStream");

/// Resets the downstream request: RST_STREAM CANCEL on HTTP/2; on HTTP/1.1 the connection is
/// closed without an answer because `fail_to_proxy` refuses to reuse it.
fn reset_downstream(session: &mut Session) {
    if let ServerSession::H2(s) = session.as_downstream_mut() {
        s.shutdown_with_reason(h2::Reason::CANCEL);
    }
}

impl Local {
    fn new(status: u16, headers: Vec<(HeaderName, HeaderValue)>, body: Bytes) -> Self {
        Self {
            status,
            headers,
            body,
            reset: false,
        }
    }

    fn text(status: u16, body: &'static str) -> Self {
        Self::new(
            status,
            vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            )],
            Bytes::from_static(body.as_bytes()),
        )
    }

    fn from_plugin(r: &LocalResponse) -> Self {
        Self {
            status: r.status,
            headers: wasm::local_headers(r),
            body: r.body.clone(),
            reset: r.reset,
        }
    }

    /// What a plugin decision means for the request, if it stops it.
    fn from_decision(d: Decision, ctx: &mut RequestCtx) -> Option<Self> {
        match d {
            Decision::Continue => None,
            Decision::Answer(r) => {
                ctx.details = if r.reset {
                    "wasm_close_stream"
                } else {
                    "wasm_local_reply"
                };
                Some(Self::from_plugin(&r))
            }
            Decision::Failed => {
                ctx.details = "wasm_fail_stream";
                Some(Self::text(503, "wasm plugin failed\n"))
            }
        }
    }

    /// Sends the answer; the request's plugins see its headers first (Envoy's encoder chain
    /// runs for local replies too) and may replace it. A reset is an error for `fail_to_proxy`.
    async fn send(self, session: &mut Session, chain: Option<&mut Chain>) -> Result<u16> {
        if self.reset {
            return Error::e_explain(CLOSED_BY_PLUGIN, "a wasm plugin closed the stream");
        }
        let mut resp = ResponseHeader::build(self.status, Some(self.headers.len() + 1))?;
        for (name, value) in self.headers {
            resp.append_header(name, value)?;
        }
        let mut body = self.body;
        if let Some(chain) = chain {
            let head = session.req_header().method == http::Method::HEAD;
            let ended = |body: &Bytes| head || body.is_empty();
            match chain.response_headers(&mut resp, ended(&body)).await? {
                Decision::Continue => {}
                Decision::Answer(r) => {
                    let local = Self::from_plugin(&r);
                    if local.reset {
                        return Error::e_explain(
                            CLOSED_BY_PLUGIN,
                            "a wasm plugin closed the stream",
                        );
                    }
                    resp = ResponseHeader::build(local.status, Some(local.headers.len() + 1))?;
                    for (name, value) in local.headers {
                        resp.append_header(name, value)?;
                    }
                    body = local.body;
                    chain.response_replaced(ended(&body));
                }
                Decision::Failed => {
                    resp = ResponseHeader::build(503, Some(1))?;
                    body = Bytes::from_static(b"wasm plugin failed\n");
                    chain.response_replaced(ended(&body));
                }
            }
            // The body passes the plugins' response body callbacks too, whole, if there is one.
            let mut whole = Some(body);
            chain.response_body(&mut whole, true);
            body = whole.unwrap_or_default();
        }
        let status = resp.status.as_u16();
        resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        let empty = body.is_empty();
        session.write_response_header(Box::new(resp), empty).await?;
        if !empty {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(status)
    }
}

/// Whether the request asks to become a protocol whose bytes follow its head as its body (a
/// WebSocket). Not `h2c`: Envoy drops that offer, and the request ends with its head.
fn upgrades(session: &Session) -> bool {
    session.is_upgrade_req()
        && !(session.req_header().headers.get(http::header::UPGRADE))
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"))
}

/// Whether `resp`, answering `req`, has no body by HTTP's rules (RFC 9110, section 6.4.1): the
/// answer to a HEAD, a 204 or a 304, or a stated length of zero. A 101's upgraded bytes follow
/// it as its body.
fn has_no_body(req: &RequestHeader, resp: &ResponseHeader) -> bool {
    req.method == http::Method::HEAD
        || matches!(resp.status.as_u16(), 204 | 304)
        || resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
}

/// The authority a request names: `:authority`, else `Host`.
pub(crate) fn authority(req: &RequestHeader) -> &str {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(http::header::HOST)?.to_str().ok())
        .unwrap_or("")
}

fn path_and_query(req: &RequestHeader) -> &str {
    req.uri.path_and_query().map_or("/", |p| p.as_str())
}

/// Pingora's request and response headers, edited through its API (which keeps the header
/// case map in step with the map itself).
trait EditHeaders {
    fn remove(&mut self, name: &HeaderName);
    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> Result<()>;
    fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()>;
}

impl EditHeaders for RequestHeader {
    fn remove(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.insert_header(name, value)
    }
    fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.append_header(name, value).map(drop)
    }
}

impl EditHeaders for ResponseHeader {
    fn remove(&mut self, name: &HeaderName) {
        self.remove_header(name);
    }
    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.insert_header(name, value)
    }
    fn append(&mut self, name: HeaderName, value: HeaderValue) -> Result<()> {
        self.append_header(name, value).map(drop)
    }
}

/// Applies a route's header modifier: remove, then set, then add.
fn modify(m: &HeaderModifier, headers: &mut impl EditHeaders) -> Result<()> {
    for name in &m.remove {
        headers.remove(name);
    }
    for (name, value) in &m.set {
        headers.insert(name.clone(), value.clone())?;
    }
    for (name, value) in &m.add {
        headers.append(name.clone(), value.clone())?;
    }
    Ok(())
}

/// Chance of `percent` (0–100).
fn roll(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::rng().random::<f64>() * 100.0 < percent)
}

/// The peer for an endpoint out of the mesh (a ServiceEntry's, `MESH_EXTERNAL` or opted out of
/// capture): TCP, as Envoy reaches it, pooled by Pingora itself, with the DestinationRule's TLS
/// if it has one (its SNI, or else `host`, the request's, which the certificate must name). The
/// attempt's deadline bounds the connect and each read and write, since no tunnel stream
/// enforces it here.
fn plain_peer(
    addr: SocketAddr,
    http2: bool,
    traffic: &TrafficPolicy,
    (host, tls_peers): (&str, &TlsPeers),
    now: Instant,
    deadline: Option<Instant>,
) -> HttpPeer {
    let pool = &traffic.connection_pool;
    let left = deadline.map(|d| d.saturating_duration_since(now));
    let mut peer = match &traffic.tls {
        None => HttpPeer::new(addr, false, String::new()),
        Some(tls) => origin_tls::peer(addr, tls, host, tls_peers),
    };
    peer.options.connection_timeout =
        Some(left.map_or(pool.connect_timeout, |left| left.min(pool.connect_timeout)));
    peer.options.read_timeout = left;
    peer.options.write_timeout = left;
    peer.options.idle_timeout = Some(pool.http_idle_timeout);
    if http2 {
        // Over TLS negotiated by ALPN; else with prior knowledge (h2c).
        peer.options.set_http_version(2, 2);
    }
    peer
}

/// The authority the request goes upstream with: the client's, changed by the backend's and
/// then the route's header changes, then by the route's rewrite, as `upstream_request_filter`
/// applies them.
fn upstream_authority<'a>(ctx: &RequestCtx, view: &'a View, req: &'a RequestHeader) -> &'a str {
    let Some(rule) = ctx.rule(view) else {
        return authority(req);
    };
    let backend = match (&ctx.upstream, &rule.action) {
        (
            Some(Upstream::Service {
                backend: Some(b), ..
            }),
            RuleAction::Forward(backends),
        ) => backends.get(*b),
        _ => None,
    };
    let host = http::header::HOST;
    let mut sent = authority(req);
    for m in backend
        .map(|b| &b.request_headers)
        .into_iter()
        .chain([&rule.request_headers])
    {
        if m.remove.contains(&host) {
            sent = "";
        }
        if let Some((_, value)) = m.set.iter().rfind(|(name, _)| *name == host) {
            sent = value.to_str().unwrap_or_default();
        }
        if sent.is_empty()
            && let Some((_, value)) = m.add.iter().find(|(name, _)| *name == host)
        {
            sent = value.to_str().unwrap_or_default();
        }
    }
    match rule.rewrite.as_ref().and_then(|r| r.authority.as_ref()) {
        Some(rewritten) => rewritten.to_str().unwrap_or_default(),
        None => sent,
    }
}

/// The policy of the DestinationRule this waypoint applies to a service, for the service port
/// at `port_index` and a subset (merged as Istio merges them; the host's for a subset the rule
/// does not define); `None` without a rule.
fn traffic_policy<'v>(
    view: &'v View,
    service: ServiceId,
    port_index: usize,
    subset: Option<&str>,
) -> Option<&'v TrafficPolicy> {
    let (_, policy) = view.destination_rule(service)?;
    let port = view.snapshot.service(service).ports.get(port_index)?.port;
    (policy.traffic(subset, port)).or_else(|| policy.traffic(None, port))
}

static DEFAULT_TRAFFIC: std::sync::LazyLock<TrafficPolicy> =
    std::sync::LazyLock::new(TrafficPolicy::default);

impl Waypoint {
    /// Decides what to do with a request; `Some` is an answer given here.
    async fn decide(&self, session: &mut Session, ctx: &mut RequestCtx) -> Option<Local> {
        let Some(tunnel) = tunnel::of(session).cloned() else {
            // Only tunnels reach this server; anything else is a bug worth a loud answer.
            ctx.details = "no_tunnel";
            return Some(Local::text(500, "request without an HBONE tunnel\n"));
        };
        let view = self.shared.view();
        ctx.tunnel = Some(tunnel.clone());
        ctx.view = Some(view.clone());
        let target = match view.resolve(tunnel.destination) {
            Ok(t) => t,
            Err(e) => {
                ctx.flag("NR");
                ctx.details = "destination_not_served";
                tracing::debug!(dst.addr = %tunnel.destination, reason = %e, "destination not served");
                return Some(Local::text(
                    404,
                    "destination not served by this waypoint\n",
                ));
            }
        };
        ctx.target = Some(target);
        let snapshot = &view.snapshot;
        let waypoint = snapshot.waypoint(view.waypoint?);
        let (service, port) = match target {
            Target::Service { id, port, .. } => (Some(snapshot.service(id)), port),
            Target::Workload { port, .. } => (None, port),
        };

        // Wasm plugins of the AUTHN and AUTHZ phases run before authorization.
        let service_id = match target {
            Target::Service { id, .. } => Some(id),
            Target::Workload { .. } => None,
        };
        let protocol = protocol_name(session.req_header().version);
        ctx.wasm = Chain::new(&view, service_id, port, &tunnel, protocol);
        // An upgrade's head says its body is empty, yet the upgraded bytes follow it as its body
        // (a mirror takes the head alone).
        let body_empty = session.is_body_empty();
        let end_of_stream = body_empty && !upgrades(session);
        if let Some(chain) = &mut ctx.wasm {
            let decision = chain
                .request_headers(wasm::before_authz, session.req_header_mut(), end_of_stream)
                .await;
            if let Some(local) = self.plugin_answer(decision, ctx) {
                return Some(local);
            }
        }
        let req = session.req_header();

        // L7 authorization: policies on the waypoint's Gateway, the GatewayClass, the service.
        let attrs = Attributes {
            source: Some(&tunnel.source),
            source_ip: tunnel.client_ip,
            remote_ip: tunnel.client_ip,
            destination_ip: tunnel.destination.ip(),
            destination_port: port,
            sni: None,
            http: Some(HttpAttributes {
                method: req.method.as_str(),
                path: req.uri.path(),
                host: authority(req),
                headers: &req.headers,
            }),
        };
        let verdict = authz::evaluate(snapshot.waypoint_policies(waypoint, service), &attrs);
        if !verdict.allowed {
            ctx.details = "rbac_access_denied";
            tracing::debug!(policy = verdict.policy.map(|p| p.name()), "request denied");
            return Some(Local::text(403, "RBAC: access denied"));
        }

        // Then the STATS and unspecified ones; routing sees what they changed.
        if let Some(chain) = &mut ctx.wasm {
            let decision = chain
                .request_headers(wasm::after_authz, session.req_header_mut(), end_of_stream)
                .await;
            chain.request_done(session.req_header());
            if let Some(local) = self.plugin_answer(decision, ctx) {
                return Some(local);
            }
        }
        let req = session.req_header();

        let Target::Service { id, port_index, .. } = target else {
            let Target::Workload { id, port } = target else {
                unreachable!("matched above")
            };
            ctx.upstream = Some(Upstream::Workload { id, port });
            ctx.retry = Some(RetryPolicy::mesh_default());
            return None;
        };

        // Routing.
        let table = snapshot.routes(&view.namespace, id, port);
        let rule = match table {
            None => None,
            Some(table) => {
                let view_req = RequestView {
                    method: &req.method,
                    scheme: "http",
                    path: path_and_query(req),
                    authority: authority(req),
                    headers: &req.headers,
                    port,
                    source_namespace: Some(&waypoint.namespace),
                };
                match table.select_index(&view_req) {
                    Some((r, m)) => {
                        ctx.rule = Some((r, m));
                        if let Some(chain) = &ctx.wasm {
                            let _ = chain
                                .info()
                                .route_name
                                .set(table.rules()[r].source.to_string());
                        }
                        Some((&table.rules()[r], m))
                    }
                    None => {
                        ctx.flag("NR");
                        ctx.details = "route_not_found";
                        return Some(Local::text(404, ""));
                    }
                }
            }
        };
        let Some((rule, matched)) = rule else {
            ctx.set_upstream(
                snapshot,
                Upstream::Service {
                    id,
                    port_index,
                    subset: None,
                    backend: None,
                },
            );
            ctx.retry = Some(RetryPolicy::mesh_default());
            self.prepare_hash(session, ctx, &view, id, port_index, None);
            return None;
        };
        let matched = &rule.matches[matched];
        ctx.retry = rule.retry.clone();
        ctx.deadline = rule.timeout.map(|t| ctx.start + t);

        if let Some(cors) = &rule.cors
            && let Some(answer) = cors::handle(cors, session.req_header(), ctx)
        {
            return Some(answer);
        }
        let req = session.req_header();
        match &rule.action {
            RuleAction::Redirect(redirect) => {
                let view_req = RequestView {
                    method: &req.method,
                    scheme: "http",
                    path: path_and_query(req),
                    authority: authority(req),
                    headers: &req.headers,
                    port,
                    source_namespace: Some(&waypoint.namespace),
                };
                let location = redirect.location(&view_req, matched);
                ctx.details = "redirect";
                let Ok(location) = HeaderValue::try_from(location) else {
                    return Some(Local::text(500, "invalid redirect location\n"));
                };
                return Some(Local::new(
                    redirect.status,
                    vec![(http::header::LOCATION, location)],
                    Bytes::new(),
                ));
            }
            RuleAction::DirectResponse { status, body } => {
                ctx.details = "direct_response";
                let body = body.as_deref().map(Bytes::copy_from_slice);
                return Some(Local::new(*status, Vec::new(), body.unwrap_or_default()));
            }
            RuleAction::Forward(_) => {}
        }

        if let Some(fault) = &rule.fault {
            if let Some(delay) = fault.delay
                && roll(delay.percent)
            {
                ctx.flag("DI");
                tokio::time::sleep(delay.delay).await;
            }
            if let Some(abort) = fault.abort
                && roll(abort.percent)
            {
                ctx.flag("FI");
                ctx.details = "fault_filter_abort";
                return Some(Local::text(abort.status, "fault filter abort"));
            }
        }

        let RuleAction::Forward(backends) = &rule.action else {
            unreachable!("answered above")
        };
        let Some(chosen) = mesh::route::pick(backends, &mut rand::rng()) else {
            ctx.details = "no_backend";
            return Some(Local::text(500, ""));
        };
        let backend_index = backends
            .iter()
            .position(|b| std::ptr::eq(b, chosen))
            .unwrap_or(0);
        let backend = &chosen.backend;
        let Some((backend_id, backend_service)) = snapshot.service_by_host(&backend.service) else {
            ctx.details = "cluster_not_found";
            return Some(Local::text(500, ""));
        };
        let backend_port = backend.port.unwrap_or(port);
        let Some((backend_port_index, _)) = backend_service.port(backend_port) else {
            ctx.details = "cluster_not_found";
            return Some(Local::text(500, ""));
        };
        let subset = view.subset(backend_id, backend.subset.as_deref());
        if subset.is_none_or(|subset| backend_service.subset_endpoints(subset).is_none()) {
            // A VirtualService subset the DestinationRule this waypoint applies does not
            // define: Envoy's unknown cluster.
            ctx.flag("NR");
            ctx.details = "cluster_not_found";
            return Some(Local::text(503, ""));
        }
        ctx.set_upstream(
            snapshot,
            Upstream::Service {
                id: backend_id,
                port_index: backend_port_index,
                subset: backend.subset.clone(),
                backend: Some(backend_index),
            },
        );
        let subset = backend.subset.as_deref();
        self.prepare_hash(session, ctx, &view, backend_id, backend_port_index, subset);

        for m in &rule.mirrors {
            if roll(m.percent) {
                let sender = mirror::start(
                    self.shared.clone(),
                    &view,
                    &m.backend,
                    port,
                    session.req_header(),
                    !body_empty,
                    &tunnel,
                );
                if let Some(sender) = sender {
                    ctx.mirrors.push(sender);
                }
            }
        }
        None
    }

    /// A plugin's decision on request headers as the waypoint's answer, if it stops the request.
    fn plugin_answer(&self, decision: Result<Decision>, ctx: &mut RequestCtx) -> Option<Local> {
        match decision {
            Ok(d) => Local::from_decision(d, ctx),
            Err(e) => {
                ctx.details = "wasm_invalid_header";
                tracing::warn!(error = %e, "a wasm plugin produced a request Pingora refuses");
                Some(Local::text(
                    500,
                    "wasm plugin produced an invalid request\n",
                ))
            }
        }
    }

    /// Computes the consistent-hash key now, while the request headers are at hand.
    fn prepare_hash(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        view: &View,
        service: ServiceId,
        port_index: usize,
        subset: Option<&str>,
    ) {
        let Some(policy) = traffic_policy(view, service, port_index, subset) else {
            return;
        };
        if let mesh::route::LoadBalancer::ConsistentHash(ch) = &policy.load_balancer {
            let req = session.req_header();
            ctx.hash = hash_key(
                &ch.key,
                &req.headers,
                path_and_query(req),
                ctx.tunnel.as_ref().map(|t| t.client_ip),
            );
            if ctx.hash.is_none()
                && let mesh::route::HashKey::Cookie {
                    name,
                    path,
                    ttl: Some(ttl),
                } = &ch.key
                && let Some(tunnel) = &ctx.tunnel
                && let Some(cookie) = balance::generated_cookie(name, path.as_deref(), *ttl, tunnel)
            {
                ctx.hash = Some(cookie.hash);
                ctx.set_cookie = Some(cookie.header);
            }
        }
    }

    /// Waits Envoy's fully jittered exponential backoff before retry `n` (n ≥ 1), never past
    /// the deadline.
    async fn backoff(&self, ctx: &RequestCtx, n: u32) {
        let base = ctx
            .retry
            .as_ref()
            .and_then(|r| r.backoff)
            .unwrap_or(Duration::from_millis(25));
        let cap = base * 10;
        let ceiling = base.saturating_mul(1 << (n - 1).min(16)).min(cap);
        let wait = ceiling.mul_f64(rand::rng().random::<f64>());
        let until = Instant::now() + wait;
        tokio::time::sleep_until(ctx.deadline.map_or(until, |d| d.min(until))).await;
    }
}

#[async_trait]
impl ProxyHttp for Waypoint {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            view: None,
            tunnel: None,
            target: None,
            rule: None,
            upstream: None,
            retry: None,
            hash: None,
            endpoint: None,
            admitted: None,
            last: None,
            tried: Vec::new(),
            attempts: 0,
            deadline: None,
            try_deadline: None,
            retriable_status: None,
            flags: "-",
            details: "via_upstream",
            status: 0,
            cors_origin: None,
            set_cookie: None,
            retrying: None,
            attempt: None,
            stale_retried: false,
            upstream_answered: false,
            plain_max_requests: None,
            close_upstream: false,
            mirrors: Vec::new(),
            sent: replay::Sent::default(),
            wasm: None,
            wasm_answer: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match self.decide(session, ctx).await {
            Some(local) => {
                ctx.status = local.send(session, ctx.wasm.as_mut()).await?;
                Ok(true)
            }
            None => {
                // Keep the first 64 KiB of the body so a retry can replay it.
                session.enable_retry_buffering();
                Ok(false)
            }
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A retry replays what Pingora kept of the body, as it was read: the plugins and the
        // mirrors had it already, and the upstream is sent what the plugins passed on then
        // (`retry::may_retry` allows a retry only while that is kept).
        // An upgraded connection's bytes, and its close, are its own: no retry follows a 101.
        let upgraded = session.was_upgraded();
        let read = session.body_bytes_read();
        if !upgraded && ctx.sent.is_replay(read, body.as_ref()) {
            if ctx.wasm.is_some() {
                let sent = ctx.sent.replay().ok_or_else(|| {
                    Error::explain(
                        ErrorType::InternalError,
                        "the body the plugins passed on is no longer kept to send again",
                    )
                })?;
                // Nothing at the end ends the body; an empty chunk before it is skipped, where
                // none would end it early.
                *body = if sent.is_empty() && end_of_stream {
                    None
                } else {
                    Some(sent)
                };
            }
            return Ok(());
        }
        ctx.sent.passing(read);
        // Pingora ends an upgrade's body, empty until the 101, before the 101 comes; the
        // upgraded bytes that follow are the body the plugins are given, and their end its end.
        let before_upgrade = !upgraded
            && upgrades(session)
            && end_of_stream
            && body.as_ref().is_none_or(Bytes::is_empty);
        if let (Some(chain), Some(chunk)) = (&ctx.wasm, body.as_ref()) {
            let received = &chain.info().request_body_bytes;
            received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        if let Some(chain) = &mut ctx.wasm
            && !before_upgrade
            && let Some(local) =
                Local::from_decision(chain.request_body(body, end_of_stream).await, ctx)
        {
            // Headers may already be upstream: end the attempt; `fail_to_proxy` answers.
            let status = local.status;
            ctx.wasm_answer = Some(Deferred::Request(local));
            return Error::e_explain(ErrorType::HTTPStatus(status), "answered by a wasm plugin");
        }
        for m in &mut ctx.mirrors {
            m.body(body.as_ref(), end_of_stream);
        }
        if ctx.wasm.is_some() && !upgraded {
            let replayable = !session.retry_buffer_truncated();
            ctx.sent.keep(body.as_ref(), replayable);
        }
        ctx.sent.passed(end_of_stream);
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let (Some(view), Some(upstream)) = (ctx.view.clone(), ctx.upstream.clone()) else {
            return Err(Error::explain(ErrorType::InternalError, "no route decided"));
        };
        ctx.attempts += 1;
        ctx.retriable_status = None;
        if ctx.attempts > 1 {
            self.backoff(ctx, ctx.attempts - 1).await;
        }
        let now = Instant::now();
        if ctx.deadline.is_some_and(|d| now >= d) {
            ctx.flag("UT");
            return Err(Error::explain(
                ErrorType::HTTPStatus(504),
                "upstream request timeout",
            ));
        }
        let snapshot = &view.snapshot;
        if ctx.attempts == 1
            && let Upstream::Service { id, .. } = &upstream
        {
            let hostname = &snapshot.service(*id).hostname;
            match view.breakers.admit(hostname, ctx.deadline).await {
                Ok(admitted) => ctx.admitted = admitted,
                Err(overflow) => {
                    ctx.flag("UO");
                    ctx.details = match overflow {
                        Overflow::Requests => "upstream_max_requests",
                        Overflow::Pending | Overflow::Timeout => "upstream_max_pending",
                    };
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(503),
                        "upstream connection pool overflow",
                    ));
                }
            }
        }
        let tunnel = ctx.tunnel.clone().expect("set with the view");
        // An endpoint, or the address the caller dialled where the service picks none.
        let (hop, protocol, traffic) = match &upstream {
            Upstream::Service {
                id,
                port_index,
                subset,
                ..
            } => {
                let traffic = traffic_policy(&view, *id, *port_index, subset.as_deref())
                    .unwrap_or(&DEFAULT_TRAFFIC);
                let protocol = snapshot.service(*id).ports[*port_index].protocol;
                let choose = || {
                    let subset = view.subset(*id, subset.as_deref())?;
                    view.balancer.choose(
                        snapshot,
                        *id,
                        *port_index,
                        subset,
                        traffic,
                        ctx.hash,
                        &ctx.tried,
                        now.into_std(),
                    )
                };
                let (hop, chosen) =
                    match Hop::to_service(snapshot.service(*id), tunnel.destination, choose) {
                        Ok(found) => found,
                        Err(no) => {
                            ctx.flag("UH");
                            ctx.details = "no_healthy_upstream";
                            return Err(Error::explain(ErrorType::HTTPStatus(503), no.to_string()));
                        }
                    };
                ctx.endpoint = chosen;
                (hop, protocol, traffic)
            }
            Upstream::Workload { id, port } => (
                Hop::Endpoint(*id, *port),
                AppProtocol::Unspecified,
                &*DEFAULT_TRAFFIC,
            ),
        };
        let (workload, addr) = match hop {
            Hop::Endpoint(id, port) => {
                ctx.tried.push(id);
                let w = snapshot.workload(id);
                let limit = traffic.connection_pool.connect_timeout;
                let ip = match self.shared.names.address_of(w, limit).await {
                    Ok(ip) => ip,
                    Err(e) => {
                        ctx.flag(e.flag());
                        if let NoAddress::Unresolved { name, source } = &e {
                            ctx.details = "dns_resolution_failure";
                            tracing::info!(endpoint = %name, error = %source, "endpoint name did not resolve");
                        }
                        return Err(Error::explain(ErrorType::HTTPStatus(503), e.to_string()));
                    }
                };
                (Some(w), SocketAddr::new(ip, port))
            }
            Hop::Address(addr) => (None, addr),
        };
        ctx.last = Some((workload.map(|w| w.id), addr));
        if let Some(chain) = &ctx.wasm {
            *chain
                .info()
                .upstream
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(addr);
        }
        let per_try = ctx
            .rule(&view)
            .and_then(|r| r.per_try_timeout)
            .map(|t| now + t);
        ctx.try_deadline = match (per_try, ctx.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let http2 = matches!(protocol, AppProtocol::Http2 | AppProtocol::Grpc);
        ctx.attempt = None;
        ctx.upstream_answered = false;
        ctx.plain_max_requests = None;
        // In the mesh: a CONNECT to the endpoint's ztunnel. Out of it, or no endpoint at all
        // (the address dialled): plain TCP, as Envoy reaches it.
        let Some(w) = workload.filter(|w| w.protocol == Protocol::Hbone) else {
            if !http2 {
                ctx.plain_max_requests = Some(traffic.connection_pool.max_requests_per_connection);
            }
            // The name TLS is verified against, unless the rule sets one: the authority the
            // request goes upstream with, as Envoy's automatic SNI takes it; never empty.
            let sent = upstream_authority(ctx, &view, session.req_header());
            let host = match (sent, &upstream) {
                ("", Upstream::Service { id, .. }) => &*snapshot.service(*id).hostname,
                (host, _) => host,
            };
            return Ok(Box::new(plain_peer(
                addr,
                http2,
                traffic,
                (host, &view.tls_peers),
                now,
                ctx.try_deadline,
            )));
        };
        let service = match &upstream {
            Upstream::Service { id, .. } => Some(snapshot.service(*id).hostname.to_string()),
            Upstream::Workload { .. } => None,
        };
        let connector = HboneConnector {
            pool: self.shared.pool.clone(),
            request: ConnectRequest {
                src: self.shared.identity.clone(),
                dst_identities: vec![w.identity.clone()],
                next_hop: SocketAddr::new(addr.ip(), HBONE_PORT),
                authority: Authority::Addr(addr),
                headers: tunnel.onward(service),
            },
            connect_timeout: traffic.connection_pool.connect_timeout,
            deadline: ctx.try_deadline,
            keepalive: None,
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        let connector = if http2 {
            connector
        } else {
            let attempt = Arc::new(Attempt::default());
            ctx.attempt = Some(attempt.clone());
            HboneConnector {
                keepalive: Some(KeepAlive {
                    idle: self.shared.idle.clone(),
                    attempt,
                    idle_timeout: traffic.connection_pool.http_idle_timeout,
                    max_requests: traffic.connection_pool.max_requests_per_connection,
                    take_parked: !ctx.stale_retried,
                }),
                ..connector
            }
        };
        peer.options.custom_l4 = Some(Arc::new(connector));
        // Pingora would park the finished stream in its keep-alive pool, where a virtual stream
        // can never be picked up again (pingora#883) and would hold its tunnel, and the
        // endpoint's connection behind it, until evicted. Close it as soon as it is released;
        // the pooled HBONE connection underneath is what gets reused.
        peer.options.idle_timeout = Some(Duration::ZERO);
        if http2 {
            peer.options.set_http_version(2, 2);
        }
        Ok(Box::new(peer))
    }

    /// Counts the request on a plain HTTP/1.1 connection, which Pingora pools itself (a
    /// tunnel's count is kept where it is parked), for its `maxRequestsPerConnection`: every
    /// such connection is counted, so that a new one resets its descriptor's count whatever
    /// its limit.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.close_upstream = false;
        if let Some(limit) = ctx.plain_max_requests {
            let served = &self.shared.plain_served;
            if served.count(fd, reused) >= limit && limit != 0 {
                served.forget(fd);
                ctx.close_upstream = true;
            }
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.close_upstream {
            // Pingora then closes the connection once the response is read.
            upstream_request.insert_header(http::header::CONNECTION, "close")?;
        }
        let Some(view) = ctx.view.clone() else {
            return Ok(());
        };
        let Some(rule) = ctx.rule(&view) else {
            return Ok(());
        };
        if let Some(Upstream::Service {
            backend: Some(b), ..
        }) = &ctx.upstream
            && let RuleAction::Forward(backends) = &rule.action
            && let Some(backend) = backends.get(*b)
        {
            modify(&backend.request_headers, upstream_request)?;
        }
        modify(&rule.request_headers, upstream_request)?;
        if let Some(rewrite) = &rule.rewrite {
            if let Some(path) = &rewrite.path
                && let Some((_, m)) = ctx.rule
            {
                let new = path.apply(path_and_query(upstream_request), &rule.matches[m]);
                let uri = http::Uri::try_from(new)
                    .map_err(|e| Error::because(ErrorType::InternalError, "path rewrite", e))?;
                upstream_request.set_uri(uri);
            }
            if let Some(authority) = &rewrite.authority {
                upstream_request.insert_header(http::header::HOST, authority.clone())?;
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        ctx.upstream_answered = true;
        if let Some(chosen) = &ctx.endpoint {
            let outcome = if status >= 500 {
                Outcome::ServerError(status)
            } else {
                Outcome::Success
            };
            ctx.report(chosen, outcome);
        }
        if let Some(attempt) = &ctx.attempt {
            match keeps_alive(session.req_header(), upstream_response) {
                // Nothing follows the head: the exchange is over once the request is sent.
                Some(false) if session.is_body_done() => attempt.ended_cleanly(),
                Some(_) => {}
                None => ctx.attempt = None,
            }
        }
        if retry::retries_status(ctx, session, status) {
            ctx.retriable_status = Some(status);
            let mut e = Error::explain(ErrorType::HTTPStatus(status), "retriable status");
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if end_of_stream
            && session.is_body_done()
            && let Some(attempt) = &ctx.attempt
        {
            attempt.ended_cleanly();
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.status = upstream_response.status.as_u16();
        let Some(view) = ctx.view.clone() else {
            return Ok(());
        };
        if let Some(rule) = ctx.rule(&view) {
            if let Some(Upstream::Service {
                backend: Some(b), ..
            }) = &ctx.upstream
                && let RuleAction::Forward(backends) = &rule.action
                && let Some(backend) = backends.get(*b)
            {
                modify(&backend.response_headers, upstream_response)?;
            }
            modify(&rule.response_headers, upstream_response)?;
            if let (Some(cors), Some(origin)) = (&rule.cors, &ctx.cors_origin) {
                cors::response_headers(cors, origin, upstream_response)?;
            }
        }
        if let Some(cookie) = ctx.set_cookie.take() {
            upstream_response.append_header(http::header::SET_COOKIE, cookie)?;
        }
        if let Some(chain) = &mut ctx.wasm {
            let ended = has_no_body(session.req_header(), upstream_response);
            let decision = chain.response_headers(upstream_response, ended).await?;
            if let Some(local) = Local::from_decision(decision, ctx) {
                // A plugin replacing the upstream response (or failing on it): nothing of the
                // upstream's is sent, so end the attempt here and let `fail_to_proxy` answer
                // with the whole local reply, body and length included.
                let status = local.status;
                ctx.wasm_answer = Some(Deferred::Response(local));
                return Error::e_explain(
                    ErrorType::HTTPStatus(status),
                    "answered by a wasm plugin",
                );
            }
        }
        Ok(())
    }

    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Bytes>> {
        if let Some(chain) = &mut ctx.wasm {
            chain.response_trailers(trailers).await;
        }
        Ok(None)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(chain) = &mut ctx.wasm {
            chain.response_body(body, end_of_stream);
            if let Some(chunk) = body.as_ref() {
                let sent = &chain.info().response_body_bytes;
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(None)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(chosen) = ctx.endpoint.take() {
            ctx.report(&chosen, Outcome::LocalOriginFailure);
        }
        let retry = retry::retries_connect_failure(ctx, session);
        tracing::debug!(error = %e, attempt = ctx.attempts, retry, "upstream connect failed");
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        if ctx.retriable_status.is_some() {
            // Our own signal from `upstream_response_filter`; already decided.
            e.set_retry(true);
            return e;
        }
        // A parked tunnel that failed before any answer: most likely its application closed
        // the idle connection as we took it up. An idempotent request goes again, once, on a
        // fresh tunnel to the same endpoint, whatever the route's retry policy, as HTTP clients
        // retry on a stale keep-alive connection; it does not count as an attempt.
        if ctx.attempt.as_ref().is_some_and(|a| a.reused())
            && !ctx.stale_retried
            && !ctx.upstream_answered
            && e.esource() == &pingora_error::ErrorSource::Upstream
            && session.req_header().method.is_idempotent()
            && session.response_written().is_none()
            && !session.retry_buffer_truncated()
            && ctx.sent.replayable()
            && ctx.wasm_answer.is_none()
        {
            ctx.stale_retried = true;
            ctx.attempts -= 1;
            ctx.tried.pop();
            tracing::debug!(error = %e, "a parked upstream tunnel failed; retrying on a new one");
            e.set_retry(true);
            return e;
        }
        let retry = retry::retries_error(ctx, session, &e);
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (code, body): (u16, &'static str) = match e.etype() {
            ErrorType::HTTPStatus(code) => (*code, ""),
            _ if retry::is_timeout(e) || ctx.deadline.is_some_and(|d| Instant::now() >= d) => {
                ctx.flag("UT");
                (504, "upstream request timeout")
            }
            ErrorType::ConnectTimedout | ErrorType::ConnectRefused | ErrorType::ConnectError => {
                ctx.flag(if ctx.attempts > 1 { "URX" } else { "UF" });
                (
                    503,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                )
            }
            _ => match e.esource() {
                pingora_error::ErrorSource::Upstream => {
                    ctx.flag(if ctx.attempts > 1 { "URX" } else { "UC" });
                    (
                        503,
                        "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                    )
                }
                pingora_error::ErrorSource::Downstream => {
                    ctx.flag("DC");
                    (0, "")
                }
                _ => (500, ""),
            },
        };
        if *e.etype() == CLOSED_BY_PLUGIN {
            return closed_by_plugin(session, ctx);
        }
        if session.response_written().is_some() {
            ctx.status = code;
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        // The answer goes through the plugins' response callbacks unless they gave it.
        let (local, chain) = match ctx.wasm_answer.take() {
            Some(Deferred::Request(local)) => (local, ctx.wasm.as_mut()),
            Some(Deferred::Response(local)) => (local, None),
            None if code > 0 => (
                Local::new(code, Vec::new(), Bytes::from_static(body.as_bytes())),
                ctx.wasm.as_mut(),
            ),
            None => {
                ctx.status = code;
                return FailToProxy {
                    error_code: code,
                    can_reuse_downstream: false,
                };
            }
        };
        let fallback = local.status;
        ctx.status = match local.send(session, chain).await {
            Ok(status) => status,
            Err(e) if *e.etype() == CLOSED_BY_PLUGIN => return closed_by_plugin(session, ctx),
            Err(e) => {
                tracing::debug!(error = %e, "sending the answer failed");
                fallback
            }
        };
        FailToProxy {
            error_code: ctx.status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.endpoint = None;
        if let Some(chain) = &ctx.wasm {
            // The plugins' `on_log` runs when the chain drops, after this.
            let info = chain.info();
            let _ = info.response_code_details.set(ctx.details.to_owned());
            let _ = info.response_flags.set(ctx.flags.to_owned());
        }
        let status = session
            .response_written()
            .map_or(ctx.status, |r| r.status.as_u16());
        let (Some(view), Some(tunnel)) = (&ctx.view, &ctx.tunnel) else {
            return;
        };
        let snapshot = &view.snapshot;
        let network = &*snapshot.options().network;
        let service = match ctx.target {
            Some(Target::Service { id, .. }) => Some(snapshot.service(id)),
            _ => None,
        };
        let destination = ctx.last.and_then(|(w, _)| w).map(|w| snapshot.workload(w));
        let parties = Parties {
            snapshot,
            source: snapshot.workload_by_ip(network, tunnel.client_ip),
            source_identity: &tunnel.source,
            source_principal: &tunnel.principal,
            source_baggage: tunnel.baggage.as_deref(),
            service,
            destination,
        };
        let protocol = match session.req_header().version {
            http::Version::HTTP_2 if is_grpc(session.req_header()) => "grpc",
            _ => "http",
        };
        let labels = Labels::new(&parties, protocol, status, ctx.flags);
        let elapsed = ctx.start.elapsed();
        let metrics = &self.shared.metrics;
        metrics.requests.get_or_create(&labels).inc();
        metrics
            .duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
        metrics
            .request_bytes
            .get_or_create(&labels)
            .observe(session.body_bytes_read() as f64);
        metrics
            .response_bytes
            .get_or_create(&labels)
            .observe(session.body_bytes_sent() as f64);
        let req = session.req_header();
        let route = ctx.rule(view).map(|r| r.source.to_string());
        tracing::info!(
            target: "access",
            method = %req.method,
            path = path_and_query(req),
            authority = authority(req),
            status,
            response_flags = ctx.flags,
            details = ctx.details,
            src.identity = %tunnel.principal,
            src.addr = %tunnel.client_ip,
            dst.addr = %tunnel.destination,
            dst.service = service.map(|s| &*s.hostname),
            trace_id = %tunnel.trace_id(),
            route = route.as_deref(),
            upstream = ctx.last.map(|(_, a)| tracing::field::display(a)),
            upstream.workload = destination.map(|w| &*w.name),
            attempts = ctx.attempts,
            duration_ms = elapsed.as_millis() as u64,
            error = e.map(tracing::field::display),
            "request"
        );
    }
}

/// Ends a request a plugin closed: reset, no answer, and the access log shows status 0.
fn closed_by_plugin(session: &mut Session, ctx: &mut RequestCtx) -> FailToProxy {
    reset_downstream(session);
    ctx.details = "wasm_close_stream";
    ctx.status = 0;
    FailToProxy {
        error_code: 0,
        can_reuse_downstream: false,
    }
}

/// Whether an HTTP/1.1 upstream connection survives `resp` to `req` (`Some`, with whether a
/// body follows the head), or must close (`None`): HTTP/1.0, `connection: close`, an upgrade,
/// or a body that only the connection's end delimits.
fn keeps_alive(req: &RequestHeader, resp: &ResponseHeader) -> Option<bool> {
    use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
    let closes = resp.headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    });
    let status = resp.status.as_u16();
    if resp.version != http::Version::HTTP_11 || closes || status == 101 {
        return None;
    }
    let no_body = req.method == http::Method::HEAD
        || matches!(status, 100..=199 | 204 | 304)
        || resp
            .headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    if no_body {
        return Some(false);
    }
    let delimited =
        resp.headers.contains_key(CONTENT_LENGTH) || resp.headers.contains_key(TRANSFER_ENCODING);
    delimited.then_some(true)
}

/// The downstream protocol as Envoy names it (`request.protocol`).
fn protocol_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

fn is_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}
