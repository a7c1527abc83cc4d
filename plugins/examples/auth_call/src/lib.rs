//! `auth_call`: asks an external auth service about every request.
//!
//! Configuration (JSON, `upstream` and `authority` required):
//!
//! ```json
//! {
//!   "upstream": "outbound|8080||auth.default.svc.cluster.local",
//!   "authority": "auth.default.svc.cluster.local",
//!   "path": "/check",
//!   "timeout_ms": 1000
//! }
//! ```
//!
//! `path` defaults to `/check`, `timeout_ms` to `1000`. For each request the
//! plugin sends `GET <path>` to `upstream` with the original path in
//! `x-original-path` and the request's `authorization` header, and pauses the
//! request until the answer arrives:
//!
//! - `200`: the request continues; the auth service's `x-auth-user` response
//!   header (if any) replaces the request's `x-auth-user` header (a
//!   client-supplied one is always dropped);
//! - any other status: local `403` reply;
//! - no answer (call failed or timed out): local `503` reply.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(AuthCallRoot::default()) });
}}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    upstream: String,
    authority: String,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
}

fn default_path() -> String {
    "/check".to_string()
}

fn default_timeout_ms() -> u64 {
    1000
}

#[derive(Default)]
struct AuthCallRoot {
    config: Rc<Config>,
}

impl Context for AuthCallRoot {}

impl RootContext for AuthCallRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice(&bytes) {
            Ok(config) => {
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                log::warn!("auth_call: invalid configuration: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AuthCall {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AuthCall {
    config: Rc<Config>,
}

impl AuthCall {
    fn deny(&self, status: u32, body: &[u8]) {
        self.send_http_response(status, vec![("content-type", "text/plain")], Some(body));
    }
}

impl Context for AuthCall {
    // The SDK routes the reply to the HttpContext that dispatched the call.
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        match self.get_http_call_response_header(":status").as_deref() {
            Some("200") => {
                let user = self.get_http_call_response_header("x-auth-user");
                // `None` removes the header, so clients cannot forge it.
                self.set_http_request_header("x-auth-user", user.as_deref());
                self.resume_http_request();
            }
            Some(_) => self.deny(403, b"denied by auth service\n"),
            None => self.deny(503, b"auth service unavailable\n"),
        }
    }
}

impl HttpContext for AuthCall {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let config = &self.config;
        let original_path = self.get_http_request_header(":path").unwrap_or_default();
        let authorization = self.get_http_request_header("authorization");

        let mut headers = vec![
            (":method", "GET"),
            (":path", config.path.as_str()),
            (":authority", config.authority.as_str()),
            ("x-original-path", original_path.as_str()),
        ];
        if let Some(authorization) = &authorization {
            headers.push(("authorization", authorization));
        }

        let timeout = Duration::from_millis(config.timeout_ms);
        match self.dispatch_http_call(&config.upstream, headers, None, vec![], timeout) {
            Ok(_token) => Action::Pause,
            Err(status) => {
                log::warn!(
                    "auth_call: dispatch to {} failed: {status:?}",
                    config.upstream
                );
                self.deny(503, b"auth service unavailable\n");
                Action::Pause
            }
        }
    }
}
