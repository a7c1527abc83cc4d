//! Choosing the rule for a request, and the backend within a rule.
//!
//! This runs once per request, so it does not allocate: the path and query string are sliced in
//! place, and a query parameter is percent-decoded into a new string only when it contains `%`.
//! The one other allocation is for a header sent several times, whose values Envoy compares
//! joined with `,`.

use std::borrow::Cow;

use http::{HeaderMap, Method};

use super::model::{
    HeaderMatch, PathMatch, QueryMatch, RequestMatch, RouteRule, ValueMatch, WeightedBackend,
};

/// The parts of a request that routing looks at, borrowed from whatever the proxy parsed.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Request method.
    pub method: &'a Method,
    /// `http` or `https` as the client used it (mesh traffic inside HBONE is `http`).
    pub scheme: &'a str,
    /// Path, possibly followed by `?query`.
    pub path: &'a str,
    /// `:authority` or `Host`, as sent.
    pub authority: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The Service port the client addressed.
    pub port: u16,
    /// The namespace compared with VirtualService `sourceNamespace`. Istio waypoints compare it
    /// with the waypoint's own namespace; pass that for parity, or the client's namespace.
    pub source_namespace: Option<&'a str>,
}

/// How rules from several matches compete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precedence {
    /// Gateway API: the most specific match wins (exact path, longest prefix, method, most
    /// headers, most query parameters); ties go to the earlier rule in input order.
    GatewayApi,
    /// VirtualService: the first matching rule in input order wins.
    FirstMatch,
}

/// The rules for one service port, ordered for selection once when the snapshot is built.
#[derive(Debug, Clone)]
pub struct RouteTable {
    rules: Vec<RouteRule>,
    /// `(rule, match)` pairs in the order they are tried. Precedence is per match, not per rule:
    /// one rule can hold both the most and the least specific match.
    order: Vec<(usize, usize)>,
}

impl RouteTable {
    /// Orders `rules` for selection. For [`Precedence::GatewayApi`], pass rules route by route,
    /// oldest route first (then by `namespace/name`), each route's rules in declaration order:
    /// this input order breaks ties, as the Gateway API requires.
    pub fn new(rules: Vec<RouteRule>, precedence: Precedence) -> Self {
        Self::in_tiers(rules, &[], precedence)
    }

    /// Like [`RouteTable::new`], with rule `r` in tier `tiers[r]` (0 when missing): every match
    /// of a lower tier is tried before any of a higher one, whatever their specificity, as
    /// istiod puts the routes private to a waypoint's namespace before the others.
    pub fn in_tiers(rules: Vec<RouteRule>, tiers: &[u8], precedence: Precedence) -> Self {
        debug_assert!(tiers.is_empty() || tiers.len() == rules.len());
        let tier = |r: usize| tiers.get(r).copied().unwrap_or(0);
        let mut order: Vec<(usize, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(r, rule)| (0..rule.matches.len()).map(move |m| (r, m)))
            .collect();
        // Stable sorts: equal keys keep input order.
        match precedence {
            Precedence::GatewayApi => order.sort_by_cached_key(|&(r, m)| {
                (
                    tier(r),
                    std::cmp::Reverse(specificity(&rules[r].matches[m])),
                )
            }),
            Precedence::FirstMatch => order.sort_by_key(|&(r, _)| tier(r)),
        }
        Self { rules, order }
    }

    /// The rules, in input order.
    pub fn rules(&self) -> &[RouteRule] {
        &self.rules
    }

    /// Whether there are no rules (the caller then forwards to the service as if unrouted).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The winning rule and the index of its match that matched; `None` means a 404 when
    /// routes are attached.
    pub fn select(&self, req: &RequestView<'_>) -> Option<(&RouteRule, usize)> {
        self.select_index(req).map(|(r, m)| (&self.rules[r], m))
    }

    /// Like [`RouteTable::select`], but as `(rule index, match index)`, which a proxy can keep
    /// across the phases of a request alongside the snapshot that owns the table.
    pub fn select_index(&self, req: &RequestView<'_>) -> Option<(usize, usize)> {
        self.order
            .iter()
            .copied()
            .find(|&(r, m)| self.rules[r].matches[m].matches(req))
    }
}

/// Gateway API specificity of one match; larger is more specific.
fn specificity(m: &RequestMatch) -> (u8, usize, bool, usize, usize) {
    let (rank, len) = match &m.path {
        Some(PathMatch::Exact(p)) => (3, p.len()),
        // A trailing `/` does not make a PathPrefix more specific; Istio trims it too.
        Some(PathMatch::Segments(p)) => (2, p.trim_end_matches('/').len().max(1)),
        Some(PathMatch::Prefix(p)) => (2, p.len()),
        Some(PathMatch::Regex(re)) => (1, re.as_str().len()),
        None => (0, 0),
    };
    (
        rank,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query.len(),
    )
}

/// Chooses a backend with probability weight / total weight; zero weights are never chosen.
/// `None` when every weight is zero (the caller answers 500).
pub fn pick<'a, R: rand::Rng + ?Sized>(
    backends: &'a [WeightedBackend],
    rng: &mut R,
) -> Option<&'a WeightedBackend> {
    if let [only] = backends {
        return (only.weight > 0).then_some(only);
    }
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = rng.random_range(0..total);
    for backend in backends {
        let weight = u64::from(backend.weight);
        if point < weight {
            return Some(backend);
        }
        point -= weight;
    }
    None
}

impl RequestMatch {
    /// Whether every condition holds for `req`.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let (path, query) = match req.path.split_once('?') {
            Some((path, query)) => (path, query),
            None => (req.path, ""),
        };
        self.port.is_none_or(|p| p == req.port)
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.matches(req.method.as_str()))
            && self
                .path
                .as_ref()
                .is_none_or(|p| p.matches(path, self.ignore_case))
            && self
                .authority
                .as_ref()
                .is_none_or(|a| a.matches(req.authority))
            && self.scheme.as_ref().is_none_or(|s| s.matches(req.scheme))
            && self
                .source_namespace
                .as_deref()
                .is_none_or(|ns| req.source_namespace == Some(ns))
            && self.headers.iter().all(|h| h.matches(req.headers))
            && self.query.iter().all(|q| q.matches(query))
    }
}

impl PathMatch {
    /// Whether `path` (without query string) satisfies the condition.
    pub fn matches(&self, path: &str, ignore_case: bool) -> bool {
        match self {
            PathMatch::Exact(want) if ignore_case => path.eq_ignore_ascii_case(want),
            PathMatch::Exact(want) => path == &**want,
            PathMatch::Segments(prefix) => {
                strip_prefix(path, prefix.trim_end_matches('/'), ignore_case)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Prefix(prefix) => strip_prefix(path, prefix, ignore_case).is_some(),
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

/// `s` without `prefix`, comparing ASCII letters case-insensitively when asked.
pub(super) fn strip_prefix<'a>(s: &'a str, prefix: &str, ignore_case: bool) -> Option<&'a str> {
    if !ignore_case {
        return s.strip_prefix(prefix);
    }
    let head = s.as_bytes().get(..prefix.len())?;
    // Equal bytes outside ASCII letters keep `prefix.len()` on a character boundary of `s`.
    head.eq_ignore_ascii_case(prefix.as_bytes())
        .then(|| s.get(prefix.len()..))
        .flatten()
}

impl ValueMatch {
    /// Whether `value` satisfies the condition.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(want) => value == &**want,
            ValueMatch::Prefix(prefix) => value.starts_with(&**prefix),
            ValueMatch::Regex(re) => re.is_match(value),
            ValueMatch::Present => true,
        }
    }

    fn matches_bytes(&self, value: &[u8]) -> bool {
        match std::str::from_utf8(value) {
            Ok(text) => self.matches(text),
            // Patterns are text; a non-UTF-8 value can only satisfy "present".
            Err(_) => matches!(self, ValueMatch::Present),
        }
    }
}

impl HeaderMatch {
    /// Whether the headers satisfy the condition (absence fails it, and satisfies `invert`).
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let found = match (values.next(), values.next()) {
            (None, _) => false,
            (Some(one), None) => self.value.matches_bytes(one.as_bytes()),
            (Some(_), Some(_)) => {
                let all: Vec<&[u8]> = headers
                    .get_all(&self.name)
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect();
                self.value.matches_bytes(&all.join(&b","[..]))
            }
        };
        found != self.invert
    }
}

impl QueryMatch {
    /// Whether the query string (without `?`) satisfies the condition; the first occurrence
    /// of the name counts.
    pub fn matches(&self, query: &str) -> bool {
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .find_map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(name) == *self.name).then(|| percent_decode(value))
            })
            .is_some_and(|value| self.value.matches(&value))
    }
}

/// Decodes `%XX` escapes; borrows when there are none. Invalid escapes are kept as written,
/// and invalid UTF-8 is replaced, so a malformed query can only fail to match.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
#[path = "select_tests.rs"]
mod tests;
