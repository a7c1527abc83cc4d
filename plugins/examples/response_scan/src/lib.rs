//! `response_scan`: holds each response body until a scanning service has seen it.
//!
//! Configuration (JSON, `upstream` and `authority` required):
//!
//! ```json
//! {
//!   "upstream": "outbound|8080||scanner.default.svc.cluster.local",
//!   "authority": "scanner.default.svc.cluster.local",
//!   "path": "/scan",
//!   "timeout_ms": 1000,
//!   "headers": {"x-tenant": "a"}
//! }
//! ```
//!
//! `path` defaults to `/scan`, `timeout_ms` to `1000`; `headers` are added to
//! every scan request. The plugin drops the response's `content-length` (the
//! body it sends may differ), buffers the whole body, then sends it as
//! `POST <path>` to `upstream` and pauses the response until the answer:
//!
//! - `200`: the body goes on unchanged;
//! - any other status, or no answer: the body is replaced with
//!   `response withheld\n` (the scan fails closed).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ScanRoot::default()) });
}}

const WITHHELD: &[u8] = b"response withheld\n";

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    upstream: String,
    authority: String,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn default_path() -> String {
    "/scan".to_string()
}

fn default_timeout_ms() -> u64 {
    1000
}

#[derive(Default)]
struct ScanRoot {
    config: Rc<Config>,
}

impl Context for ScanRoot {}

impl RootContext for ScanRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice(&bytes) {
            Ok(config) => {
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                log::warn!("response_scan: invalid configuration: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Scan {
            config: Rc::clone(&self.config),
            size: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Scan {
    config: Rc<Config>,
    /// Size of the buffered body when the scan was sent.
    size: usize,
}

impl Scan {
    fn withhold(&self) {
        self.set_http_response_body(0, self.size, WITHHELD);
    }
}

impl Context for Scan {
    // The SDK routes the reply to the HttpContext that dispatched the call.
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        match self.get_http_call_response_header(":status").as_deref() {
            Some("200") => {}
            status => {
                log::info!("response_scan: scanner answered {status:?}; body withheld");
                self.withhold();
            }
        }
        self.resume_http_response();
    }
}

impl HttpContext for Scan {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_response_header("content-length", None);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause; // let the host buffer until the body is complete
        }
        self.size = body_size;
        let body = self
            .get_http_response_body(0, body_size)
            .unwrap_or_default();
        let config = &self.config;
        let mut headers = vec![
            (":method", "POST"),
            (":path", config.path.as_str()),
            (":authority", config.authority.as_str()),
        ];
        headers.extend(config.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let timeout = Duration::from_millis(config.timeout_ms);
        match self.dispatch_http_call(&config.upstream, headers, Some(&body), vec![], timeout) {
            Ok(_token) => Action::Pause,
            Err(status) => {
                log::warn!(
                    "response_scan: dispatch to {} failed: {status:?}",
                    config.upstream
                );
                self.withhold();
                Action::Continue
            }
        }
    }
}
