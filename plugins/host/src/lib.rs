//! A proxy-wasm host on wasmtime, independent of any proxy.
//!
//! Plugins written with a proxy-wasm SDK (ABI 0.2.1, 0.2.0 or 0.1.0) run unchanged. The embedder
//! (our waypoint) drives one request through a chain of plugins:
//!
//! 1. [`Host::compile`] a module (cached by SHA-256) and [`Host::load`] it as a [`Plugin`] with
//!    its configuration: an instance starts, `_initialize` runs, the root context is created and
//!    gets `on_vm_start` and `on_configure` with `pluginConfig` as JSON bytes.
//! 2. For each request, [`Plugin::stream`] pins it to one long-lived instance and creates its
//!    stream context; [`Stream`] then runs `on_request_headers`, `on_request_body`,
//!    `on_response_headers` and `on_response_body` over header maps ([`Headers`], pseudo-headers
//!    included) and body chunks the embedder lends. A callback that pauses holds the stream
//!    until the plugin continues it or answers locally, typically from the answer to an HTTP
//!    call that the embedder performs through its [`Dispatcher`].
//! 3. Dropping the stream runs `on_done`, `on_log` and `on_delete`.
//!
//! Guest calls are synchronous and short and never hold a lock across an `.await`. Each callback
//! runs under an epoch deadline, each instance under a memory cap; a trap poisons only its
//! instance, which is replaced, and the affected requests see [`Verdict::Failed`] so the embedder
//! can apply the plugin's fail strategy.

mod abi;
mod call;
mod error;
pub mod examples;
mod fetch;
mod headers;
mod host;
mod hostcalls;
mod memory;
mod metrics;
mod plugin;
mod properties;
mod shared;
mod stream;
mod vm;
mod wasi;

pub use abi::{AbiVersion, MetricKind};
pub use call::{CallFuture, CallRequest, CallResponse, Dispatcher, NoCalls};
pub use error::{Failure, LoadError};
pub use fetch::{FetchError, fetch, verify};
pub use fetch::{FetchOptions, ModuleCache, PullPolicy, fetch_with};
pub use headers::Headers;
pub use host::{CompiledModule, Host, HostError};
pub use metrics::{HISTOGRAM_BUCKETS, MetricValue, PluginMetrics};
pub use plugin::{Limits, Plugin, PluginConfig};
pub use properties::{NodeInfo, StreamInfo};
pub use stream::{LocalResponse, Stream, Verdict};
pub use vm::Instance;
