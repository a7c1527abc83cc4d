//! Istio's retry policy on Pingora's retry loop.
//!
//! Pingora calls `upstream_peer` again whenever the last error is marked retryable; these
//! functions decide that mark. An attempt may be retried only while attempts remain
//! (`1 + attempts` in all), the overall deadline has not passed, nothing of the response
//! has reached the client, the body Pingora kept for replay is complete (64 KiB) and so is
//! what the plugins made of it ([`super::replay`]), and no plugin answered the request itself.

use mesh::route::RetryCondition as C;
use pingora_error::{Error, ErrorType};
use pingora_proxy::Session;
use tokio::time::Instant;

use super::RequestCtx;

/// Whether another attempt is allowed at all; the last condition, the service's retry budget
/// (`maxRetries`), takes a place in it when everything else allows the retry.
fn may_retry(ctx: &mut RequestCtx, session: &Session) -> bool {
    let Some(policy) = &ctx.retry else {
        return false;
    };
    ctx.attempts <= policy.attempts
        && session.response_written().is_none()
        && !session.retry_buffer_truncated()
        && ctx.sent.replayable()
        && ctx.wasm_answer.is_none()
        && ctx.deadline.is_none_or(|d| Instant::now() < d)
        && ctx.take_retry_budget()
}

fn listed(ctx: &RequestCtx, conditions: &[C]) -> bool {
    ctx.retry
        .as_ref()
        .is_some_and(|p| conditions.iter().any(|&c| p.retry_on.contains(c)))
}

/// An upstream answered `status`: retry it if the policy names it (`5xx`, `gateway-error`,
/// `retriable-4xx`, `retriable-status-codes`).
pub(super) fn retries_status(ctx: &mut RequestCtx, session: &Session, status: u16) -> bool {
    ctx.retry
        .as_ref()
        .is_some_and(|p| p.retry_on.retries_status(status))
        && may_retry(ctx, session)
}

/// The CONNECT to the endpoint failed (refused, unreachable, or timed out): nothing was sent,
/// so `connect-failure`, `reset-before-request`, `reset`, `5xx` and `gateway-error` all apply.
pub(super) fn retries_connect_failure(ctx: &mut RequestCtx, session: &Session) -> bool {
    listed(
        ctx,
        &[
            C::ConnectFailure,
            C::ResetBeforeRequest,
            C::Reset,
            C::ServerError,
            C::GatewayError,
        ],
    ) && may_retry(ctx, session)
}

/// The attempt failed after connecting: a per-try timeout, or a reset or close before the
/// response started. Envoy retries both under `5xx`, `gateway-error` and `reset`; a refused
/// HTTP/2 stream under `refused-stream`.
pub(super) fn retries_error(ctx: &mut RequestCtx, session: &Session, e: &Error) -> bool {
    if is_timeout(e) {
        return listed(ctx, &[C::ServerError, C::GatewayError, C::Reset])
            && may_retry(ctx, session);
    }
    (listed(ctx, &[C::ServerError, C::GatewayError, C::Reset])
        || (is_refused_stream(e) && listed(ctx, &[C::RefusedStream])))
        && may_retry(ctx, session)
}

/// Whether the error is a timeout: Pingora's own, or our deadline surfacing as `TimedOut` from
/// the upstream stream.
pub(super) fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout
    ) || any_cause(e, &|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// Whether the upstream refused the HTTP/2 stream (`REFUSED_STREAM`: it was never processed).
fn is_refused_stream(e: &Error) -> bool {
    any_cause(e, &|c| {
        c.downcast_ref::<h2::Error>()
            .is_some_and(|h2| h2.reason() == Some(h2::Reason::REFUSED_STREAM))
    })
}

/// Walks the cause chain, through nested Pingora errors.
fn any_cause(e: &Error, found: &dyn Fn(&(dyn std::error::Error + 'static)) -> bool) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(c) = cause {
        if found(c) {
            return true;
        }
        if let Some(inner) = c.downcast_ref::<Error>() {
            return any_cause(inner, found);
        }
        cause = c.source();
    }
    false
}
