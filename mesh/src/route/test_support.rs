//! Fixtures shared by the route tests: a small service registry and request builder.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::de::DeserializeOwned;

use super::{RequestView, ResolvedService, ServiceResolver};

/// A fixed registry: Kubernetes Services (`name.namespace.svc.cluster.local`) and ServiceEntries
/// with their own hostnames.
pub(super) struct Services(Vec<ResolvedService>);

impl Services {
    /// `reviews`, `ratings` (both 9080 `http`) and `echo` (80 `http`, 8080 `admin`) in
    /// `default`; `productpage` (9080) in `shop`; ServiceEntry `external` in `default` with
    /// host `api.example.com` (443 `https`).
    pub(super) fn mesh() -> Self {
        let svc = |ns: &str, name: &str, ports: &[(Option<&str>, u16)]| {
            entry(ns, name, &format!("{name}.{ns}.svc.cluster.local"), ports)
        };
        Services(vec![
            svc("default", "reviews", &[(Some("http"), 9080)]),
            svc("default", "ratings", &[(Some("http"), 9080)]),
            svc(
                "default",
                "echo",
                &[(Some("http"), 80), (Some("admin"), 8080)],
            ),
            svc("shop", "productpage", &[(None, 9080)]),
            entry(
                "default",
                "external",
                "api.example.com",
                &[(Some("https"), 443)],
            ),
        ])
    }
}

fn entry(ns: &str, name: &str, host: &str, ports: &[(Option<&str>, u16)]) -> ResolvedService {
    ResolvedService {
        hostname: Arc::from(host),
        namespace: Arc::from(ns),
        name: Arc::from(name),
        ports: ports.iter().map(|(n, p)| (n.map(Arc::from), *p)).collect(),
    }
}

impl ServiceResolver for Services {
    fn service(&self, namespace: &str, name: &str) -> Option<ResolvedService> {
        (self.0.iter())
            .find(|s| &*s.namespace == namespace && &*s.name == name)
            .cloned()
    }

    fn host(&self, host: &str, from_namespace: &str) -> Option<ResolvedService> {
        let fqdn = match host.matches('.').count() {
            0 => format!("{host}.{from_namespace}.svc.cluster.local"),
            1 => format!("{host}.svc.cluster.local"),
            _ => host.to_owned(),
        };
        let found = |h: &str| self.0.iter().find(|s| &*s.hostname == h).cloned();
        found(&fqdn).or_else(|| found(host))
    }
}

/// Parses a test resource.
pub(super) fn yaml<T: DeserializeOwned>(text: &str) -> T {
    match serde_yaml::from_str(text) {
        Ok(value) => value,
        Err(e) => panic!("test YAML does not parse: {e}\n{text}"),
    }
}

/// A request to route.
#[derive(Debug, Clone)]
pub(super) struct Req {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) authority: String,
    pub(super) headers: HeaderMap,
    pub(super) port: u16,
}

impl Req {
    pub(super) fn get(path: &str) -> Self {
        Self {
            method: Method::GET,
            path: path.to_owned(),
            authority: "echo".to_owned(),
            headers: HeaderMap::new(),
            port: 80,
        }
    }

    pub(super) fn method(mut self, method: &str) -> Self {
        self.method = Method::from_bytes(method.as_bytes()).expect("test method");
        self
    }

    pub(super) fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
            HeaderValue::from_str(value).expect("test header value"),
        );
        self
    }

    pub(super) fn authority(mut self, authority: &str) -> Self {
        self.authority = authority.to_owned();
        self
    }

    pub(super) fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub(super) fn view(&self) -> RequestView<'_> {
        RequestView {
            method: &self.method,
            scheme: "http",
            path: &self.path,
            authority: &self.authority,
            headers: &self.headers,
            port: self.port,
            source_namespace: Some("default"),
        }
    }
}
