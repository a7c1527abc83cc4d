//! The internal route model: the one shape the waypoint executes, whichever YAML kind it came from.
//!
//! Everything here is resolved and validated: service names are FQDNs, regexes are compiled,
//! durations parsed, defaults filled in. A rule never needs its source resource again except to
//! name it in logs and metrics ([`RuleSource`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

use super::retry::RetryPolicy;

/// One routing rule: when any of `matches` matches, do `action` with the listed modifications.
#[derive(Debug, Clone)]
pub struct RouteRule {
    /// The rule's own name (`HTTPRoute rules[].name`, `VirtualService http[].name`), for logs.
    pub name: Option<Arc<str>>,
    /// Which resource and rule this came from, for logs and the `route` metric label.
    pub source: RuleSource,
    /// Alternatives (ORed). Lowering always fills at least one; an empty list never matches.
    pub matches: Vec<RequestMatch>,
    /// What to do with a matching request.
    pub action: RuleAction,
    /// Applied to the request before it is forwarded (after backend-level modifiers are chosen).
    pub request_headers: HeaderModifier,
    /// Applied to the response on its way back, including headers the backend set.
    pub response_headers: HeaderModifier,
    /// Host and path rewrite before forwarding.
    pub rewrite: Option<Rewrite>,
    /// Deadline for the whole client transaction, retries included; `None` = no deadline
    /// (both `0s` and an absent timeout mean that).
    pub timeout: Option<Duration>,
    /// Deadline for each attempt at a backend (`backendRequest`, `retries.perTryTimeout`).
    pub per_try_timeout: Option<Duration>,
    /// Retries; `None` = never retry. Absent retry configuration lowers to
    /// [`RetryPolicy::mesh_default`], as Istio does for both route kinds.
    pub retry: Option<RetryPolicy>,
    /// Injected delays and aborts (VirtualService only).
    pub fault: Option<Fault>,
    /// Fire-and-forget copies of the request.
    pub mirrors: Vec<Mirror>,
    /// CORS handling.
    pub cors: Option<Cors>,
}

/// Where a rule was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSource {
    /// The resource kind.
    pub kind: RouteKind,
    /// The resource namespace.
    pub namespace: Arc<str>,
    /// The resource name.
    pub name: Arc<str>,
    /// Index in `spec.rules` / `spec.http`.
    pub rule: usize,
}

impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = match self.kind {
            RouteKind::HttpRoute => "rules",
            RouteKind::VirtualService => "http",
        };
        write!(
            f,
            "{} {}/{} {list}[{}]",
            self.kind, self.namespace, self.name, self.rule
        )
    }
}

/// The resource kinds that produce route rules; they differ in precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// Gateway API `HTTPRoute`: most specific match wins.
    HttpRoute,
    /// Istio `VirtualService`: first match wins.
    VirtualService,
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteKind::HttpRoute => "HTTPRoute",
            RouteKind::VirtualService => "VirtualService",
        })
    }
}

/// Conditions on a request, all of which must hold (ANDed). `Default` matches every request.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    /// Condition on the path (without the query string).
    pub path: Option<PathMatch>,
    /// Compare exact and prefix paths ASCII-case-insensitively (`ignoreUriCase`).
    pub ignore_case: bool,
    /// Condition on the method. A pattern rather than a [`http::Method`] because
    /// VirtualService allows `prefix`/`regex` method matches.
    pub method: Option<ValueMatch>,
    /// Header conditions.
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions.
    pub query: Vec<QueryMatch>,
    /// Condition on `:authority` / `Host`, compared as sent (port included).
    pub authority: Option<ValueMatch>,
    /// Condition on the request scheme.
    pub scheme: Option<ValueMatch>,
    /// The Service port the request was addressed to.
    pub port: Option<u16>,
    /// The namespace of the client (VirtualService `sourceNamespace`).
    pub source_namespace: Option<Arc<str>>,
}

/// How a path is compared. Regexes match the whole path, as Envoy does.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Byte-exact equality.
    Exact(Arc<str>),
    /// Gateway API `PathPrefix`: whole `/`-separated segments; a trailing `/` in the value is
    /// ignored, so `/abc` matches `/abc`, `/abc/` and `/abc/d` but not `/abcd`.
    Segments(Arc<str>),
    /// VirtualService `prefix`: plain string prefix (`/api` matches `/apiary`).
    Prefix(Arc<str>),
    /// Full-match regular expression.
    Regex(Regex),
}

/// How a header, query, authority, scheme or origin value is compared.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    /// Equality.
    Exact(Arc<str>),
    /// String prefix.
    Prefix(Arc<str>),
    /// Full-match regular expression (compiled anchored).
    Regex(Regex),
    /// Any value, as long as it is present.
    Present,
}

/// A condition on one header.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Header name (case-insensitive by construction).
    pub name: HeaderName,
    /// The condition on its value.
    pub value: ValueMatch,
    /// Match when the condition fails or the header is absent (`withoutHeaders`).
    pub invert: bool,
}

/// A condition on one query parameter (the first occurrence of the name counts).
#[derive(Debug, Clone)]
pub struct QueryMatch {
    /// Parameter name, compared exactly after percent-decoding.
    pub name: Arc<str>,
    /// The condition on its percent-decoded value.
    pub value: ValueMatch,
}

/// What a matching rule does.
#[derive(Debug, Clone)]
pub enum RuleAction {
    /// Forward to one of the backends, chosen by weight ([`pick`](super::pick)).
    Forward(Vec<WeightedBackend>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer directly. An HTTPRoute rule without backends lowers to status 500, as the spec says.
    DirectResponse {
        /// HTTP status.
        status: u16,
        /// Body, if any.
        body: Option<Arc<[u8]>>,
    },
}

/// A destination: a service, possibly narrowed to a port and a subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// FQDN hostname, e.g. `reviews.default.svc.cluster.local`.
    pub service: Arc<str>,
    /// Service port; `None` = the port the request arrived on.
    pub port: Option<u16>,
    /// DestinationRule subset (VirtualService only).
    pub subset: Option<Arc<str>>,
}

/// A backend and its share of traffic.
#[derive(Debug, Clone)]
pub struct WeightedBackend {
    /// Where to send.
    pub backend: Backend,
    /// Relative weight; share = weight / sum of weights. Zero is never chosen.
    pub weight: u32,
    /// Request header changes applied only when this backend is chosen.
    pub request_headers: HeaderModifier,
    /// Response header changes applied only when this backend was chosen.
    pub response_headers: HeaderModifier,
}

/// How to build a redirect's `Location`.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// New scheme; `None` keeps the request's.
    pub scheme: Option<Arc<str>>,
    /// New host (no port); `None` keeps the request's host.
    pub host: Option<Arc<str>>,
    /// New path; `None` keeps the request's.
    pub path: Option<PathRewrite>,
    /// Which port the `Location` names.
    pub port: RedirectPort,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// The port of a redirect `Location`; omitted when it is the scheme's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectPort {
    /// This port.
    Explicit(u16),
    /// The well-known port of the resulting scheme (http 80, https 443).
    SchemeDefault,
    /// The port the request was addressed to (the Service port in the mesh).
    Request,
}

/// Changes to the request before it is forwarded.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// New `Host`/`:authority`.
    pub authority: Option<HeaderValue>,
    /// New path; the query string is kept.
    pub path: Option<PathRewrite>,
}

/// How a path is replaced (for rewrites and redirects).
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// Replace the whole path.
    Full(Arc<str>),
    /// Gateway API `ReplacePrefixMatch`: swap the matched [`PathMatch::Segments`] prefix,
    /// segment-wise (`/foo/bar` with `/foo`→`/xyz` is `/xyz/bar`; with `/foo`→`/` is `/bar`).
    Segments(Arc<str>),
    /// VirtualService `rewrite.uri`: swap the matched text as Envoy's `prefix_rewrite` does;
    /// an exact or regex path match replaces the whole path.
    Prefix(Arc<str>),
    /// VirtualService `uriRegexRewrite`: replace every match; `$1` refers to groups.
    Regex {
        /// Unanchored pattern.
        regex: Regex,
        /// Replacement in `regex` crate syntax (`\1` was translated to `${1}`).
        replacement: Arc<str>,
    },
}

/// Header changes: remove, then set, then add.
#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    /// Replace any existing values.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append a value, keeping existing ones.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Remove every value.
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// Whether applying it would change nothing, so callers can skip the work.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the changes. Removal runs first so that `remove: [x]` with `add: [x]` (which
    /// Istio allows) leaves the added value, as Envoy does.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Fire-and-forget copy of a request; the response is discarded.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// Where the copy goes.
    pub backend: Backend,
    /// Share of requests mirrored, 0–100.
    pub percent: f64,
}

/// Injected faults; delay and abort are drawn independently.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    /// Delay before forwarding.
    pub delay: Option<FaultDelay>,
    /// Answer with an error instead of forwarding.
    pub abort: Option<FaultAbort>,
}

/// A delay injected into a share of requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultDelay {
    /// How long.
    pub delay: Duration,
    /// Share of requests delayed, 0–100 (absent in YAML = 0, as Istio documents).
    pub percent: f64,
}

/// An error answered for a share of requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultAbort {
    /// HTTP status to answer.
    pub status: u16,
    /// Share of requests aborted, 0–100 (absent in YAML = 0).
    pub percent: f64,
}

/// CORS policy: preflights from allowed origins are answered by the proxy.
#[derive(Debug, Clone)]
pub struct Cors {
    /// Allowed origins; a matching `Origin` is echoed back.
    pub allow_origins: Vec<ValueMatch>,
    /// `Access-Control-Allow-Methods` values (`*` allowed).
    pub allow_methods: Vec<Arc<str>>,
    /// `Access-Control-Allow-Headers` values.
    pub allow_headers: Vec<Arc<str>>,
    /// `Access-Control-Expose-Headers` values.
    pub expose_headers: Vec<Arc<str>>,
    /// `Access-Control-Max-Age`; HTTPRoute defaults to 5 s, VirtualService to none.
    pub max_age: Option<Duration>,
    /// Send `Access-Control-Allow-Credentials: true`.
    pub allow_credentials: bool,
    /// What to do with a preflight whose origin is not allowed.
    pub unmatched_preflights: UnmatchedPreflights,
}

impl Cors {
    /// Whether `origin` is allowed, i.e. whether CORS response headers are sent for it.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|m| m.matches(origin))
    }
}

/// Handling of preflight requests from origins that are not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmatchedPreflights {
    /// Pass them to the application (VirtualService default).
    Forward,
    /// Answer them without CORS headers (Istio's choice for HTTPRoute).
    Ignore,
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName, HeaderValue};

    use super::HeaderModifier;

    #[test]
    fn header_modifier_removes_then_sets_then_adds() {
        let name = |n: &'static str| HeaderName::from_static(n);
        let value = |v: &'static str| HeaderValue::from_static(v);
        let mut headers = HeaderMap::new();
        for (n, v) in [
            ("x-set", "old"),
            ("x-add", "backend"),
            ("x-remove", "y"),
            ("x-both", "z"),
        ] {
            headers.append(name(n), value(v));
        }
        let modifier = HeaderModifier {
            set: vec![(name("x-set"), value("new"))],
            add: vec![
                (name("x-add"), value("added")),
                (name("x-both"), value("fresh")),
            ],
            remove: vec![name("x-remove"), name("x-both")],
        };
        assert!(!modifier.is_empty());
        modifier.apply(&mut headers);
        let all = |n: &'static str| -> Vec<&str> {
            (headers.get_all(n).iter())
                .map(|v| v.to_str().unwrap_or("?"))
                .collect()
        };
        assert_eq!(all("x-set"), ["new"]);
        assert_eq!(all("x-add"), ["backend", "added"]);
        assert!(all("x-remove").is_empty());
        assert_eq!(all("x-both"), ["fresh"]);
        assert!(HeaderModifier::default().is_empty());
    }
}
