//! Istio `VirtualService` → [`Attachment`]s of [`RouteRule`]s, as a waypoint applies them.
//!
//! A VirtualService applies to mesh traffic when `gateways` is absent or contains `mesh`; match
//! blocks restricted to other gateways are dropped, and `sourceLabels` is ignored as Istio does
//! in waypoints (istio#51565). Rules keep declaration order: the first match wins.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::lower_common::{
    HeaderEntry, Problems, base64, check_export_to, full_match_regex, header_modifier, header_name,
    percent, timeout,
};
use super::model::{
    Backend, HeaderMatch, HeaderModifier, PathMatch, QueryMatch, RequestMatch, RouteKind,
    RouteRule, RuleAction, RuleSource, ValueMatch, WeightedBackend,
};
use super::spec_istio::{
    Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRouteDestination, StringMatch,
    VirtualServiceRoute, VirtualServiceSpec,
};
use super::{Attachment, ServiceResolver};
use crate::FieldError;

/// The reserved gateway name for sidecars and waypoints.
const MESH: &str = "mesh";

/// Lowers one VirtualService (`namespace`/`name`) into one attachment per host.
///
/// `subsets(host, subset)` says whether any DestinationRule for `host` (FQDN) defines `subset`;
/// routing to a subset no rule defines can only fail (503), so it is reported here (whether
/// the rule a waypoint applies defines it, only the waypoint knows). A
/// VirtualService bound only to other gateways yields no attachment. The attachment port is set
/// when every match block names the same `port`; otherwise it is `None` and each match checks
/// its own port.
pub fn lower_virtual_service(
    namespace: &str,
    name: &str,
    spec: &VirtualServiceSpec,
    services: &dyn ServiceResolver,
    subsets: &dyn Fn(&str, &str) -> bool,
) -> Result<Vec<Attachment>, Vec<FieldError>> {
    if !applies_to_mesh(&spec.gateways) {
        tracing::debug!(
            namespace,
            name,
            "VirtualService is not bound to mesh; no waypoint routes"
        );
        return Ok(Vec::new());
    }
    let mut cx = Lowering {
        namespace,
        source_namespace: Arc::from(namespace),
        source_name: Arc::from(name),
        services,
        subsets,
        problems: Problems::default(),
    };
    let hosts = cx.hosts(&spec.hosts);
    let rules: Vec<RouteRule> = (spec.http.iter().enumerate())
        .filter_map(|(i, rule)| cx.rule(i, rule))
        .collect();
    if !spec.tcp.is_empty() || !spec.tls.is_empty() {
        tracing::debug!(
            namespace,
            name,
            "VirtualService tcp/tls routes are not applied by waypoints"
        );
    }
    check_export_to(
        &spec.export_to,
        "VirtualService",
        namespace,
        &mut cx.problems,
    );
    let export_to: Box<[Arc<str>]> = spec
        .export_to
        .iter()
        .map(|e| Arc::from(e.as_str()))
        .collect();
    let port = shared_port(&rules);
    let attachments = if rules.is_empty() {
        Vec::new()
    } else {
        let namespace = Arc::<str>::from(namespace);
        hosts
            .into_iter()
            .map(|service| Attachment {
                service,
                namespace: namespace.clone(),
                export_to: export_to.clone(),
                port,
                rules: rules.clone(),
            })
            .collect()
    };
    cx.problems.finish(attachments)
}

fn applies_to_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == MESH)
}

/// The port every match block names, if they all name the same one.
fn shared_port(rules: &[RouteRule]) -> Option<u16> {
    let mut ports = rules.iter().flat_map(|r| r.matches.iter().map(|m| m.port));
    let first = ports.next()??;
    ports.all(|p| p == Some(first)).then_some(first)
}

pub(super) struct Lowering<'a> {
    namespace: &'a str,
    source_namespace: Arc<str>,
    source_name: Arc<str>,
    services: &'a dyn ServiceResolver,
    subsets: &'a dyn Fn(&str, &str) -> bool,
    pub(super) problems: Problems,
}

impl Lowering<'_> {
    fn hosts(&mut self, hosts: &[String]) -> Vec<Arc<str>> {
        if hosts.is_empty() {
            self.problems.push(
                "spec.hosts",
                "at least one host is required; VirtualServices without hosts (delegates) are only used by ingress gateways",
            );
        }
        let mut out: Vec<Arc<str>> = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            if host.contains('*') {
                self.problems.push(
                    field,
                    format!("wildcard host {host:?} is not supported by the waypoint; list each service hostname"),
                );
                continue;
            }
            match self.services.host(host, self.namespace) {
                Some(service) if !out.contains(&service.hostname) => out.push(service.hostname),
                Some(_) => {}
                None => self.problems.push(field, self.unknown_host(host, "hosts")),
            }
        }
        out
    }

    fn unknown_host(&self, host: &str, what: &str) -> String {
        format!(
            "no Service or ServiceEntry has host {host:?} (short names resolve in namespace {:?}); {what} must name an existing service",
            self.namespace
        )
    }

    /// `None` when every match block is for other gateways, so the rule never applies here.
    fn rule(&mut self, index: usize, r: &VirtualServiceRoute) -> Option<RouteRule> {
        let path = format!("spec.http[{index}]");
        let matches: Vec<RequestMatch> = if r.matches.is_empty() {
            vec![RequestMatch::default()]
        } else {
            let kept: Vec<RequestMatch> = (r.matches.iter().enumerate())
                .filter(|(_, m)| applies_to_mesh(&m.gateways))
                .map(|(j, m)| self.request_match(m, &format!("{path}.match[{j}]")))
                .collect();
            if kept.is_empty() {
                tracing::debug!(vs = %self.source_name, rule = index, "rule matches only other gateways");
                return None;
            }
            kept
        };
        let action = self.action(r, &path);
        let (request_headers, response_headers) =
            self.headers(r.headers.as_ref(), &format!("{path}.headers"));
        let (retry, per_try_timeout) = self.retries(r.retries.as_ref(), &format!("{path}.retries"));
        Some(RouteRule {
            name: r.name.as_deref().map(Arc::from),
            source: RuleSource {
                kind: RouteKind::VirtualService,
                namespace: self.source_namespace.clone(),
                name: self.source_name.clone(),
                rule: index,
            },
            matches,
            action,
            request_headers,
            response_headers,
            rewrite: r.rewrite.as_ref().and_then(|rw| {
                if r.redirect.is_some() {
                    self.problems.push(
                        format!("{path}.rewrite"),
                        "rewrite cannot be combined with redirect; put the new path in redirect.uri",
                    );
                }
                self.rewrite(rw, &format!("{path}.rewrite"))
            }),
            timeout: (r.timeout.as_deref())
                .and_then(|t| self.problems.check(timeout(t, &format!("{path}.timeout"))))
                .flatten(),
            per_try_timeout,
            retry,
            fault: r.fault.as_ref().and_then(|f| self.fault(f, &format!("{path}.fault"))),
            mirrors: self.mirrors(r, &path),
            cors: (r.cors_policy.as_ref()).map(|c| self.cors(c, &format!("{path}.corsPolicy"))),
        })
    }

    fn request_match(&mut self, m: &HttpMatchRequest, field: &str) -> RequestMatch {
        if !m.source_labels.is_empty() {
            tracing::warn!(
                vs = %self.source_name,
                field,
                "sourceLabels is ignored by waypoints (as in Istio); this match applies to every client"
            );
        }
        let mut string = |s: &Option<StringMatch>, name: &str| {
            (s.as_ref()).and_then(|s| self.string_match(s, &format!("{field}.{name}")))
        };
        let path = string(&m.uri, "uri").and_then(|uri| match uri {
            ValueMatch::Exact(p) => Some(PathMatch::Exact(p)),
            ValueMatch::Prefix(p) => Some(PathMatch::Prefix(p)),
            ValueMatch::Regex(re) => Some(PathMatch::Regex(re)),
            ValueMatch::Present => None,
        });
        let method = string(&m.method, "method");
        let authority = string(&m.authority, "authority");
        let scheme = string(&m.scheme, "scheme");
        let mut headers = Vec::new();
        for (list, invert, entries) in [
            ("headers", false, &m.headers),
            ("withoutHeaders", true, &m.without_headers),
        ] {
            for (key, value) in entries {
                let key_field = format!("{field}.{list}.{key}");
                if key.starts_with(':') {
                    self.problems.push(
                        key_field,
                        "pseudo-headers cannot be matched here; use uri, method, authority or scheme",
                    );
                    continue;
                }
                let name = self.problems.check(header_name(key, &key_field));
                let value = self.string_match(value, &key_field);
                if let (Some(name), Some(value)) = (name, value) {
                    headers.push(HeaderMatch {
                        name,
                        value,
                        invert,
                    });
                }
            }
        }
        let query = (m.query_params.iter())
            .filter_map(|(key, value)| {
                let value = self.string_match(value, &format!("{field}.queryParams.{key}"))?;
                Some(QueryMatch {
                    name: Arc::from(key.as_str()),
                    value,
                })
            })
            .collect();
        RequestMatch {
            path,
            ignore_case: m.ignore_uri_case,
            method,
            headers,
            query,
            authority,
            scheme,
            port: m.port.and_then(|p| self.port(p, &format!("{field}.port"))),
            source_namespace: m.source_namespace.as_deref().map(Arc::from),
        }
    }

    /// `{}` means "present"; more than one of exact/prefix/regex is an error.
    pub(super) fn string_match(&mut self, s: &StringMatch, field: &str) -> Option<ValueMatch> {
        match (&s.exact, &s.prefix, &s.regex) {
            (None, None, None) => Some(ValueMatch::Present),
            (Some(exact), None, None) => Some(ValueMatch::Exact(Arc::from(exact.as_str()))),
            (None, Some(prefix), None) => Some(ValueMatch::Prefix(Arc::from(prefix.as_str()))),
            (None, None, Some(regex)) => self
                .problems
                .check(full_match_regex(regex, &format!("{field}.regex")))
                .map(ValueMatch::Regex),
            _ => {
                self.problems
                    .push(field, "set only one of exact, prefix and regex");
                None
            }
        }
    }

    pub(super) fn port(&mut self, port: u32, field: &str) -> Option<u16> {
        let valid = u16::try_from(port).ok().filter(|&p| p != 0);
        if valid.is_none() {
            self.problems
                .push(field, format!("{port} is not a port; use 1 to 65535"));
        }
        valid
    }

    fn action(&mut self, r: &VirtualServiceRoute, path: &str) -> RuleAction {
        let given: Vec<&str> = [
            ("route", !r.route.is_empty()),
            ("redirect", r.redirect.is_some()),
            ("directResponse", r.direct_response.is_some()),
            ("delegate", r.delegate.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if r.delegate.is_some() {
            self.problems.push(
                format!("{path}.delegate"),
                "delegate is only supported by ingress gateways; for mesh traffic use route, redirect or directResponse",
            );
        }
        match given.len() {
            0 => self
                .problems
                .push(path, "one of route, redirect or directResponse is required"),
            1 => {}
            _ => self.problems.push(
                path,
                format!("{} are mutually exclusive; keep one", given.join(", ")),
            ),
        }
        if let Some(redirect) = &r.redirect {
            RuleAction::Redirect(self.redirect(redirect, &format!("{path}.redirect")))
        } else if let Some(response) = &r.direct_response {
            self.direct_response(response, &format!("{path}.directResponse"))
        } else {
            RuleAction::Forward(self.destinations(&r.route, path))
        }
    }

    /// Weights are relative. A single destination gets everything whatever its weight; with
    /// several, at least one must be positive (an absent weight is 0).
    fn destinations(&mut self, route: &[HttpRouteDestination], path: &str) -> Vec<WeightedBackend> {
        let mut out = Vec::new();
        for (k, d) in route.iter().enumerate() {
            let field = format!("{path}.route[{k}]");
            let (request_headers, response_headers) =
                self.headers(d.headers.as_ref(), &format!("{field}.headers"));
            let weight = if route.len() == 1 {
                100
            } else {
                d.weight.unwrap_or(0)
            };
            if let Some(backend) = self.destination(&d.destination, &format!("{field}.destination"))
            {
                out.push(WeightedBackend {
                    backend,
                    weight,
                    request_headers,
                    response_headers,
                });
            }
        }
        if route.len() > 1 && route.iter().all(|d| d.weight.unwrap_or(0) == 0) {
            self.problems.push(
                format!("{path}.route"),
                "every destination has weight 0 (an absent weight is 0), so no request could be routed; give at least one destination a positive weight",
            );
        }
        out
    }

    pub(super) fn destination(&mut self, d: &Destination, field: &str) -> Option<Backend> {
        let port =
            (d.port.as_ref()).and_then(|p| self.port(p.number, &format!("{field}.port.number")));
        let Some(service) = self.services.host(&d.host, self.namespace) else {
            let message = self.unknown_host(&d.host, "destinations");
            self.problems.push(format!("{field}.host"), message);
            return None;
        };
        if let Some(subset) = &d.subset
            && !(self.subsets)(&service.hostname, subset)
        {
            self.problems.push(
                format!("{field}.subset"),
                format!(
                    "subset {subset:?} is not defined by any DestinationRule for {}",
                    service.hostname
                ),
            );
        }
        Some(Backend {
            service: service.hostname,
            port,
            subset: d.subset.as_deref().map(Arc::from),
        })
    }

    /// `(request, response)` modifiers.
    pub(super) fn headers(
        &mut self,
        headers: Option<&Headers>,
        field: &str,
    ) -> (HeaderModifier, HeaderModifier) {
        let Some(headers) = headers else {
            return Default::default();
        };
        let request = self.header_ops(headers.request.as_ref(), &format!("{field}.request"));
        let response = self.header_ops(headers.response.as_ref(), &format!("{field}.response"));
        (request, response)
    }

    fn header_ops(&mut self, ops: Option<&HeaderOperations>, field: &str) -> HeaderModifier {
        let Some(ops) = ops else {
            return HeaderModifier::default();
        };
        let remove = (ops.remove.iter().enumerate())
            .map(|(i, name)| (format!("{field}.remove[{i}]"), name.as_str()));
        header_modifier(
            map_entries(&ops.set, &format!("{field}.set")),
            map_entries(&ops.add, &format!("{field}.add")),
            remove,
            &mut self.problems,
        )
    }

    pub(super) fn decode_body(&mut self, text: &str, field: &str) -> Option<Vec<u8>> {
        self.problems.check(base64(text, field))
    }

    pub(super) fn percentage(&mut self, value: Option<f64>, field: &str, absent: f64) -> f64 {
        match value {
            Some(v) => self.problems.check(percent(v, field)).unwrap_or(0.0),
            None => absent,
        }
    }
}

fn map_entries<'a>(map: &'a BTreeMap<String, String>, field: &str) -> Vec<HeaderEntry<'a>> {
    map.iter()
        .map(|(name, value)| {
            let at = format!("{field}.{name}");
            HeaderEntry {
                name_field: at.clone(),
                value_field: at,
                name,
                value,
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "lower_virtual_service_tests.rs"]
mod tests;
