//! Value matchers: Istio's string-match syntax, URI-template paths, service accounts, IPs, ports.
//!
//! Parsing happens once at compile time and reports what is wrong with a value; matching never
//! allocates, because it runs for every connection (ztunnel) and every request (waypoint).

use std::net::IpAddr;

use ipnet::IpNet;

/// `abc` exact, `abc*` prefix, `*abc` suffix, `*` presence (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

impl StrMatch {
    /// Istio's reading of a value: a lone `*` is presence, a leading `*` a suffix match, a
    /// trailing `*` a prefix match; anything else (including an inner `*`) is literal.
    pub(super) fn parse(value: &str) -> Self {
        if value == "*" {
            StrMatch::Presence
        } else if let Some(suffix) = value.strip_prefix('*') {
            StrMatch::Suffix(suffix.into())
        } else if let Some(prefix) = value.strip_suffix('*') {
            StrMatch::Prefix(prefix.into())
        } else {
            StrMatch::Exact(value.into())
        }
    }

    /// The same match, lowercased, for attributes compared case-insensitively (hosts).
    pub(super) fn lowercase(self) -> Self {
        match self {
            StrMatch::Exact(s) => StrMatch::Exact(s.to_ascii_lowercase().into()),
            StrMatch::Prefix(s) => StrMatch::Prefix(s.to_ascii_lowercase().into()),
            StrMatch::Suffix(s) => StrMatch::Suffix(s.to_ascii_lowercase().into()),
            StrMatch::Presence => StrMatch::Presence,
        }
    }

    /// Case-sensitive match against raw bytes (header values need not be UTF-8).
    pub(super) fn matches(&self, value: &[u8]) -> bool {
        match self {
            StrMatch::Exact(s) => value == s.as_bytes(),
            StrMatch::Prefix(s) => value.starts_with(s.as_bytes()),
            StrMatch::Suffix(s) => value.ends_with(s.as_bytes()),
            StrMatch::Presence => !value.is_empty(),
        }
    }

    /// ASCII case-insensitive match; the pattern was lowercased by [`StrMatch::lowercase`].
    pub(super) fn matches_ignore_case(&self, value: &str) -> bool {
        let value = value.as_bytes();
        match self {
            StrMatch::Exact(s) => value.eq_ignore_ascii_case(s.as_bytes()),
            StrMatch::Prefix(s) => value
                .get(..s.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(s.as_bytes())),
            StrMatch::Suffix(s) => value
                .len()
                .checked_sub(s.len())
                .is_some_and(|start| value[start..].eq_ignore_ascii_case(s.as_bytes())),
            StrMatch::Presence => !value.is_empty(),
        }
    }

    /// Matches the concatenation of `parts` without building it, so a principal
    /// `td/ns/x/sa/y` can be matched straight from the parts of an identity.
    pub(super) fn matches_parts(&self, parts: &[&str]) -> bool {
        match self {
            StrMatch::Exact(s) => {
                parts.iter().map(|p| p.len()).sum::<usize>() == s.len()
                    && starts_with(parts, s.as_bytes())
            }
            StrMatch::Prefix(s) => starts_with(parts, s.as_bytes()),
            StrMatch::Suffix(s) => ends_with(parts, s.as_bytes()),
            StrMatch::Presence => parts.iter().any(|p| !p.is_empty()),
        }
    }
}

/// Whether the virtual concatenation of `parts` starts with `pattern`.
fn starts_with(parts: &[&str], mut pattern: &[u8]) -> bool {
    for part in parts {
        let part = part.as_bytes();
        if pattern.len() <= part.len() {
            return part.starts_with(pattern);
        }
        let Some(rest) = pattern.strip_prefix(part) else {
            return false;
        };
        pattern = rest;
    }
    pattern.is_empty()
}

/// Whether the virtual concatenation of `parts` ends with `pattern`.
fn ends_with(parts: &[&str], mut pattern: &[u8]) -> bool {
    for part in parts.iter().rev() {
        let part = part.as_bytes();
        if pattern.len() <= part.len() {
            return part.ends_with(pattern);
        }
        let Some(rest) = pattern.strip_suffix(part) else {
            return false;
        };
        pattern = rest;
    }
    pattern.is_empty()
}

/// A path pattern: Istio string-match syntax, or an Envoy URI template with `{*}` (exactly one
/// non-empty segment) and `{**}` (anything, including `/` and nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PathMatch {
    Str(StrMatch),
    Template(Box<[Piece]>),
}

/// One piece of a URI template; adjacent literal text (slashes included) is merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    Literal(Box<str>),
    OneSegment,
    Rest,
}

/// Characters a literal template segment may hold: RFC 3986 `pchar`, as Istio validates.
fn is_pchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@=".contains(c)
}

impl PathMatch {
    /// Parses a `paths` value; templates are validated as Istio does, so a policy Istio rejects
    /// is rejected here too rather than matching something unexpected.
    pub(super) fn parse(value: &str) -> Result<Self, String> {
        if !value.contains(['{', '}']) {
            return Ok(PathMatch::Str(StrMatch::parse(value)));
        }
        let mut pieces: Vec<Piece> = Vec::new();
        let mut after_rest = false;
        for (i, segment) in value.split('/').enumerate() {
            let piece = match segment {
                "{*}" | "{**}" if after_rest => {
                    return Err(format!(
                        "{value:?}: {{**}} must be the last template operator in a path"
                    ));
                }
                "{*}" => Piece::OneSegment,
                "{**}" => {
                    after_rest = true;
                    Piece::Rest
                }
                literal if literal.chars().all(is_pchar) => Piece::Literal(literal.into()),
                _ => {
                    return Err(format!(
                        "{value:?}: a path template may only hold {{*}} or {{**}} as whole \
                         segments and plain path characters elsewhere (no '*', '{{' or '}}')"
                    ));
                }
            };
            if i > 0 {
                push_literal(&mut pieces, "/");
            }
            match piece {
                Piece::Literal(text) => push_literal(&mut pieces, &text),
                operator => pieces.push(operator),
            }
        }
        Ok(PathMatch::Template(pieces.into()))
    }

    /// Matches a path that has already lost its query string.
    pub(super) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Str(m) => m.matches(path.as_bytes()),
            PathMatch::Template(pieces) => template_matches(pieces, path),
        }
    }
}

fn push_literal(pieces: &mut Vec<Piece>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(Piece::Literal(last)) = pieces.last_mut() {
        *last = format!("{last}{text}").into();
    } else {
        pieces.push(Piece::Literal(text.into()));
    }
}

/// Matching is deterministic: `{*}` stops at the next `/`, and `{**}` is followed by at most one
/// literal (validation forbids further operators), which must then be a suffix.
fn template_matches(pieces: &[Piece], path: &str) -> bool {
    let mut rest = path;
    for (i, piece) in pieces.iter().enumerate() {
        match piece {
            Piece::Literal(text) => match rest.strip_prefix(&**text) {
                Some(r) => rest = r,
                None => return false,
            },
            Piece::OneSegment => {
                let end = rest.find('/').unwrap_or(rest.len());
                if end == 0 {
                    return false;
                }
                rest = &rest[end..];
            }
            Piece::Rest => {
                return match pieces.get(i + 1) {
                    Some(Piece::Literal(tail)) => rest.ends_with(&**tail),
                    _ => true,
                };
            }
        }
    }
    rest.is_empty()
}

/// `serviceAccounts` entry: `<ns>/<sa>`, matched exactly against the peer identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServiceAccount {
    pub(super) namespace: Box<str>,
    pub(super) name: Box<str>,
}

impl ServiceAccount {
    /// Parses `ns/sa`, or a bare `sa` meaning the policy's own namespace (as istiod does).
    pub(super) fn parse(value: &str, policy_namespace: &str) -> Result<Self, String> {
        let (namespace, name) = value.split_once('/').unwrap_or((policy_namespace, value));
        if value.contains('*') || namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(format!(
                "{value:?} is not a service account; write <namespace>/<service-account> \
                 (or <service-account> for this namespace), without wildcards"
            ));
        }
        Ok(ServiceAccount {
            namespace: namespace.into(),
            name: name.into(),
        })
    }
}

/// Parses an IP or CIDR block; a plain address is a /32 (IPv4) or /128 (IPv6).
pub(super) fn parse_ip_block(value: &str) -> Result<IpNet, String> {
    let parsed = if value.contains('/') {
        value.parse::<IpNet>().ok().map(|net| net.trunc())
    } else {
        value.parse::<IpAddr>().ok().map(IpNet::from)
    };
    parsed.ok_or_else(|| format!("{value:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8)"))
}

/// Parses a port written as a numeric string.
pub(super) fn parse_port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("{value:?} is not a port number (1-65535)")),
    }
}

/// The values of one attribute a check accepts (`any`, one must match unless empty) and
/// rejects (`none`, none may match): a field and its `not*` twin, or `values` and `notValues`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Set<T> {
    pub(super) any: Box<[T]>,
    pub(super) none: Box<[T]>,
}

impl<T> Set<T> {
    /// Evaluates `matches` against the accepted and rejected values. An attribute the request
    /// lacks is a `matches` that is always false: the positive side fails, the negative passes,
    /// which is how `notPrincipals: ["*"]` selects plaintext peers.
    pub(super) fn eval(&self, mut matches: impl FnMut(&T) -> bool) -> bool {
        (self.any.is_empty() || self.any.iter().any(&mut matches)) && !self.none.iter().any(matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_match_forms() {
        let cases: &[(&str, &str, bool)] = &[
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("abc*", "abcd", true),
            ("abc*", "xabc", false),
            ("*abc", "xabc", true),
            ("*abc", "abcx", false),
            ("*", "x", true),
            ("*", "", false),
            ("a*c", "abc", false),
            ("a*c", "a*c", true),
        ];
        for (pattern, value, want) in cases {
            let got = StrMatch::parse(pattern).matches(value.as_bytes());
            assert_eq!(got, *want, "{pattern:?} vs {value:?}");
        }
    }

    #[test]
    fn parts_match_like_the_concatenation() {
        let parts = ["cluster.local", "/ns/", "default", "/sa/", "client"];
        let whole = parts.concat();
        let patterns = [
            "cluster.local/ns/default/sa/client",
            "cluster.local/ns/default/sa/clien",
            "cluster.local/ns/default/sa/client2",
            "cluster.local/ns/def*",
            "cluster.local/ns/default/sa/client*",
            "cluster.local/ns/default/sa/client/x*",
            "*/ns/default/sa/client",
            "*t/sa/client",
            "*xcluster.local/ns/default/sa/client",
            "*",
            "c*",
            "x*",
        ];
        for pattern in patterns {
            let m = StrMatch::parse(pattern);
            assert_eq!(
                m.matches_parts(&parts),
                m.matches(whole.as_bytes()),
                "{pattern:?}"
            );
        }
    }

    #[test]
    fn host_match_ignores_case() {
        let m = StrMatch::parse("*.Example.com").lowercase();
        assert!(m.matches_ignore_case("API.EXAMPLE.COM"));
        assert!(!m.matches_ignore_case("example.com"));
        let m = StrMatch::parse("Api.*").lowercase();
        assert!(m.matches_ignore_case("api.example.com"));
        assert!(
            StrMatch::parse("A.b")
                .lowercase()
                .matches_ignore_case("a.B")
        );
    }

    #[test]
    fn path_templates() {
        let cases: &[(&str, &str, bool)] = &[
            ("/foo/{*}", "/foo/bar", true),
            ("/foo/{*}", "/foo/bar/baz", false),
            ("/foo/{*}", "/foo/", false),
            ("/foo/{**}", "/foo/bar/baz", true),
            ("/foo/{**}", "/foo/", true),
            ("/foo/{**}", "/foo", false),
            ("/foo/{**}/", "/foo/bar/", true),
            ("/foo/{**}/", "/foo//", true),
            ("/foo/{**}/", "/foo/bar", false),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", true),
            ("/foo/{*}/bar/{**}", "/foo/buzz/qux/baz", false),
            ("/{**}/index.html", "/a/b/index.html", true),
            ("/{**}/index.html", "/a/b/index.htm", false),
        ];
        for (template, path, want) in cases {
            let m = PathMatch::parse(template).expect(template);
            assert_eq!(m.matches(path), *want, "{template:?} vs {path:?}");
        }
        for bad in [
            "/{**}/foo/{*}",
            "/foo/{*}.txt",
            "/*/baz/{*}",
            "/foo/{x}",
            "/foo}",
        ] {
            assert!(PathMatch::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ip_blocks_and_ports() {
        let net = parse_ip_block("10.1.2.3/8").expect("cidr");
        assert!(net.contains(&"10.200.0.1".parse::<IpAddr>().expect("ip")));
        let host = parse_ip_block("2001:db8::1").expect("v6");
        assert_eq!(host.prefix_len(), 128);
        assert!(parse_ip_block("10.0.0.300/8").is_err());
        assert!(parse_ip_block("10.0.0.0/33").is_err());
        assert_eq!(parse_port("8080"), Ok(8080));
        for bad in ["0", "65536", "http", "-1", ""] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn service_accounts() {
        let sa = ServiceAccount::parse("bar", "foo").expect("bare");
        assert_eq!((&*sa.namespace, &*sa.name), ("foo", "bar"));
        let sa = ServiceAccount::parse("ns/sa", "foo").expect("qualified");
        assert_eq!((&*sa.namespace, &*sa.name), ("ns", "sa"));
        for bad in ["a/b/c", "ns/*", "/sa", "ns/"] {
            assert!(ServiceAccount::parse(bad, "foo").is_err(), "{bad:?}");
        }
    }
}
