//! Applying path rewrites and building redirect locations.
//!
//! The two route kinds replace a matched prefix differently: the Gateway API works on whole
//! path segments (`/foo/` → `/` gives `/`, never `//`), while VirtualService copies Envoy's plain
//! text substitution (`rewrite.uri: /` on prefix `/foo` turns `/foo/bar` into `//bar`). Both are
//! kept, because users of each API rely on its behaviour.

use super::model::{PathMatch, PathRewrite, Redirect, RedirectPort, RequestMatch};
use super::select::{RequestView, strip_prefix};

impl PathRewrite {
    /// The new path and query for a request with `path_and_query` that matched `matched` (the
    /// match [`RouteTable::select`](super::RouteTable::select) reported). The query string is
    /// kept.
    pub fn apply(&self, path_and_query: &str, matched: &RequestMatch) -> String {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let mut out = match self {
            PathRewrite::Full(new) => new.to_string(),
            PathRewrite::Segments(new) => match &matched.path {
                Some(PathMatch::Segments(prefix)) => replace_segments(path, prefix, new, matched),
                // Lowering only pairs this rewrite with a single PathPrefix match.
                _ => path.to_owned(),
            },
            PathRewrite::Prefix(new) => match &matched.path {
                Some(PathMatch::Prefix(prefix) | PathMatch::Segments(prefix)) => {
                    let rest = strip_prefix(path, prefix, matched.ignore_case).unwrap_or(path);
                    format!("{new}{rest}")
                }
                Some(PathMatch::Exact(_) | PathMatch::Regex(_)) => new.to_string(),
                // No uri condition: Istio matches with prefix `/`, so that `/` is replaced.
                None => format!("{new}{}", path.strip_prefix('/').unwrap_or(path)),
            },
            PathRewrite::Regex { regex, replacement } => {
                regex.replace_all(path, &**replacement).into_owned()
            }
        };
        if let Some(query) = query {
            out.push('?');
            out.push_str(query);
        }
        out
    }
}

/// Gateway API `ReplacePrefixMatch`: segment-wise, never producing `//` or an empty path.
fn replace_segments(path: &str, prefix: &str, new: &str, matched: &RequestMatch) -> String {
    let prefix = prefix.trim_end_matches('/');
    // What follows the prefix is empty or starts with `/`, because the match is segment-wise.
    let rest = strip_prefix(path, prefix, matched.ignore_case).unwrap_or(path);
    let new = new.trim_end_matches('/');
    let joined = format!("{new}{rest}");
    if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
}

impl Redirect {
    /// The `Location` for `req`, which matched `matched`. The port is left out when it is the
    /// default for the resulting scheme, as the Gateway API asks.
    pub fn location(&self, req: &RequestView<'_>, matched: &RequestMatch) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(req.scheme);
        let host = self
            .host
            .as_deref()
            .unwrap_or_else(|| without_port(req.authority));
        let port = match self.port {
            RedirectPort::Explicit(port) => Some(port),
            RedirectPort::SchemeDefault => None,
            RedirectPort::Request => Some(req.port),
        }
        .filter(|&port| Some(port) != default_port(scheme));
        let path = match &self.path {
            Some(rewrite) => rewrite.apply(req.path, matched),
            None => req.path.to_owned(),
        };
        match port {
            Some(port) => format!("{scheme}://{host}:{port}{path}"),
            None => format!("{scheme}://{host}{path}"),
        }
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("http") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case("https") {
        Some(443)
    } else {
        None
    }
}

/// `host:port` → `host`, keeping IPv6 literals (`[::1]:80` → `[::1]`) intact.
fn without_port(authority: &str) -> &str {
    if let Some(end) = authority.find(']') {
        return &authority[..=end];
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::{HeaderMap, Method};

    use super::*;
    use crate::route::lower_common::full_match_regex;

    fn matched(path: PathMatch) -> RequestMatch {
        RequestMatch {
            path: Some(path),
            ..RequestMatch::default()
        }
    }

    #[test]
    fn gateway_prefix_replacement_is_segment_wise() {
        // (matched prefix, replacement, request, expected) — the Gateway API spec's table.
        let cases = [
            ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
            ("/foo", "/xyz", "/foo", "/xyz"),
            ("/foo", "/xyz", "/foo/", "/xyz/"),
            ("/foo/", "/xyz", "/foo/bar", "/xyz/bar"),
            ("/foo", "/xyz/", "/foo/bar", "/xyz/bar"),
            ("/foo", "", "/foo/bar", "/bar"),
            ("/foo", "", "/foo", "/"),
            ("/foo", "/", "/foo/", "/"),
            ("/foo", "/", "/foo/bar", "/bar"),
            ("/", "/xyz", "/foo", "/xyz/foo"),
            ("/foo", "/xyz", "/foo/bar?q=1", "/xyz/bar?q=1"),
        ];
        for (prefix, new, path, want) in cases {
            let m = matched(PathMatch::Segments(prefix.into()));
            let got = PathRewrite::Segments(new.into()).apply(path, &m);
            assert_eq!(got, want, "{prefix} -> {new:?} on {path}");
        }
    }

    #[test]
    fn virtual_service_rewrites_like_envoy() {
        let prefix = matched(PathMatch::Prefix("/foo".into()));
        let exact = matched(PathMatch::Exact("/foo".into()));
        let anything = RequestMatch::default();
        let cases = [
            (
                PathRewrite::Prefix("/xyz".into()),
                &prefix,
                "/foo/bar",
                "/xyz/bar",
            ),
            (
                PathRewrite::Prefix("/".into()),
                &prefix,
                "/foo/bar",
                "//bar",
            ),
            (PathRewrite::Prefix("/v2".into()), &exact, "/foo", "/v2"),
            (
                PathRewrite::Prefix("/v2/".into()),
                &anything,
                "/a?x=1",
                "/v2/a?x=1",
            ),
            (
                PathRewrite::Full("/new".into()),
                &prefix,
                "/foo/bar?x=1",
                "/new?x=1",
            ),
        ];
        for (rewrite, m, path, want) in cases {
            assert_eq!(rewrite.apply(path, m), want, "{rewrite:?} on {path}");
        }
        let regex = PathRewrite::Regex {
            regex: regex::Regex::new("^/service/([^/]+)(/.*)$").expect("valid"),
            replacement: Arc::from("${2}/instance/${1}"),
        };
        assert_eq!(
            regex.apply("/service/foo/v1/api?a=b", &anything),
            "/v1/api/instance/foo?a=b"
        );
    }

    #[test]
    fn ignore_case_prefix_keeps_the_rest_of_the_path() {
        let m = RequestMatch {
            path: Some(PathMatch::Prefix("/api".into())),
            ignore_case: true,
            ..RequestMatch::default()
        };
        assert_eq!(
            PathRewrite::Prefix("/v2".into()).apply("/API/x", &m),
            "/v2/x"
        );
    }

    #[test]
    fn redirect_locations() {
        let headers = HeaderMap::new();
        let req = |authority, port| RequestView {
            method: &Method::GET,
            scheme: "http",
            path: "/foo/bar?q=1",
            authority,
            headers: &headers,
            port,
            source_namespace: None,
        };
        let m = matched(PathMatch::Segments("/foo".into()));
        let redirect = |scheme: Option<&str>, host: Option<&str>, port, path| Redirect {
            scheme: scheme.map(Arc::from),
            host: host.map(Arc::from),
            path,
            port,
            status: 302,
        };
        let cases = [
            (
                redirect(None, Some("example.org"), RedirectPort::Request, None),
                req("svc:80", 80),
                "http://example.org/foo/bar?q=1",
            ),
            (
                redirect(None, None, RedirectPort::Request, None),
                req("svc:8080", 8080),
                "http://svc:8080/foo/bar?q=1",
            ),
            (
                redirect(Some("https"), None, RedirectPort::SchemeDefault, None),
                req("svc:8080", 8080),
                "https://svc/foo/bar?q=1",
            ),
            (
                redirect(Some("https"), None, RedirectPort::Explicit(8443), None),
                req("svc", 80),
                "https://svc:8443/foo/bar?q=1",
            ),
            (
                redirect(Some("https"), None, RedirectPort::Explicit(443), None),
                req("svc", 80),
                "https://svc/foo/bar?q=1",
            ),
            (
                redirect(
                    None,
                    None,
                    RedirectPort::Request,
                    Some(PathRewrite::Segments("/x".into())),
                ),
                req("[::1]:80", 80),
                "http://[::1]/x/bar?q=1",
            ),
            (
                redirect(
                    None,
                    None,
                    RedirectPort::Request,
                    Some(PathRewrite::Full("/y".into())),
                ),
                req("svc", 80),
                "http://svc/y?q=1",
            ),
        ];
        for (redirect, req, want) in cases {
            assert_eq!(redirect.location(&req, &m), want);
        }
        let regex = full_match_regex("/a.*", "f").expect("valid");
        let m = matched(PathMatch::Regex(regex));
        let r = redirect(
            None,
            None,
            RedirectPort::Request,
            Some(PathRewrite::Prefix("/b".into())),
        );
        assert_eq!(r.location(&req("svc", 80), &m), "http://svc/b?q=1");
    }
}
