//! Gateway API `HTTPRoute` → [`Attachment`]s of [`RouteRule`]s (GAMMA, mesh profile).
//!
//! Only Service and ServiceEntry parents attach. A parent that is the waypoint `Gateway` is
//! accepted and ignored, because Istio does not translate routes attached to a waypoint
//! Gateway ("Waypoint doesn't convert routes to VirtualServices"): per-service routing must name
//! the Service. `hostnames` is ignored as Istio does for mesh routes, since the Service the
//! client dialled, not the `Host` header, identifies the traffic.

use std::sync::Arc;
use std::time::Duration;

use super::lower_common::{Problems, duration, full_match_regex, header_name, timeout};
use super::model::{
    Backend, Cors, HeaderMatch, HeaderModifier, Mirror, PathMatch, QueryMatch, Redirect,
    RequestMatch, Rewrite, RouteKind, RouteRule, RuleAction, RuleSource, ValueMatch,
    WeightedBackend,
};
use super::retry::{MESH_DEFAULT_CONDITIONS, RetryOn, RetryPolicy};
use super::spec_gateway::{
    HttpHeaderMatch, HttpRouteMatch, HttpRouteRule, HttpRouteSpec, ParentReference, PathMatchType,
    ValueMatchType,
};
use super::{Attachment, ServiceResolver};
use crate::FieldError;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const ISTIO_GROUP: &str = "networking.istio.io";
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
const MAX_WEIGHT: u32 = 1_000_000;

/// Lowers one HTTPRoute (`namespace`/`name`) into one attachment per Service parent (and port).
///
/// Every problem is returned, each with its field path. Some are runtime errors in the spec
/// (a backendRef to a missing Service answers 500) but are reported here so they are seen at
/// load; the caller decides whether they are fatal.
pub fn lower_http_route(
    namespace: &str,
    name: &str,
    spec: &HttpRouteSpec,
    services: &dyn ServiceResolver,
) -> Result<Vec<Attachment>, Vec<FieldError>> {
    let mut cx = Lowering {
        namespace,
        source_namespace: Arc::from(namespace),
        source_name: Arc::from(name),
        services,
        problems: Problems::default(),
    };
    if !spec.hostnames.is_empty() {
        tracing::debug!(
            namespace,
            name,
            "HTTPRoute hostnames are ignored for Service parents"
        );
    }
    let parents = cx.parents(&spec.parent_refs);
    let rules: Vec<RouteRule> = if spec.rules.is_empty() {
        // The API server would default `rules` to one `PathPrefix /` rule without backends.
        vec![cx.rule(0, &HttpRouteRule::default())]
    } else {
        (spec.rules.iter().enumerate())
            .map(|(i, rule)| cx.rule(i, rule))
            .collect()
    };
    let attachments = parents
        .into_iter()
        .map(|(service, port)| Attachment {
            service,
            namespace: cx.source_namespace.clone(),
            export_to: Box::default(),
            port,
            rules: rules.clone(),
        })
        .collect();
    cx.problems.finish(attachments)
}

/// State of one HTTPRoute's lowering.
pub(super) struct Lowering<'a> {
    namespace: &'a str,
    source_namespace: Arc<str>,
    source_name: Arc<str>,
    services: &'a dyn ServiceResolver,
    pub(super) problems: Problems,
}

/// What a rule's (or a backend's) filters add up to.
#[derive(Default)]
pub(super) struct Filters {
    pub(super) request_headers: HeaderModifier,
    pub(super) response_headers: HeaderModifier,
    pub(super) redirect: Option<Redirect>,
    pub(super) rewrite: Option<Rewrite>,
    pub(super) mirrors: Vec<Mirror>,
    pub(super) cors: Option<Cors>,
}

/// A backend reference as both `backendRefs[]` and `requestMirror.backendRef` spell it.
pub(super) struct BackendRef<'s> {
    pub(super) group: Option<&'s str>,
    pub(super) kind: Option<&'s str>,
    pub(super) name: &'s str,
    pub(super) namespace: Option<&'s str>,
    pub(super) port: Option<u16>,
}

impl Lowering<'_> {
    /// `(service FQDN, port)` for each Service or ServiceEntry parent, without duplicates.
    fn parents(&mut self, refs: &[ParentReference]) -> Vec<(Arc<str>, Option<u16>)> {
        let mut out: Vec<(Arc<str>, Option<u16>)> = Vec::new();
        for (i, parent) in refs.iter().enumerate() {
            let field = format!("spec.parentRefs[{i}]");
            let group = parent.group.as_deref().unwrap_or(GATEWAY_GROUP);
            let kind = parent.kind.as_deref().unwrap_or("Gateway");
            match (group, kind) {
                ("" | "core", "Service") | (ISTIO_GROUP, "ServiceEntry") => {}
                (GATEWAY_GROUP, "Gateway") => {
                    tracing::debug!(
                        route = %self.source_name,
                        gateway = %parent.name,
                        "Gateway parent ignored: waypoints apply only routes attached to Services"
                    );
                    continue;
                }
                _ => {
                    self.problems.push(
                        format!("{field}.kind"),
                        format!(
                            "unsupported parent kind {kind:?} in group {group:?}; in the mesh a route attaches to a Service (group \"\"), a ServiceEntry (group {ISTIO_GROUP}) or the waypoint Gateway (group {GATEWAY_GROUP})"
                        ),
                    );
                    continue;
                }
            }
            let namespace = parent.namespace.as_deref().unwrap_or(self.namespace);
            let Some(service) = self.services.service(namespace, &parent.name) else {
                self.problems.push(
                    format!("{field}.name"),
                    format!(
                        "no {kind} {:?} in namespace {namespace:?}; parentRefs must name an existing Service or ServiceEntry",
                        parent.name
                    ),
                );
                continue;
            };
            let mut port = parent.port;
            if let Some(section) = &parent.section_name {
                match service.port_named(section) {
                    None => self.problems.push(
                        format!("{field}.sectionName"),
                        format!(
                            "{kind} {:?} has no port named {section:?}; its ports are {}",
                            parent.name,
                            service.describe_ports()
                        ),
                    ),
                    Some(named) if parent.port.is_some_and(|p| p != named) => self.problems.push(
                        format!("{field}.port"),
                        format!(
                            "sectionName {section:?} is port {named}, not {}; when both are set they must name the same port",
                            parent.port.unwrap_or_default()
                        ),
                    ),
                    Some(named) => port = Some(named),
                }
            } else if let Some(missing) =
                (parent.port).and_then(|p| service.missing_port(kind, &parent.name, p))
            {
                self.problems.push(format!("{field}.port"), missing);
            }
            let key = (service.hostname, port);
            if !out.contains(&key) {
                out.push(key);
            }
        }
        out
    }

    fn rule(&mut self, index: usize, rule: &HttpRouteRule) -> RouteRule {
        let path = format!("spec.rules[{index}]");
        let matches: Vec<RequestMatch> = if rule.matches.is_empty() {
            vec![prefix_match("/")]
        } else {
            (rule.matches.iter().enumerate())
                .map(|(j, m)| self.request_match(m, &format!("{path}.matches[{j}]")))
                .collect()
        };
        let filters = self.filters(&rule.filters, &format!("{path}.filters"), &matches, false);
        let backends = self.backends(rule, &path, &matches);
        let action = match filters.redirect {
            Some(redirect) => {
                if !rule.backend_refs.is_empty() {
                    self.problems.push(
                        format!("{path}.backendRefs"),
                        "a rule with a RequestRedirect filter answers with the redirect and cannot have backendRefs; remove one of them",
                    );
                }
                if filters.rewrite.is_some() {
                    self.problems.push(
                        format!("{path}.filters"),
                        "RequestRedirect and URLRewrite cannot be combined in one rule",
                    );
                }
                RuleAction::Redirect(redirect)
            }
            // The spec's HTTPRouteNoBackendRefs behaviour.
            None if rule.backend_refs.is_empty() => RuleAction::DirectResponse {
                status: 500,
                body: None,
            },
            None => RuleAction::Forward(backends),
        };
        if rule.session_persistence.is_some() {
            tracing::debug!(route = %self.source_name, rule = index, "sessionPersistence is not enforced");
        }
        let (timeout, per_try_timeout) = self.timeouts(rule, &path);
        RouteRule {
            name: rule.name.as_deref().map(Arc::from),
            source: RuleSource {
                kind: RouteKind::HttpRoute,
                namespace: self.source_namespace.clone(),
                name: self.source_name.clone(),
                rule: index,
            },
            matches,
            action,
            request_headers: filters.request_headers,
            response_headers: filters.response_headers,
            rewrite: filters.rewrite,
            timeout,
            per_try_timeout,
            retry: self.retry(rule, &path),
            fault: None,
            mirrors: filters.mirrors,
            cors: filters.cors,
        }
    }

    fn request_match(&mut self, m: &HttpRouteMatch, field: &str) -> RequestMatch {
        let path = match &m.path {
            None => prefix_match("/").path,
            Some(p) => {
                let value = p.value.as_deref().unwrap_or("/");
                let value_field = format!("{field}.path.value");
                let kind = p.kind.unwrap_or(PathMatchType::PathPrefix);
                if kind != PathMatchType::RegularExpression
                    && (!value.starts_with('/') || value.contains("//"))
                {
                    self.problems.push(
                        &*value_field,
                        format!("{value:?} is not a valid path; it must start with \"/\" and contain no \"//\""),
                    );
                }
                match kind {
                    PathMatchType::Exact => Some(PathMatch::Exact(Arc::from(value))),
                    PathMatchType::PathPrefix => Some(PathMatch::Segments(Arc::from(value))),
                    PathMatchType::RegularExpression => self
                        .problems
                        .check(full_match_regex(value, &value_field))
                        .map(PathMatch::Regex),
                }
            }
        };
        let mut headers: Vec<HeaderMatch> = Vec::new();
        for (k, h) in m.headers.iter().enumerate() {
            let entry = format!("{field}.headers[{k}]");
            let name = self
                .problems
                .check(header_name(&h.name, &format!("{entry}.name")));
            let value = self.value_match(h, &entry);
            if let (Some(name), Some(value)) = (name, value)
                && !headers.iter().any(|existing| existing.name == name)
            {
                headers.push(HeaderMatch {
                    name,
                    value,
                    invert: false,
                });
            }
        }
        let mut query: Vec<QueryMatch> = Vec::new();
        for (k, q) in m.query_params.iter().enumerate() {
            let value = self.value_match(q, &format!("{field}.queryParams[{k}]"));
            if let Some(value) = value
                && !query.iter().any(|existing| *existing.name == *q.name)
            {
                query.push(QueryMatch {
                    name: Arc::from(q.name.as_str()),
                    value,
                });
            }
        }
        let method = m.method.as_deref().and_then(|method| {
            if METHODS.contains(&method) {
                Some(ValueMatch::Exact(Arc::from(method)))
            } else {
                self.problems.push(
                    format!("{field}.method"),
                    format!(
                        "{method:?} is not a method; use one of {}",
                        METHODS.join(", ")
                    ),
                );
                None
            }
        });
        RequestMatch {
            path,
            method,
            headers,
            query,
            ..RequestMatch::default()
        }
    }

    fn value_match(&mut self, m: &HttpHeaderMatch, field: &str) -> Option<ValueMatch> {
        match m.kind.unwrap_or(ValueMatchType::Exact) {
            ValueMatchType::Exact => Some(ValueMatch::Exact(Arc::from(m.value.as_str()))),
            ValueMatchType::RegularExpression => self
                .problems
                .check(full_match_regex(&m.value, &format!("{field}.value")))
                .map(ValueMatch::Regex),
        }
    }

    fn backends(
        &mut self,
        rule: &HttpRouteRule,
        path: &str,
        matches: &[RequestMatch],
    ) -> Vec<WeightedBackend> {
        let mut out = Vec::new();
        for (j, b) in rule.backend_refs.iter().enumerate() {
            let field = format!("{path}.backendRefs[{j}]");
            if b.weight > MAX_WEIGHT {
                self.problems.push(
                    format!("{field}.weight"),
                    format!("weight {} is out of range; use 0 to {MAX_WEIGHT}", b.weight),
                );
            }
            let filters = self.filters(&b.filters, &format!("{field}.filters"), matches, true);
            let reference = BackendRef {
                group: b.group.as_deref(),
                kind: b.kind.as_deref(),
                name: &b.name,
                namespace: b.namespace.as_deref(),
                port: b.port,
            };
            if let Some(backend) = self.backend(&reference, &field) {
                out.push(WeightedBackend {
                    backend,
                    weight: b.weight,
                    request_headers: filters.request_headers,
                    response_headers: filters.response_headers,
                });
            }
        }
        if !rule.backend_refs.is_empty() && rule.backend_refs.iter().all(|b| b.weight == 0) {
            self.problems.push(
                format!("{path}.backendRefs"),
                "every backendRef has weight 0, so every request would get a 500; give at least one backendRef a positive weight",
            );
        }
        out
    }

    pub(super) fn backend(&mut self, r: &BackendRef<'_>, field: &str) -> Option<Backend> {
        let group = r.group.unwrap_or("");
        let kind = r.kind.unwrap_or("Service");
        let namespace = r.namespace.unwrap_or(self.namespace);
        let found = match (group, kind) {
            ("" | "core", "Service") | (ISTIO_GROUP, "ServiceEntry") => {
                self.services.service(namespace, r.name).ok_or_else(|| {
                    format!(
                        "no {kind} {:?} in namespace {namespace:?}; backendRefs must name an existing Service or ServiceEntry",
                        r.name
                    )
                })
            }
            (ISTIO_GROUP, "Hostname") => self.services.host(r.name, namespace).ok_or_else(|| {
                format!(
                    "no service with hostname {:?}; a Hostname backendRef must name a ServiceEntry host",
                    r.name
                )
            }),
            _ => {
                self.problems.push(
                    format!("{field}.kind"),
                    format!(
                        "unsupported backendRef kind {kind:?} in group {group:?}; use a Service (group \"\"), or a ServiceEntry or Hostname (group {ISTIO_GROUP})"
                    ),
                );
                return None;
            }
        };
        let service = match found {
            Ok(service) => service,
            Err(message) => {
                self.problems.push(format!("{field}.name"), message);
                return None;
            }
        };
        match r.port {
            None if kind == "Service" => self.problems.push(
                format!("{field}.port"),
                "port is required when the backend is a Service (the Service port, not the target port)",
            ),
            // Requests to a port the service lacks would answer 500 (as in Envoy); the route is
            // refused at load instead, as one naming a missing service is.
            Some(p) => {
                if let Some(missing) = service.missing_port(kind, r.name, p) {
                    self.problems.push(format!("{field}.port"), missing);
                }
            }
            None => {}
        }
        Some(Backend {
            service: service.hostname,
            port: r.port,
            subset: None,
        })
    }

    fn timeouts(
        &mut self,
        rule: &HttpRouteRule,
        path: &str,
    ) -> (Option<Duration>, Option<Duration>) {
        let Some(t) = &rule.timeouts else {
            return (None, None);
        };
        let mut read = |text: &Option<String>, name: &str| {
            let text = text.as_deref()?;
            self.problems
                .check(timeout(text, &format!("{path}.timeouts.{name}")))
                .flatten()
        };
        let request = read(&t.request, "request");
        let backend = read(&t.backend_request, "backendRequest");
        if let (Some(request), Some(backend)) = (request, backend)
            && backend > request
        {
            self.problems.push(
                format!("{path}.timeouts.backendRequest"),
                format!(
                    "backendRequest ({}) must not exceed request ({})",
                    t.backend_request.as_deref().unwrap_or_default(),
                    t.request.as_deref().unwrap_or_default()
                ),
            );
        }
        (request, backend)
    }

    /// Istio's translation: no stanza = mesh default; `attempts: 0` = none; otherwise retry
    /// connection errors and the listed codes, 2 attempts unless given.
    fn retry(&mut self, rule: &HttpRouteRule, path: &str) -> Option<RetryPolicy> {
        let Some(r) = &rule.retry else {
            return Some(RetryPolicy::mesh_default());
        };
        if r.attempts == Some(0) {
            return None;
        }
        let mut retry_on = RetryOn {
            conditions: MESH_DEFAULT_CONDITIONS.to_vec(),
            status_codes: Vec::new(),
        };
        for (k, &code) in r.codes.iter().enumerate() {
            if (400..=599).contains(&code) {
                retry_on.add_code(code);
            } else {
                self.problems.push(
                    format!("{path}.retry.codes[{k}]"),
                    format!("{code} cannot be retried; use a status code from 400 to 599"),
                );
            }
        }
        let backoff = (r.backoff.as_deref()).and_then(|b| {
            self.problems
                .check(duration(b, &format!("{path}.retry.backoff")))
        });
        Some(RetryPolicy {
            attempts: r.attempts.unwrap_or(2),
            retry_on,
            backoff,
        })
    }
}

/// A Gateway API `PathPrefix` match, the default for rules and matches without a path.
fn prefix_match(prefix: &str) -> RequestMatch {
    RequestMatch {
        path: Some(PathMatch::Segments(Arc::from(prefix))),
        ..RequestMatch::default()
    }
}

#[cfg(test)]
#[path = "lower_http_route_tests.rs"]
mod tests;
