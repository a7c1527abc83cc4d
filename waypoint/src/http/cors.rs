//! CORS as Envoy's filter does it for a route's `cors` policy: preflights from allowed
//! origins are answered here; simple requests from allowed origins get the CORS headers on
//! the upstream's response.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, header};
use mesh::route::{Cors, UnmatchedPreflights};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};

use super::{Local, RequestCtx};

fn joined(values: &[std::sync::Arc<str>]) -> Option<HeaderValue> {
    if values.is_empty() {
        return None;
    }
    let text: Vec<&str> = values.iter().map(|v| &**v).collect();
    HeaderValue::try_from(text.join(",")).ok()
}

/// Answers a preflight, or remembers an allowed origin for the response; `None` forwards.
pub(super) fn handle(cors: &Cors, req: &RequestHeader, ctx: &mut RequestCtx) -> Option<Local> {
    let origin = req.headers.get(header::ORIGIN)?;
    let allowed = origin.to_str().is_ok_and(|o| cors.allows_origin(o));
    let preflight = req.method == Method::OPTIONS
        && req
            .headers
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !preflight {
        if allowed {
            ctx.cors_origin = Some(origin.clone());
        }
        return None;
    }
    if !allowed {
        return match cors.unmatched_preflights {
            UnmatchedPreflights::Forward => None,
            UnmatchedPreflights::Ignore => {
                ctx.details = "cors_preflight_ignored";
                Some(Local::new(200, Vec::new(), Bytes::new()))
            }
        };
    }
    let mut headers: Vec<(HeaderName, HeaderValue)> =
        vec![(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())];
    if let Some(v) = joined(&cors.allow_methods) {
        headers.push((header::ACCESS_CONTROL_ALLOW_METHODS, v));
    }
    if let Some(v) = joined(&cors.allow_headers) {
        headers.push((header::ACCESS_CONTROL_ALLOW_HEADERS, v));
    }
    if let Some(age) = cors.max_age {
        headers.push((header::ACCESS_CONTROL_MAX_AGE, age.as_secs().into()));
    }
    if cors.allow_credentials {
        headers.push((
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        ));
    }
    ctx.details = "cors_preflight";
    Some(Local::new(200, headers, Bytes::new()))
}

/// Adds the CORS headers for an allowed `origin` to the response of a simple request.
pub(super) fn response_headers(
    cors: &Cors,
    origin: &HeaderValue,
    resp: &mut ResponseHeader,
) -> Result<()> {
    resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())?;
    if cors.allow_credentials {
        resp.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
    }
    if let Some(v) = joined(&cors.expose_headers) {
        resp.insert_header(header::ACCESS_CONTROL_EXPOSE_HEADERS, v)?;
    }
    Ok(())
}
