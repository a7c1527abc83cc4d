//! HTTP calls a plugin makes with `proxy_http_call` (the SDKs' `dispatch_http_call`).
//!
//! The host does not know the mesh: the embedder resolves an upstream name (an Envoy cluster name
//! such as `outbound|8080||auth.default.svc.cluster.local`, or a plain `host:port`) and performs
//! the call. The host enforces the plugin's timeout and delivers the answer to the root context
//! of the instance that made the call, as Envoy does.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

use crate::Headers;

/// A call as the plugin asked for it. `headers` carries `:method`, `:path` and `:authority`.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// Request headers, pseudo-headers included.
    pub headers: Headers,
    /// Request body.
    pub body: Bytes,
    /// The plugin's timeout; the host enforces it too.
    pub timeout: Duration,
}

/// The answer delivered to `proxy_on_http_call_response`.
#[derive(Debug, Clone, Default)]
pub struct CallResponse {
    /// Response headers with `:status` first.
    pub headers: Headers,
    /// Response body.
    pub body: Bytes,
    /// Response trailers.
    pub trailers: Headers,
}

/// A call in flight; `Err` carries why it failed (connection refused, reset...).
pub type CallFuture = Pin<Box<dyn Future<Output = Result<CallResponse, String>> + Send>>;

/// Performs plugin HTTP calls for the embedder.
pub trait Dispatcher: Send + Sync + 'static {
    /// Starts a call to `upstream`, or `None` if the name resolves to nothing (the plugin then
    /// gets BAD_ARGUMENT, as Envoy answers for an unknown cluster).
    fn dispatch(&self, upstream: &str, request: CallRequest) -> Option<CallFuture>;
}

/// A dispatcher that knows no upstream: every call is refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCalls;

impl Dispatcher for NoCalls {
    fn dispatch(&self, _: &str, _: CallRequest) -> Option<CallFuture> {
        None
    }
}
