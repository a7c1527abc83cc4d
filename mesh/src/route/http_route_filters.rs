//! HTTPRoute filters: header modifiers, redirects, rewrites, mirrors and CORS.
//!
//! Each filter's `type` names the one configuration field that must be set; anything else set
//! is reported rather than silently ignored. Filters inside `backendRefs[]` are limited to
//! header modifiers, as in Istio.

use std::sync::Arc;
use std::time::Duration;

use super::lower_common::{HeaderEntry, Problems, header_modifier, header_value};
use super::lower_http_route::{BackendRef, Filters, Lowering};
use super::model::{
    Cors, HeaderModifier, Mirror, PathMatch, PathRewrite, Redirect, RedirectPort, RequestMatch,
    Rewrite, UnmatchedPreflights, ValueMatch,
};
use super::spec_gateway::{
    HttpCorsFilter, HttpHeader, HttpHeaderFilter, HttpPathModifier, HttpPathModifierType,
    HttpRequestMirrorFilter, HttpRequestRedirectFilter, HttpRouteFilter, HttpRouteFilterType,
};

impl Lowering<'_> {
    pub(super) fn filters(
        &mut self,
        filters: &[HttpRouteFilter],
        base: &str,
        matches: &[RequestMatch],
        backend_level: bool,
    ) -> Filters {
        let mut out = Filters::default();
        let mut seen: Vec<HttpRouteFilterType> = Vec::new();
        for (k, filter) in filters.iter().enumerate() {
            let field = format!("{base}[{k}]");
            let kind = filter.kind;
            let want = kind.config_field();
            for other in filter.configured() {
                if other != kind {
                    self.problems.push(
                        format!("{field}.{}", other.config_field()),
                        format!(
                            "{} is only read when type is {}; this filter's type is {}",
                            other.config_field(),
                            other.name(),
                            kind.name()
                        ),
                    );
                }
            }
            let repeatable = matches!(
                kind,
                HttpRouteFilterType::RequestMirror | HttpRouteFilterType::ExtensionRef
            );
            if !repeatable && seen.contains(&kind) {
                self.problems.push(
                    format!("{field}.type"),
                    format!("{} may appear only once per rule", kind.name()),
                );
            }
            seen.push(kind);
            let header_filter = matches!(
                kind,
                HttpRouteFilterType::RequestHeaderModifier
                    | HttpRouteFilterType::ResponseHeaderModifier
            );
            if backend_level && !header_filter {
                self.problems.push(
                    format!("{field}.type"),
                    format!(
                        "{} is not supported in backendRefs[].filters; only RequestHeaderModifier and ResponseHeaderModifier are (as in Istio)",
                        kind.name()
                    ),
                );
                continue;
            }
            let config = format!("{field}.{want}");
            let missing = |problems: &mut Problems| {
                problems.push(
                    &*config,
                    format!("{want} must be set when type is {}", kind.name()),
                );
            };
            match kind {
                HttpRouteFilterType::RequestHeaderModifier => match &filter.request_header_modifier {
                    Some(h) => out.request_headers = self.headers(h, &config),
                    None => missing(&mut self.problems),
                },
                HttpRouteFilterType::ResponseHeaderModifier => match &filter.response_header_modifier {
                    Some(h) => out.response_headers = self.headers(h, &config),
                    None => missing(&mut self.problems),
                },
                HttpRouteFilterType::RequestRedirect => match &filter.request_redirect {
                    Some(r) => out.redirect = Some(self.redirect(r, &config, matches)),
                    None => missing(&mut self.problems),
                },
                HttpRouteFilterType::UrlRewrite => match &filter.url_rewrite {
                    Some(r) => {
                        out.rewrite = Some(Rewrite {
                            authority: r.hostname.as_deref().and_then(|h| {
                                self.problems.check(header_value(h, &format!("{config}.hostname")))
                            }),
                            path: r.path.as_ref().and_then(|p| {
                                self.path_modifier(p, &format!("{config}.path"), matches)
                            }),
                        });
                    }
                    None => missing(&mut self.problems),
                },
                HttpRouteFilterType::RequestMirror => match &filter.request_mirror {
                    Some(m) => out.mirrors.extend(self.mirror(m, &config)),
                    None => missing(&mut self.problems),
                },
                HttpRouteFilterType::Cors => match &filter.cors {
                    Some(c) => out.cors = Some(cors(c)),
                    None => missing(&mut self.problems),
                },
                HttpRouteFilterType::ExtensionRef => self.problems.push(
                    format!("{field}.type"),
                    "ExtensionRef filters are not supported (Istio rejects them too); requests reaching this rule could only fail, so remove the filter",
                ),
            }
        }
        out
    }

    fn headers(&mut self, h: &HttpHeaderFilter, field: &str) -> HeaderModifier {
        let remove = (h.remove.iter().enumerate())
            .map(|(i, name)| (format!("{field}.remove[{i}]"), name.as_str()));
        header_modifier(
            entries(field, "set", &h.set),
            entries(field, "add", &h.add),
            remove,
            &mut self.problems,
        )
    }

    fn redirect(
        &mut self,
        r: &HttpRequestRedirectFilter,
        field: &str,
        matches: &[RequestMatch],
    ) -> Redirect {
        if let Some(scheme) = r.scheme.as_deref()
            && scheme != "http"
            && scheme != "https"
        {
            self.problems.push(
                format!("{field}.scheme"),
                format!("{scheme:?} is not a redirect scheme; use http or https"),
            );
        }
        let status = r.status_code.unwrap_or(302);
        if ![301, 302, 303, 307, 308].contains(&status) {
            self.problems.push(
                format!("{field}.statusCode"),
                format!("{status} is not a redirect status; use 301, 302, 303, 307 or 308"),
            );
        }
        if r.port == Some(0) {
            self.problems
                .push(format!("{field}.port"), "0 is not a port; use 1 to 65535");
        }
        let port = match (r.port, &r.scheme) {
            (Some(port), _) => RedirectPort::Explicit(port),
            (None, Some(_)) => RedirectPort::SchemeDefault,
            (None, None) => RedirectPort::Request,
        };
        Redirect {
            scheme: r.scheme.as_deref().map(Arc::from),
            host: r.hostname.as_deref().map(Arc::from),
            path: (r.path.as_ref())
                .and_then(|p| self.path_modifier(p, &format!("{field}.path"), matches)),
            port,
            status,
        }
    }

    fn path_modifier(
        &mut self,
        m: &HttpPathModifier,
        field: &str,
        matches: &[RequestMatch],
    ) -> Option<PathRewrite> {
        let (kind, wanted, value, other, other_set) = match m.kind {
            HttpPathModifierType::ReplaceFullPath => (
                "ReplaceFullPath",
                "replaceFullPath",
                &m.replace_full_path,
                "replacePrefixMatch",
                m.replace_prefix_match.is_some(),
            ),
            HttpPathModifierType::ReplacePrefixMatch => (
                "ReplacePrefixMatch",
                "replacePrefixMatch",
                &m.replace_prefix_match,
                "replaceFullPath",
                m.replace_full_path.is_some(),
            ),
        };
        if other_set {
            self.problems.push(
                format!("{field}.{other}"),
                format!("{other} is not read when type is {kind}; remove it"),
            );
        }
        let Some(value) = value else {
            self.problems.push(
                format!("{field}.{wanted}"),
                format!("{wanted} must be set when type is {kind}"),
            );
            return None;
        };
        let value: Arc<str> = Arc::from(value.as_str());
        match m.kind {
            HttpPathModifierType::ReplaceFullPath => Some(PathRewrite::Full(value)),
            HttpPathModifierType::ReplacePrefixMatch => {
                if !matches!(
                    matches,
                    [RequestMatch {
                        path: Some(PathMatch::Segments(_)),
                        ..
                    }]
                ) {
                    self.problems.push(
                        format!("{field}.replacePrefixMatch"),
                        "ReplacePrefixMatch needs the rule to have exactly one match, with a PathPrefix path (the prefix it replaces)",
                    );
                }
                Some(PathRewrite::Segments(value))
            }
        }
    }

    fn mirror(&mut self, m: &HttpRequestMirrorFilter, field: &str) -> Option<Mirror> {
        let percent = match (m.percent, &m.fraction) {
            (Some(_), Some(_)) => {
                self.problems
                    .push(field, "set percent or fraction, not both");
                100.0
            }
            (Some(percent), None) => {
                if percent > 100 {
                    self.problems.push(
                        format!("{field}.percent"),
                        format!("{percent} is not a percentage; use 0 to 100"),
                    );
                }
                f64::from(percent)
            }
            (None, Some(fraction)) => {
                let denominator = fraction.denominator.unwrap_or(100);
                if denominator == 0 || fraction.numerator > denominator {
                    self.problems.push(
                        format!("{field}.fraction"),
                        "the fraction must satisfy 0 <= numerator <= denominator and denominator > 0",
                    );
                    0.0
                } else {
                    f64::from(fraction.numerator) * 100.0 / f64::from(denominator)
                }
            }
            (None, None) => 100.0,
        };
        let r = &m.backend_ref;
        let reference = BackendRef {
            group: r.group.as_deref(),
            kind: r.kind.as_deref(),
            name: &r.name,
            namespace: r.namespace.as_deref(),
            port: r.port,
        };
        let backend = self.backend(&reference, &format!("{field}.backendRef"))?;
        Some(Mirror { backend, percent })
    }
}

/// GEP-1767 CORS. Istio answers preflights from other origins itself (`IGNORE`) for HTTPRoute.
fn cors(c: &HttpCorsFilter) -> Cors {
    let words = |list: &[String]| list.iter().map(|s| Arc::from(s.as_str())).collect();
    Cors {
        allow_origins: c.allow_origins.iter().map(|o| origin_match(o)).collect(),
        allow_methods: words(&c.allow_methods),
        allow_headers: words(&c.allow_headers),
        expose_headers: words(&c.expose_headers),
        max_age: Some(Duration::from_secs(u64::from(c.max_age.unwrap_or(5)))),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        unmatched_preflights: UnmatchedPreflights::Ignore,
    }
}

/// `*` alone allows any origin; a `*` inside (`https://*.example.com`) stands for one or more
/// characters, so it covers any number of host labels.
fn origin_match(origin: &str) -> ValueMatch {
    if origin == "*" {
        return ValueMatch::Present;
    }
    if !origin.contains('*') {
        return ValueMatch::Exact(Arc::from(origin));
    }
    let parts: Vec<String> = origin.split('*').map(regex::escape).collect();
    match regex::Regex::new(&format!("^{}$", parts.join(".+"))) {
        Ok(re) => ValueMatch::Regex(re),
        // Escaped text joined by `.+` always compiles; fall back to literal comparison.
        Err(_) => ValueMatch::Exact(Arc::from(origin)),
    }
}

fn entries<'e>(field: &str, list: &str, headers: &'e [HttpHeader]) -> Vec<HeaderEntry<'e>> {
    (headers.iter().enumerate())
        .map(|(i, e)| HeaderEntry {
            name_field: format!("{field}.{list}[{i}].name"),
            value_field: format!("{field}.{list}[{i}].value"),
            name: &e.name,
            value: &e.value,
        })
        .collect()
}
