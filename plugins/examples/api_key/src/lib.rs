//! `api_key`: rejects requests that do not carry a known API key.
//!
//! Configuration (JSON, `keys` required):
//!
//! ```json
//! {"header": "x-api-key", "keys": ["k1", "k2"]}
//! ```
//!
//! `header` defaults to `x-api-key`. A request whose header is missing or not
//! one of `keys` gets a local `401` reply. Accepted requests are forwarded
//! with the header removed, so the backend never sees the secret.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ApiKeyRoot::default()) });
}}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_header")]
    header: String,
    keys: Vec<String>,
}

fn default_header() -> String {
    "x-api-key".to_string()
}

/// Used until the plugin is configured: no keys, so every request is rejected.
impl Default for Config {
    fn default() -> Self {
        Config {
            header: default_header(),
            keys: Vec::new(),
        }
    }
}

#[derive(Default)]
struct ApiKeyRoot {
    config: Rc<Config>,
}

impl Context for ApiKeyRoot {}

impl RootContext for ApiKeyRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(mut config) => {
                // Header names are matched in lower case by proxy-wasm hosts.
                config.header.make_ascii_lowercase();
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                log::warn!("api_key: invalid configuration: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(ApiKey {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ApiKey {
    config: Rc<Config>,
}

impl Context for ApiKey {}

impl HttpContext for ApiKey {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let header = &self.config.header;
        // Compare raw bytes: a non-UTF-8 value is simply not a valid key.
        let valid = self
            .get_http_request_header_bytes(header)
            .is_some_and(|key| self.config.keys.iter().any(|k| k.as_bytes() == key));
        if !valid {
            self.send_http_response(
                401,
                vec![
                    ("www-authenticate", "ApiKey"),
                    ("content-type", "text/plain"),
                ],
                Some(b"missing or invalid API key\n"),
            );
            return Action::Pause;
        }
        self.remove_http_request_header(header);
        Action::Continue
    }
}
