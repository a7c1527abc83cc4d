//! `body_inspect`: refuses requests whose body contains a forbidden pattern.
//!
//! Configuration (JSON, optional):
//!
//! ```json
//! {"deny": ["forbidden", "DROP TABLE"], "max_bytes": 65536}
//! ```
//!
//! The plugin asks the host to buffer the whole request body, then searches
//! the first `max_bytes` bytes (default `65536`) for each `deny` pattern
//! (case-sensitive, empty patterns are ignored). On a match it sends a local
//! `403` reply. Every response gets `x-body-bytes: <n>`, the number of body
//! bytes inspected (`0` for requests without a body).

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(BodyInspectRoot::default()) });
}}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    deny: Vec<String>,
    max_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            deny: Vec::new(),
            max_bytes: 65536,
        }
    }
}

#[derive(Default)]
struct BodyInspectRoot {
    config: Rc<Config>,
}

impl Context for BodyInspectRoot {}

impl RootContext for BodyInspectRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = if bytes.is_empty() {
            Ok(Config::default())
        } else {
            serde_json::from_slice::<Config>(&bytes)
        };
        match config {
            Ok(mut config) => {
                config.deny.retain(|pattern| !pattern.is_empty());
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                log::warn!("body_inspect: invalid configuration: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(BodyInspect {
            config: Rc::clone(&self.config),
            inspected: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct BodyInspect {
    config: Rc<Config>,
    inspected: usize,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

impl Context for BodyInspect {}

impl HttpContext for BodyInspect {
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause; // let the host buffer until the body is complete
        }
        let limit = body_size.min(self.config.max_bytes);
        let body = self.get_http_request_body(0, limit).unwrap_or_default();
        self.inspected = body.len();

        let denied = self
            .config
            .deny
            .iter()
            .find(|p| contains(&body, p.as_bytes()));
        if let Some(pattern) = denied {
            log::info!("body_inspect: request body matches {pattern:?}");
            self.send_http_response(
                403,
                vec![("content-type", "text/plain")],
                Some(b"request body refused\n"),
            );
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header("x-body-bytes", &self.inspected.to_string());
        Action::Continue
    }
}
