//! `counter`: counts requests in a host counter metric.
//!
//! Configuration (JSON, optional):
//!
//! ```json
//! {"metric": "requests_total"}
//! ```
//!
//! `metric` defaults to `requests_total`. The counter is defined once per
//! configuration and incremented on every request; the response carries the
//! counter value read back right after this request's increment in
//! `x-request-count`.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(CounterRoot::default()) });
}}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    metric: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            metric: "requests_total".to_string(),
        }
    }
}

#[derive(Default)]
struct CounterRoot {
    metric_id: Option<u32>,
}

impl Context for CounterRoot {}

impl RootContext for CounterRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = if bytes.is_empty() {
            Config::default()
        } else {
            match serde_json::from_slice::<Config>(&bytes) {
                Ok(config) => config,
                Err(err) => {
                    log::warn!("counter: invalid configuration: {err}");
                    return false;
                }
            }
        };
        match hostcalls::define_metric(MetricType::Counter, &config.metric) {
            Ok(id) => {
                self.metric_id = Some(id);
                true
            }
            Err(status) => {
                log::warn!(
                    "counter: cannot define metric {}: {status:?}",
                    config.metric
                );
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Counter {
            metric_id: self.metric_id,
            count: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Counter {
    metric_id: Option<u32>,
    count: Option<u64>,
}

impl Context for Counter {}

impl HttpContext for Counter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(id) = self.metric_id else {
            return Action::Continue; // not configured
        };
        if let Err(status) = hostcalls::increment_metric(id, 1) {
            log::warn!("counter: increment failed: {status:?}");
        }
        self.count = hostcalls::get_metric(id).ok();
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(count) = self.count {
            self.add_http_response_header("x-request-count", &count.to_string());
        }
        Action::Continue
    }
}
