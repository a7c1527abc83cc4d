//! VirtualService rule features besides matching and routing: redirects, direct responses,
//! rewrites, retries, faults, mirrors and CORS, with Istio's defaults.

use std::sync::Arc;
use std::time::Duration;

use super::lower_common::{duration, header_value, search_regex, timeout};
use super::lower_virtual_service::Lowering;
use super::model::{
    Cors, Fault, FaultAbort, FaultDelay, Mirror, PathRewrite, Redirect, RedirectPort, Rewrite,
    RuleAction, UnmatchedPreflights, ValueMatch,
};
use super::retry::{RetryOn, RetryPolicy};
use super::spec_istio::{
    CorsPolicy, DerivePort, HttpDirectResponse, HttpFaultInjection, HttpRedirect, HttpRetry,
    HttpRewrite, UnmatchedPreflightsSpec, VirtualServiceRoute,
};

const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

impl Lowering<'_> {
    /// Istio's redirect: 301 by default, `uri` replaces the whole path.
    pub(super) fn redirect(&mut self, r: &HttpRedirect, field: &str) -> Redirect {
        let status = r.redirect_code.unwrap_or(301);
        let status = match u16::try_from(status) {
            Ok(code) if REDIRECT_CODES.contains(&code) => code,
            _ => {
                self.problems.push(
                    format!("{field}.redirectCode"),
                    format!("{status} is not a redirect status; use 301, 302, 303, 307 or 308"),
                );
                301
            }
        };
        let port = match (r.port, r.derive_port) {
            (Some(_), Some(_)) => {
                self.problems
                    .push(field, "set port or derivePort, not both");
                RedirectPort::Request
            }
            (Some(port), None) => self
                .port(port, &format!("{field}.port"))
                .map_or(RedirectPort::Request, RedirectPort::Explicit),
            (None, Some(DerivePort::FromProtocolDefault)) => RedirectPort::SchemeDefault,
            (None, Some(DerivePort::FromRequestPort) | None) => RedirectPort::Request,
        };
        Redirect {
            scheme: r.scheme.as_deref().map(Arc::from),
            host: r.authority.as_deref().map(Arc::from),
            path: r
                .uri
                .as_deref()
                .map(|uri| PathRewrite::Full(Arc::from(uri))),
            port,
            status,
        }
    }

    pub(super) fn direct_response(&mut self, d: &HttpDirectResponse, field: &str) -> RuleAction {
        let status = match u16::try_from(d.status) {
            Ok(code @ 200..=599) => code,
            _ => {
                self.problems.push(
                    format!("{field}.status"),
                    format!("{} is not a response status; use 200 to 599", d.status),
                );
                500
            }
        };
        let body = match d.body.as_ref().map(|b| (&b.string, &b.bytes)) {
            None | Some((None, None)) => None,
            Some((Some(text), None)) => Some(text.as_bytes().to_vec()),
            Some((None, Some(bytes))) => self.decode_body(bytes, &format!("{field}.body.bytes")),
            Some((Some(_), Some(_))) => {
                self.problems
                    .push(format!("{field}.body"), "set string or bytes, not both");
                None
            }
        };
        RuleAction::DirectResponse {
            status,
            body: body.map(Arc::from),
        }
    }

    pub(super) fn rewrite(&mut self, rw: &HttpRewrite, field: &str) -> Option<Rewrite> {
        let authority = (rw.authority.as_deref()).and_then(|a| {
            self.problems
                .check(header_value(a, &format!("{field}.authority")))
        });
        let path = match (&rw.uri, &rw.uri_regex_rewrite) {
            (Some(_), Some(_)) => {
                self.problems
                    .push(field, "set uri or uriRegexRewrite, not both");
                None
            }
            (Some(uri), None) => Some(PathRewrite::Prefix(Arc::from(uri.as_str()))),
            (None, Some(rr)) => self
                .problems
                .check(search_regex(
                    &rr.pattern,
                    &format!("{field}.uriRegexRewrite.match"),
                ))
                .map(|regex| PathRewrite::Regex {
                    regex,
                    replacement: Arc::from(envoy_substitution(&rr.rewrite)),
                }),
            (None, None) => None,
        };
        (authority.is_some() || path.is_some()).then_some(Rewrite { authority, path })
    }

    /// `(retry, per-try timeout)`, as Istio converts them: absent = the mesh default; `attempts`
    /// absent or 0 disables retries (and with them the per-try timeout); a `retryOn` replaces
    /// the default conditions.
    pub(super) fn retries(
        &mut self,
        r: Option<&HttpRetry>,
        field: &str,
    ) -> (Option<RetryPolicy>, Option<Duration>) {
        let Some(r) = r else {
            return (Some(RetryPolicy::mesh_default()), None);
        };
        let per_try = (r.per_try_timeout.as_deref())
            .and_then(|t| {
                self.problems
                    .check(timeout(t, &format!("{field}.perTryTimeout")))
            })
            .flatten();
        let retry_on = r.retry_on.as_deref().and_then(|text| {
            RetryOn::parse(text)
                .map_err(|message| self.problems.push(format!("{field}.retryOn"), message))
                .ok()
        });
        let backoff = (r.backoff.as_deref()).and_then(|b| {
            self.problems
                .check(duration(b, &format!("{field}.backoff")))
        });
        let attempts = r.attempts.unwrap_or(0);
        if attempts == 0 {
            return (None, None);
        }
        let policy = RetryPolicy {
            attempts,
            retry_on: retry_on.unwrap_or_else(|| RetryPolicy::mesh_default().retry_on),
            backoff,
        };
        (Some(policy), per_try)
    }

    /// Percentages absent in YAML inject nothing, as Istio documents.
    pub(super) fn fault(&mut self, f: &HttpFaultInjection, field: &str) -> Option<Fault> {
        let delay = f.delay.as_ref().and_then(|d| {
            let at = format!("{field}.delay");
            let percent = match (d.percentage, d.percent) {
                (Some(p), _) => {
                    self.percentage(Some(p.value), &format!("{at}.percentage.value"), 0.0)
                }
                (None, legacy) => {
                    self.percentage(legacy.map(f64::from), &format!("{at}.percent"), 0.0)
                }
            };
            let Some(text) = &d.fixed_delay else {
                self.problems.push(
                    format!("{at}.fixedDelay"),
                    "fixedDelay is required for a delay fault",
                );
                return None;
            };
            let delay = self
                .problems
                .check(duration(text, &format!("{at}.fixedDelay")))?;
            Some(FaultDelay { delay, percent })
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let at = format!("{field}.abort");
            let percent = self.percentage(
                a.percentage.map(|p| p.value),
                &format!("{at}.percentage.value"),
                0.0,
            );
            if a.grpc_status.is_some() {
                self.problems.push(
                    format!("{at}.grpcStatus"),
                    "gRPC aborts are not supported by this waypoint; use httpStatus",
                );
                return None;
            }
            let Some(status) = a.http_status else {
                self.problems.push(
                    format!("{at}.httpStatus"),
                    "httpStatus is required for an abort fault",
                );
                return None;
            };
            match u16::try_from(status) {
                Ok(status @ 200..=599) => Some(FaultAbort { status, percent }),
                _ => {
                    self.problems.push(
                        format!("{at}.httpStatus"),
                        format!("{status} is not an HTTP status; use 200 to 599"),
                    );
                    None
                }
            }
        });
        (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
    }

    /// `mirror` with `mirrorPercentage` (absent = 100, 0 = off), or `mirrors[]`.
    pub(super) fn mirrors(&mut self, r: &VirtualServiceRoute, path: &str) -> Vec<Mirror> {
        if r.mirror.is_some() && !r.mirrors.is_empty() {
            self.problems
                .push(format!("{path}.mirrors"), "set mirror or mirrors, not both");
        }
        let single = r.mirror.as_ref().map(|d| {
            let percent = r.mirror_percentage.map(|p| p.value);
            (
                d,
                percent,
                format!("{path}.mirror"),
                format!("{path}.mirrorPercentage.value"),
            )
        });
        let listed = r.mirrors.iter().enumerate().map(|(k, m)| {
            (
                &m.destination,
                m.percentage.map(|p| p.value),
                format!("{path}.mirrors[{k}].destination"),
                format!("{path}.mirrors[{k}].percentage.value"),
            )
        });
        let mut out = Vec::new();
        for (destination, percent, dest_field, percent_field) in single.into_iter().chain(listed) {
            let percent = self.percentage(percent, &percent_field, 100.0);
            if let Some(backend) = self.destination(destination, &dest_field)
                && percent > 0.0
            {
                out.push(Mirror { backend, percent });
            }
        }
        out
    }

    pub(super) fn cors(&mut self, c: &CorsPolicy, field: &str) -> Cors {
        let mut allow_origins: Vec<ValueMatch> = (c.allow_origins.iter().enumerate())
            .filter_map(|(k, m)| self.string_match(m, &format!("{field}.allowOrigins[{k}]")))
            .collect();
        allow_origins.extend(c.allow_origin.iter().map(|o| match o.as_str() {
            "*" => ValueMatch::Present,
            exact => ValueMatch::Exact(Arc::from(exact)),
        }));
        let words = |list: &[String]| list.iter().map(|s| Arc::from(s.as_str())).collect();
        Cors {
            allow_origins,
            allow_methods: words(&c.allow_methods),
            allow_headers: words(&c.allow_headers),
            expose_headers: words(&c.expose_headers),
            max_age: (c.max_age.as_deref())
                .and_then(|m| self.problems.check(duration(m, &format!("{field}.maxAge")))),
            allow_credentials: c.allow_credentials.unwrap_or(false),
            unmatched_preflights: match c.unmatched_preflights {
                Some(UnmatchedPreflightsSpec::Ignore) => UnmatchedPreflights::Ignore,
                _ => UnmatchedPreflights::Forward,
            },
        }
    }
}

/// Envoy writes capture groups as `\1`; the `regex` crate as `${1}`, and treats a bare `$` as
/// the start of a group reference, so literal dollars are doubled.
fn envoy_substitution(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push_str("${");
                while let Some(d) = chars.next_if(char::is_ascii_digit) {
                    out.push(d);
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::envoy_substitution;

    #[test]
    fn translates_envoy_capture_groups() {
        let cases = [
            (r"\2/instance/\1", "${2}/instance/${1}"),
            (r"/v\10x", "/v${10}x"),
            ("/cost$5", "/cost$$5"),
            (r"/a\b", r"/a\b"),
        ];
        for (envoy, want) in cases {
            assert_eq!(envoy_substitution(envoy), want, "{envoy}");
        }
    }
}
