//! Retry policy: when a failed attempt is tried again.
//!
//! Istio's `retryOn` is Envoy's comma-separated policy list, with bare status codes allowed; we
//! parse it once into a set so the waypoint never re-reads strings per request.

use std::fmt;
use std::time::Duration;

/// Retries of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (total attempts = 1 + `attempts`); at least 1.
    pub attempts: u32,
    /// Which failures are retried.
    pub retry_on: RetryOn,
    /// Base wait between attempts; `None` = Envoy's default of 25 ms, growing exponentially.
    pub backoff: Option<Duration>,
}

impl RetryPolicy {
    /// Istio's default when a route says nothing about retries: 2 retries on connection
    /// failures, refused streams and gRPC `unavailable`/`cancelled`, and no status code (503 stopped
    /// being retried by default in Istio 1.24). Waypoints apply it even to services without routes.
    pub fn mesh_default() -> Self {
        Self {
            attempts: 2,
            retry_on: RetryOn {
                conditions: MESH_DEFAULT_CONDITIONS.to_vec(),
                status_codes: Vec::new(),
            },
            backoff: None,
        }
    }
}

/// The conditions Istio retries on by default, and on which HTTPRoute `retry` stanzas retry in
/// addition to their listed `codes`.
pub(super) const MESH_DEFAULT_CONDITIONS: &[RetryCondition] = &[
    RetryCondition::ConnectFailure,
    RetryCondition::RefusedStream,
    RetryCondition::Unavailable,
    RetryCondition::Cancelled,
    RetryCondition::RetriableStatusCodes,
];

/// A parsed `retryOn`: policies and status codes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Retry policies, without duplicates, in the order written.
    pub conditions: Vec<RetryCondition>,
    /// Status codes retried under [`RetryCondition::RetriableStatusCodes`].
    pub status_codes: Vec<u16>,
}

impl RetryOn {
    /// Reads Istio's `retryOn` (`5xx,connect-failure,503`). A bare status code adds
    /// `retriable-status-codes`, as Istio does, so listing codes alone works.
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let mut out = RetryOn::default();
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if token.bytes().all(|b| b.is_ascii_digit()) {
                match token.parse::<u16>() {
                    Ok(code @ 100..=599) => {
                        out.add_code(code);
                        out.add(RetryCondition::RetriableStatusCodes);
                    }
                    _ => return Err(format!("{token} is not an HTTP status code (100-599)")),
                }
            } else if let Some(c) = RetryCondition::ALL.iter().find(|c| c.name() == token) {
                out.add(*c);
            } else {
                let valid: Vec<&str> = RetryCondition::ALL.iter().map(|c| c.name()).collect();
                return Err(format!(
                    "{token:?} is not a retry policy; use HTTP status codes or any of {}",
                    valid.join(", ")
                ));
            }
        }
        Ok(out)
    }

    /// Adds a condition unless present.
    pub(super) fn add(&mut self, condition: RetryCondition) {
        if !self.conditions.contains(&condition) {
            self.conditions.push(condition);
        }
    }

    /// Adds a status code unless present.
    pub(super) fn add_code(&mut self, code: u16) {
        if !self.status_codes.contains(&code) {
            self.status_codes.push(code);
        }
    }

    /// Whether `condition` was listed.
    pub fn contains(&self, condition: RetryCondition) -> bool {
        self.conditions.contains(&condition)
    }

    /// Whether an upstream response with `status` should be retried, with Envoy's meaning of
    /// each policy (`gateway-error` = 502/503/504, `retriable-4xx` = 409).
    pub fn retries_status(&self, status: u16) -> bool {
        self.conditions.iter().any(|c| match c {
            RetryCondition::ServerError => (500..=599).contains(&status),
            RetryCondition::GatewayError => matches!(status, 502..=504),
            RetryCondition::Retriable4xx => status == 409,
            RetryCondition::RetriableStatusCodes => self.status_codes.contains(&status),
            _ => false,
        })
    }
}

/// One Envoy retry policy, as Istio's `retryOn` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryCondition {
    /// `5xx`: any 5xx response, connection failure or reset.
    ServerError,
    /// `gateway-error`: 502, 503, 504.
    GatewayError,
    /// `reset`: the upstream reset or closed the connection.
    Reset,
    /// `reset-before-request`: a reset before the request was sent.
    ResetBeforeRequest,
    /// `connect-failure`: could not connect.
    ConnectFailure,
    /// `retriable-4xx`: 409.
    Retriable4xx,
    /// `refused-stream`: HTTP/2 `REFUSED_STREAM`.
    RefusedStream,
    /// `retriable-status-codes`: the listed codes.
    RetriableStatusCodes,
    /// `retriable-headers`: upstream-designated retriable responses.
    RetriableHeaders,
    /// `envoy-ratelimited`: rate-limited by the proxy.
    EnvoyRateLimited,
    /// `http3-post-connect-failure`.
    Http3PostConnectFailure,
    /// gRPC `cancelled`.
    Cancelled,
    /// gRPC `deadline-exceeded`.
    DeadlineExceeded,
    /// gRPC `internal`.
    Internal,
    /// gRPC `resource-exhausted`.
    ResourceExhausted,
    /// gRPC `unavailable`.
    Unavailable,
}

impl RetryCondition {
    /// Every policy Istio's validation accepts.
    pub const ALL: [RetryCondition; 16] = [
        RetryCondition::ServerError,
        RetryCondition::GatewayError,
        RetryCondition::Reset,
        RetryCondition::ResetBeforeRequest,
        RetryCondition::ConnectFailure,
        RetryCondition::Retriable4xx,
        RetryCondition::RefusedStream,
        RetryCondition::RetriableStatusCodes,
        RetryCondition::RetriableHeaders,
        RetryCondition::EnvoyRateLimited,
        RetryCondition::Http3PostConnectFailure,
        RetryCondition::Cancelled,
        RetryCondition::DeadlineExceeded,
        RetryCondition::Internal,
        RetryCondition::ResourceExhausted,
        RetryCondition::Unavailable,
    ];

    /// The name used in `retryOn`.
    pub fn name(self) -> &'static str {
        match self {
            RetryCondition::ServerError => "5xx",
            RetryCondition::GatewayError => "gateway-error",
            RetryCondition::Reset => "reset",
            RetryCondition::ResetBeforeRequest => "reset-before-request",
            RetryCondition::ConnectFailure => "connect-failure",
            RetryCondition::Retriable4xx => "retriable-4xx",
            RetryCondition::RefusedStream => "refused-stream",
            RetryCondition::RetriableStatusCodes => "retriable-status-codes",
            RetryCondition::RetriableHeaders => "retriable-headers",
            RetryCondition::EnvoyRateLimited => "envoy-ratelimited",
            RetryCondition::Http3PostConnectFailure => "http3-post-connect-failure",
            RetryCondition::Cancelled => "cancelled",
            RetryCondition::DeadlineExceeded => "deadline-exceeded",
            RetryCondition::Internal => "internal",
            RetryCondition::ResourceExhausted => "resource-exhausted",
            RetryCondition::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for RetryCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::RetryCondition as C;
    use super::*;

    #[test]
    fn parses_istio_retry_on() {
        let cases: &[(&str, &[C], &[u16])] = &[
            ("5xx", &[C::ServerError], &[]),
            (
                "gateway-error, connect-failure,refused-stream",
                &[C::GatewayError, C::ConnectFailure, C::RefusedStream],
                &[],
            ),
            ("503", &[C::RetriableStatusCodes], &[503]),
            (
                "reset,503,retriable-status-codes,504,503",
                &[C::Reset, C::RetriableStatusCodes],
                &[503, 504],
            ),
            (
                "cancelled,deadline-exceeded,internal,resource-exhausted,unavailable",
                &[
                    C::Cancelled,
                    C::DeadlineExceeded,
                    C::Internal,
                    C::ResourceExhausted,
                    C::Unavailable,
                ],
                &[],
            ),
            ("retriable-4xx,,", &[C::Retriable4xx], &[]),
        ];
        for (text, conditions, codes) in cases {
            let got = RetryOn::parse(text).expect(text);
            assert_eq!(got.conditions, *conditions, "{text}");
            assert_eq!(got.status_codes, *codes, "{text}");
        }
    }

    #[test]
    fn rejects_unknown_policies_and_codes() {
        let err = RetryOn::parse("5xx,on-failure").expect_err("unknown policy");
        assert!(
            err.starts_with("\"on-failure\" is not a retry policy"),
            "{err}"
        );
        assert!(err.contains("gateway-error"), "{err}");
        let err = RetryOn::parse("700").expect_err("bad code");
        assert_eq!(err, "700 is not an HTTP status code (100-599)");
    }

    #[test]
    fn decides_on_status_like_envoy() {
        let on = |text| RetryOn::parse(text).expect("valid");
        let cases = [
            ("5xx", 500, true),
            ("5xx", 599, true),
            ("5xx", 404, false),
            ("gateway-error", 502, true),
            ("gateway-error", 504, true),
            ("gateway-error", 500, false),
            ("retriable-4xx", 409, true),
            ("retriable-4xx", 404, false),
            ("429,connect-failure", 429, true),
            ("429,connect-failure", 503, false),
            ("connect-failure,refused-stream", 503, false),
        ];
        for (text, status, want) in cases {
            assert_eq!(on(text).retries_status(status), want, "{text} {status}");
        }
    }

    #[test]
    fn mesh_default_does_not_retry_503() {
        let policy = RetryPolicy::mesh_default();
        assert_eq!(policy.attempts, 2);
        assert!(policy.retry_on.contains(C::ConnectFailure));
        assert!(!policy.retry_on.retries_status(503));
    }
}
