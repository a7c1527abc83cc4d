//! `rewrite_path`: replaces a request path prefix before routing upstream.
//!
//! Configuration (JSON, `prefix` required and non-empty):
//!
//! ```json
//! {"prefix": "/old", "replacement": "/new"}
//! ```
//!
//! `replacement` defaults to `""` (strip the prefix). If `:path` starts with
//! `prefix`, that prefix is replaced and the original path is sent upstream in
//! `x-original-path`. Note that this is a plain string prefix: `/old` also
//! matches `/older`.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(RewritePathRoot::default()) });
}}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    prefix: String,
    #[serde(default)]
    replacement: String,
}

#[derive(Default)]
struct RewritePathRoot {
    config: Rc<Config>,
}

impl Context for RewritePathRoot {}

impl RootContext for RewritePathRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(config) if config.prefix.is_empty() => {
                log::warn!("rewrite_path: invalid configuration: `prefix` is empty");
                false
            }
            Ok(config) => {
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                log::warn!("rewrite_path: invalid configuration: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RewritePath {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct RewritePath {
    config: Rc<Config>,
}

impl Context for RewritePath {}

impl HttpContext for RewritePath {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Config {
            prefix,
            replacement,
        } = &*self.config;
        if prefix.is_empty() {
            return Action::Continue; // not configured
        }
        if let Some(path) = self.get_http_request_header(":path")
            && let Some(rest) = path.strip_prefix(prefix.as_str())
        {
            let new_path = format!("{replacement}{rest}");
            self.set_http_request_header(":path", Some(&new_path));
            self.add_http_request_header("x-original-path", &path);
        }
        Action::Continue
    }
}
