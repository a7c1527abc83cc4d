//! WasmPlugins in the request lifecycle.
//!
//! When a snapshot arrives, every plugin attached to this waypoint (through its Gateway, the
//! GatewayClass, or a service it serves) is fetched, compiled (cached by SHA-256) and started
//! before the new view is published; a plugin whose module and configuration did not change
//! keeps its running instances, so a reload fails no request. A plugin that cannot load stays in
//! the view as a failure: FAIL_CLOSE answers 503 to the requests it applies to, FAIL_OPEN skips
//! it.
//!
//! Per request, a [`Chain`] runs the plugins for the destination in Istio's order: AUTHN and
//! AUTHZ plugins before authorization, STATS and unspecified ones after it, each phase by
//! priority. Response callbacks run in reverse order, as Envoy's encoder chain does, and also see
//! the waypoint's own answers (403, 404, 503, a plugin's local reply), in every plugin of the
//! chain.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use mesh::Snapshot;
use mesh::model::{
    FailStrategy, Plugin as Spec, PluginId, PluginPhase, PullPolicy, ServiceId, WaypointId,
};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::state::View;
use crate::tunnel::Tunnel;
use plugins::{Headers, Host, LocalResponse, ModuleCache, Stream, StreamInfo, Verdict};

/// The plugin host and what it has loaded.
#[derive(Debug)]
pub(crate) struct Plugins {
    host: Arc<Host>,
    /// Fetched modules by URL, per `imagePullPolicy`.
    modules: ModuleCache,
}

/// A plugin as the current view knows it: started, or why it is not.
#[derive(Debug)]
pub(crate) struct Loaded {
    spec: Spec,
    /// SHA-256 of the module the plugin runs.
    sha256: Option<String>,
    state: Result<plugins::Plugin, Arc<str>>,
}

/// The loaded plugins of a snapshot, by plugin id.
#[derive(Debug, Default)]
pub(crate) struct LoadedSet(Vec<Option<Arc<Loaded>>>);

impl Plugins {
    pub(crate) fn new(host: Host) -> Self {
        Plugins {
            host: Arc::new(host),
            modules: ModuleCache::new(),
        }
    }

    /// Loads the plugins `waypoint` runs in `snapshot`, reusing `previous` ones whose module and
    /// configuration are unchanged.
    pub(crate) async fn load(
        &self,
        snapshot: &Snapshot,
        waypoint: Option<WaypointId>,
        previous: Option<&LoadedSet>,
    ) -> LoadedSet {
        let Some(waypoint) = waypoint else {
            return LoadedSet::default();
        };
        let mut ids: Vec<PluginId> = snapshot.waypoint(waypoint).plugins.to_vec();
        for service in snapshot.services() {
            if service.waypoint == Some(waypoint) {
                ids.extend_from_slice(&service.plugins);
            }
        }
        ids.sort();
        ids.dedup();
        let mut set = LoadedSet(Vec::new());
        for id in ids {
            let spec = snapshot.plugin(id);
            let loaded = self.load_one(spec, previous).await;
            if set.0.len() <= id.index() {
                set.0.resize(id.index() + 1, None);
            }
            set.0[id.index()] = Some(loaded);
        }
        self.modules
            .retain(|url| set.0.iter().flatten().any(|l| &*l.spec.url == url));
        self.host.retain_modules(|sha| {
            set.0
                .iter()
                .flatten()
                .any(|l| l.sha256.as_deref() == Some(sha))
        });
        set
    }

    async fn load_one(&self, spec: &Spec, previous: Option<&LoadedSet>) -> Arc<Loaded> {
        let name = format!("{}.{}", spec.namespace, spec.name);
        let policy = match spec.pull_policy {
            PullPolicy::IfNotPresent => plugins::PullPolicy::IfNotPresent,
            PullPolicy::Always => plugins::PullPolicy::Always,
            PullPolicy::Unspecified => plugins::PullPolicy::unspecified(&spec.url),
        };
        let fetched = self
            .modules
            .get(&spec.url, spec.sha256.as_deref(), policy)
            .await;
        let bytes = match fetched {
            Ok(b) => b,
            Err(e) => {
                // Istio's agent rejects the new configuration when a pull fails, and Envoy keeps
                // running the filter it had: so does a plugin that was running here.
                if let Some(old) = previous
                    .into_iter()
                    .flat_map(|p| p.0.iter().flatten())
                    .find(|old| {
                        old.state.is_ok()
                            && old.spec.namespace == spec.namespace
                            && old.spec.name == spec.name
                    })
                {
                    tracing::warn!(
                        plugin = %name,
                        url = %spec.url,
                        error = %e,
                        "fetching the wasm module failed; the plugin keeps running as it was"
                    );
                    return old.clone();
                }
                return failed(spec, None, format!("fetching {}: {e}", spec.url));
            }
        };
        let host = self.host.clone();
        let compiled = tokio::task::spawn_blocking(move || host.compile(&bytes)).await;

        let module = match compiled {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return failed(spec, None, e.to_string()),
            Err(e) => return failed(spec, None, format!("compiling: {e}")),
        };
        let sha = module.sha256().to_owned();
        // The same module with the same configuration keeps its running instances; the rest of
        // the spec (phase, priority, fail strategy, ports) is taken from the new one.
        if let Some(old) = previous
            .into_iter()
            .flat_map(|p| p.0.iter().flatten())
            .find(|old| {
                old.state.is_ok()
                    && old.sha256.as_deref() == Some(&sha)
                    && same_config(&old.spec, spec)
            })
        {
            return Arc::new(Loaded {
                spec: spec.clone(),
                sha256: old.sha256.clone(),
                state: old.state.clone(),
            });
        }
        let mut config = plugins::PluginConfig::new(
            name.clone(),
            &*spec.root_id,
            spec.config.as_bytes().to_vec(),
        );
        config.env = spec
            .env
            .iter()
            .filter_map(|(k, v)| {
                let value = match v {
                    Some(v) => v.to_string(),
                    // valueFrom: HOST copies the proxy's own variable; a missing one is skipped.
                    None => std::env::var(&**k).ok()?,
                };
                Some((k.to_string(), value))
            })
            .collect();
        let host = self.host.clone();
        let started = tokio::task::spawn_blocking(move || host.load(&module, config)).await;
        match started {
            Ok(Ok(plugin)) => {
                tracing::info!(plugin = %name, abi = %plugin.abi(), sha256 = %sha, "wasm plugin loaded");
                Arc::new(Loaded {
                    spec: spec.clone(),
                    sha256: Some(sha),
                    state: Ok(plugin),
                })
            }
            Ok(Err(e)) => failed(spec, Some(sha), e.to_string()),
            Err(e) => failed(spec, Some(sha), format!("starting: {e}")),
        }
    }
}

fn failed(spec: &Spec, sha256: Option<String>, why: String) -> Arc<Loaded> {
    tracing::error!(
        plugin.namespace = %spec.namespace,
        plugin.name = %spec.name,
        fail_strategy = ?spec.fail_strategy,
        error = %why,
        "wasm plugin failed to load"
    );
    Arc::new(Loaded {
        spec: spec.clone(),
        sha256,
        state: Err(why.into()),
    })
}

/// Whether two specs run the same plugin the same way (the module is compared by digest).
fn same_config(a: &Spec, b: &Spec) -> bool {
    a.namespace == b.namespace
        && a.name == b.name
        && a.root_id == b.root_id
        && a.config == b.config
        && a.env == b.env
}

impl LoadedSet {
    fn get(&self, id: PluginId) -> Option<&Arc<Loaded>> {
        self.0.get(id.index())?.as_ref()
    }
}

/// One request's plugins and their stream contexts.
#[derive(Debug)]
pub(crate) struct Chain {
    info: Arc<StreamInfo>,
    links: Vec<Link>,
    /// The request map as the last request-phase plugins left it (and as applied to the
    /// request), kept for later phases' property reads instead of building it again.
    request: Option<Headers>,
    /// Whether the request's, and the response's, headers ended it. As in Envoy, whose codecs
    /// then end the stream with the headers, the plugins' body callbacks never run for a
    /// message without a body: `on_http_request_body` is not called for a GET with
    /// `end_of_stream` already given to `on_http_request_headers`.
    request_ended: bool,
    response_ended: bool,
}

#[derive(Debug)]
struct Link {
    loaded: Arc<Loaded>,
    /// The stream context, once the request reached this plugin; `None` again when a failed
    /// FAIL_OPEN plugin is skipped for the rest of the request.
    stream: Option<Stream>,
    skipped: bool,
}

/// What the chain decided for the request.
pub(crate) enum Decision {
    Continue,
    Answer(LocalResponse),
    /// A FAIL_CLOSE plugin failed: 503.
    Failed,
}

impl Chain {
    /// The plugins for a request to `service` (or a workload) on `port` over `protocol`
    /// (`HTTP/1.1`, `HTTP/2`); `None` when there are none, so requests without plugins pay
    /// nothing.
    pub(crate) fn new(
        view: &View,
        service: Option<ServiceId>,
        port: u16,
        tunnel: &Tunnel,
        protocol: &'static str,
    ) -> Option<Chain> {
        let snapshot = &view.snapshot;
        let set = &view.plugins;
        let waypoint = snapshot.waypoint(view.waypoint?);
        let service = service.map(|s| snapshot.service(s));
        let ids = match service {
            Some(s) if !s.plugins.is_empty() => &s.plugins[..],
            _ => &waypoint.plugins[..],
        };
        let links: Vec<Link> = ids
            .iter()
            .filter_map(|&id| set.get(id))
            .filter(|l| l.spec.applies_to_port(port))
            .map(|loaded| Link {
                loaded: loaded.clone(),
                stream: None,
                skipped: false,
            })
            .collect();
        if links.is_empty() {
            return None;
        }
        let mut info = StreamInfo::new(
            SocketAddr::new(tunnel.client_ip, tunnel.peer.port()),
            tunnel.destination,
            Some(tunnel.principal.to_string()),
        );
        info.connection_id = tunnel.id;
        info.protocol = protocol;
        Some(Chain {
            info: Arc::new(info),
            links,
            request: None,
            request_ended: false,
            response_ended: false,
        })
    }

    /// What the plugins know of the request; the waypoint fills it in as the request goes.
    pub(crate) fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// Runs `on_request_headers` of the plugins in `phases` over the request, applying what they
    /// change to it.
    pub(crate) async fn request_headers(
        &mut self,
        phases: fn(PluginPhase) -> bool,
        req: &mut RequestHeader,
        end_of_stream: bool,
    ) -> Result<Decision> {
        self.request_ended = end_of_stream;
        if !self.links.iter().any(|l| phases(l.loaded.spec.phase)) {
            return Ok(Decision::Continue);
        }
        let mut headers = request_map(req);
        let mut decision = Decision::Continue;
        for link in self
            .links
            .iter_mut()
            .filter(|l| phases(l.loaded.spec.phase))
        {
            let Some(stream) = link.start(&self.info) else {
                match link.fail() {
                    Some(d) => {
                        decision = d;
                        break;
                    }
                    None => continue,
                }
            };
            match stream.request_headers(&mut headers, end_of_stream).await {
                Verdict::Continue => {}
                Verdict::Local(r) => {
                    decision = Decision::Answer(r);
                    break;
                }
                Verdict::Failed(f) => {
                    tracing::warn!(plugin = %link.loaded.spec.name, error = %f, "wasm plugin failed on request headers");
                    if let Some(d) = link.fail() {
                        decision = d;
                        break;
                    }
                }
            }
        }
        if headers.is_modified() {
            apply_request(&headers, req)?;
        }
        self.request = Some(headers);
        Ok(decision)
    }

    /// The request as it left the request phase, for later phases' property reads.
    pub(crate) fn request_done(&mut self, req: &RequestHeader) {
        let request = self.request.take().unwrap_or_else(|| request_map(req));
        let _ = self.info.request.set(request);
    }

    /// Runs `on_request_body` on a chunk through every started plugin. A plugin that buffers
    /// stops the chunk here; it comes back whole when the plugin continues. Nothing runs for a
    /// request whose headers ended it.
    pub(crate) async fn request_body(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Decision {
        if self.request_ended {
            return Decision::Continue;
        }
        let had_chunk = body.is_some();
        for link in &mut self.links {
            if body.as_ref().is_none_or(Bytes::is_empty) && !end_of_stream {
                break;
            }
            let Some(stream) = link.stream.as_mut() else {
                continue;
            };
            match stream.request_body(body, end_of_stream).await {
                Verdict::Continue => {}
                Verdict::Local(r) => return Decision::Answer(r),
                Verdict::Failed(f) => {
                    tracing::warn!(plugin = %link.loaded.spec.name, error = %f, "wasm plugin failed on request body");
                    if let Some(d) = link.fail() {
                        return d;
                    }
                }
            }
        }
        held(had_chunk, body, end_of_stream);
        Decision::Continue
    }

    /// Runs `on_response_headers` in reverse order over a response (the upstream's or one the
    /// waypoint makes itself). Every plugin of the chain sees it, also one the request never
    /// reached (an answer given before it): Envoy sends local replies through the whole encoder
    /// chain, creating the stream context of a filter that has none yet. A plugin that answers
    /// locally here replaces the response. `end_of_stream`: the response has no body.
    pub(crate) async fn response_headers(
        &mut self,
        resp: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Result<Decision> {
        self.response_ended = end_of_stream;
        let mut headers = response_map(resp);
        let mut decision = Decision::Continue;
        for link in self.links.iter_mut().rev() {
            let Some(stream) = link.start(&self.info) else {
                continue;
            };
            match stream.response_headers(&mut headers, end_of_stream).await {
                Verdict::Continue => {}
                Verdict::Local(r) => {
                    decision = Decision::Answer(r);
                    break;
                }
                Verdict::Failed(f) => {
                    tracing::warn!(plugin = %link.loaded.spec.name, error = %f, "wasm plugin failed on response headers");
                    if let Some(d) = link.fail() {
                        decision = d;
                        break;
                    }
                }
            }
        }
        if headers.is_modified() {
            apply_response(&headers, resp)?;
        }
        let _ = self.info.response.set(headers);
        Ok(decision)
    }

    /// The response sent is not the one `response_headers` was given (a plugin replaced it, or
    /// failed): whether the plugins' body callbacks see its body follows the one sent.
    pub(crate) fn response_replaced(&mut self, end_of_stream: bool) {
        self.response_ended = end_of_stream;
    }

    /// Runs `on_response_trailers` in reverse order. The status is sent by now: a plugin that
    /// answers or fails here is logged, and the trailers go on as the plugins left them.
    pub(crate) async fn response_trailers(&mut self, trailers: &mut http::HeaderMap) {
        let mut map = Headers::new();
        for (name, value) in trailers.iter() {
            map.push(name.as_str(), value.as_bytes());
        }
        for link in self.links.iter_mut().rev() {
            let Some(stream) = link.stream.as_mut() else {
                continue;
            };
            match stream.response_trailers(&mut map).await {
                Verdict::Continue => {}
                Verdict::Local(r) => {
                    tracing::warn!(plugin = %link.loaded.spec.name, status = r.status, "wasm plugin answered at the response trailers; ignored");
                }
                Verdict::Failed(f) => {
                    tracing::warn!(plugin = %link.loaded.spec.name, error = %f, "wasm plugin failed on response trailers");
                    link.stream = None;
                    link.skipped = true;
                }
            }
        }
        if map.is_modified() {
            trailers.clear();
            for (name, value) in map.iter().filter(|(n, _)| !n.starts_with(':')) {
                match pair(name, value) {
                    Some((n, v)) => {
                        trailers.append(n, v);
                    }
                    None => tracing::debug!(
                        trailer = name,
                        "wasm plugin set an invalid trailer; dropped"
                    ),
                }
            }
        }
        let _ = self.info.response_trailers.set(map);
    }

    /// Runs `on_response_body` on a chunk, in reverse order. Failures here can only be logged:
    /// the response has started. Nothing runs for a response whose headers ended it.
    pub(crate) fn response_body(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) {
        if self.response_ended {
            return;
        }
        let had_chunk = body.is_some();
        for link in self.links.iter_mut().rev() {
            if body.as_ref().is_none_or(Bytes::is_empty) && !end_of_stream {
                break;
            }
            let Some(stream) = link.stream.as_mut() else {
                continue;
            };
            match response_body_now(stream, body, end_of_stream) {
                Verdict::Continue => {}
                Verdict::Local(r) => {
                    tracing::warn!(plugin = %link.loaded.spec.name, status = r.status, "wasm plugin answered after the response started; ignored");
                }
                Verdict::Failed(f) => {
                    tracing::warn!(plugin = %link.loaded.spec.name, error = %f, "wasm plugin failed on response body");
                    link.stream = None;
                    link.skipped = true;
                }
            }
        }
        held(had_chunk, body, end_of_stream);
    }
}

/// Runs one plugin's `on_response_body` from Pingora's synchronous body hook. The call is ready
/// at once unless the plugin paused at the end of the body to wait for an event (a call to a
/// scanning service, say); then this worker blocks until the plugin continues, and tokio hands
/// the worker's other tasks to a fresh thread meanwhile. A runtime that cannot block (current
/// thread) continues with what the plugin buffered.
fn response_body_now(stream: &mut Stream, body: &mut Option<Bytes>, eos: bool) -> Verdict {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    use tokio::runtime::{Handle, RuntimeFlavor};

    {
        let mut call = std::pin::pin!(stream.response_body(body, eos));
        if let Poll::Ready(verdict) = call.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            return verdict;
        }
        if let Ok(h) = Handle::try_current()
            && h.runtime_flavor() == RuntimeFlavor::MultiThread
        {
            return tokio::task::block_in_place(|| h.block_on(call));
        }
    }
    tracing::debug!(
        "wasm plugin paused at the end of the response body on a runtime that cannot wait; continuing with the buffered body"
    );
    *body = stream.take_response_body();
    Verdict::Continue
}

/// A chunk a plugin holds (buffering) is `None` from the host, but `None` tells Pingora the body
/// ended; before the end, an empty chunk is what means "nothing to send yet". A call that
/// brought no chunk stays `None`.
fn held(had_chunk: bool, body: &mut Option<Bytes>, end_of_stream: bool) {
    if had_chunk && body.is_none() && !end_of_stream {
        *body = Some(Bytes::new());
    }
}

impl Link {
    /// The stream context, created when the request first reaches this plugin.
    fn start(&mut self, info: &Arc<StreamInfo>) -> Option<&mut Stream> {
        if self.skipped {
            return None;
        }
        if self.stream.is_none() {
            let plugin = match &self.loaded.state {
                Ok(p) => p,
                Err(why) => {
                    tracing::debug!(plugin = %self.loaded.spec.name, error = %why, "wasm plugin not loaded");
                    return None;
                }
            };
            match plugin.stream(info.clone()) {
                Ok(s) => self.stream = Some(s),
                Err(f) => {
                    tracing::warn!(plugin = %self.loaded.spec.name, error = %f, "wasm plugin could not start a stream");
                    return None;
                }
            }
        }
        self.stream.as_mut()
    }

    /// Applies the fail strategy: `Some(Failed)` stops the request; FAIL_OPEN skips the plugin
    /// for the rest of it.
    fn fail(&mut self) -> Option<Decision> {
        self.stream = None;
        self.skipped = true;
        match self.loaded.spec.fail_strategy {
            // A trapped instance is always replaced, so FAIL_RELOAD fails this request only.
            FailStrategy::FailClose | FailStrategy::FailReload => Some(Decision::Failed),
            FailStrategy::FailOpen => None,
        }
    }
}

/// The request as plugins see it: pseudo-headers, then the headers (Host becomes `:authority`).
fn request_map(req: &RequestHeader) -> Headers {
    let mut h = Headers::new();
    h.push(":method", req.method.as_str());
    h.push(":scheme", "http");
    h.push(
        ":path",
        req.uri.path_and_query().map_or("/", |p| p.as_str()),
    );
    h.push(":authority", crate::http::authority(req));
    for (name, value) in &req.headers {
        if name != http::header::HOST {
            h.push(name.as_str(), value.as_bytes());
        }
    }
    h
}

fn response_map(resp: &ResponseHeader) -> Headers {
    let mut h = Headers::new();
    h.push(":status", resp.status.as_str());
    for (name, value) in &resp.headers {
        h.push(name.as_str(), value.as_bytes());
    }
    h
}

/// A header pair plugins wrote, if HTTP allows it.
fn pair(name: &str, value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_bytes(name.as_bytes()).ok()?,
        HeaderValue::from_bytes(value).ok()?,
    ))
}

/// Writes a plugin-edited map back: method, path and authority from the pseudo-headers, the
/// rest replaced wholesale.
fn apply_request(h: &Headers, req: &mut RequestHeader) -> Result<()> {
    if let Some(method) = h
        .get(":method")
        .and_then(|m| http::Method::from_bytes(m).ok())
    {
        req.set_method(method);
    }
    let authority = h.get_str(":authority").unwrap_or_default().to_owned();
    if let Some(path) = h.get_str(":path")
        && let Ok(uri) = http::Uri::try_from(path)
    {
        req.set_uri(uri);
    }
    let names: Vec<HeaderName> = req.headers.keys().cloned().collect();
    for name in names {
        req.remove_header(&name);
    }
    if !authority.is_empty() {
        req.insert_header(http::header::HOST, authority)?;
    }
    for (name, value) in h.iter().filter(|(n, _)| !n.starts_with(':')) {
        match pair(name, value) {
            Some((n, v)) => {
                req.append_header(n, v)?;
            }
            None => tracing::debug!(
                header = name,
                "wasm plugin set an invalid request header; dropped"
            ),
        }
    }
    Ok(())
}

fn apply_response(h: &Headers, resp: &mut ResponseHeader) -> Result<()> {
    if let Some(status) = h.get_str(":status").and_then(|s| s.parse::<u16>().ok()) {
        resp.set_status(status)?;
    }
    let names: Vec<HeaderName> = resp.headers.keys().cloned().collect();
    for name in names {
        resp.remove_header(&name);
    }
    for (name, value) in h.iter().filter(|(n, _)| !n.starts_with(':')) {
        match pair(name, value) {
            Some((n, v)) => {
                resp.append_header(n, v)?;
            }
            None => tracing::debug!(
                header = name,
                "wasm plugin set an invalid response header; dropped"
            ),
        }
    }
    Ok(())
}

/// A plugin's local response as header pairs for the waypoint's answer.
pub(crate) fn local_headers(r: &LocalResponse) -> Vec<(HeaderName, HeaderValue)> {
    r.headers.iter().filter_map(|(n, v)| pair(n, v)).collect()
}

/// Phases that run before authorization.
pub(crate) fn before_authz(p: PluginPhase) -> bool {
    matches!(p, PluginPhase::Authn | PluginPhase::Authz)
}

/// Phases that run after authorization.
pub(crate) fn after_authz(p: PluginPhase) -> bool {
    !before_authz(p)
}
