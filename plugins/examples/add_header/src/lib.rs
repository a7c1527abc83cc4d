//! `add_header`: adds a fixed set of headers to every HTTP response.
//!
//! Configuration (JSON, optional):
//!
//! ```json
//! {"headers": {"x-served-by": "waypoint", "x-env": "prod"}}
//! ```
//!
//! An empty or missing configuration adds no headers.

use std::collections::BTreeMap;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(AddHeaderRoot::default()) });
}}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    headers: BTreeMap<String, String>,
}

#[derive(Default)]
struct AddHeaderRoot {
    config: Rc<Config>,
}

impl Context for AddHeaderRoot {}

impl RootContext for AddHeaderRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = if bytes.is_empty() {
            Ok(Config::default())
        } else {
            serde_json::from_slice(&bytes)
        };
        match config {
            Ok(config) => {
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                log::warn!("add_header: invalid configuration: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AddHeader {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AddHeader {
    config: Rc<Config>,
}

impl Context for AddHeader {}

impl HttpContext for AddHeader {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in &self.config.headers {
            self.add_http_response_header(name, value);
        }
        Action::Continue
    }
}
