//! The proxy-wasm ABI's numbers: status codes, enums and version markers.
//!
//! Values are Envoy's, not the spec prose's: SDKs panic (a trap) on a status they do not expect,
//! so each host function must answer exactly what Envoy answers.

/// `proxy_status_t`, what every host function returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
}

impl From<Status> for i32 {
    fn from(s: Status) -> i32 {
        s as i32
    }
}

/// The ABI a module was built for, read from its `proxy_abi_version_*` export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AbiVersion {
    /// 0.1.0: headers callbacks without end-of-stream, `proxy_get_configuration`,
    /// `proxy_continue_request`/`_response`, and an empty value for a missing header.
    V0_1_0,
    /// 0.2.0: `proxy_continue_stream`, configuration through buffers.
    V0_2_0,
    /// 0.2.1: adds `proxy_get_log_level`.
    V0_2_1,
}

impl AbiVersion {
    /// The version whose marker `module` exports, newest first.
    pub(crate) fn detect(module: &wasmtime::Module) -> Option<AbiVersion> {
        [
            ("proxy_abi_version_0_2_1", AbiVersion::V0_2_1),
            ("proxy_abi_version_0_2_0", AbiVersion::V0_2_0),
            ("proxy_abi_version_0_1_0", AbiVersion::V0_1_0),
        ]
        .into_iter()
        .find(|(marker, _)| module.get_export(marker).is_some())
        .map(|(_, v)| v)
    }
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AbiVersion::V0_1_0 => "0.1.0",
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        })
    }
}

/// `proxy_action_t`. SDKs for other hosts may return Envoy's wider values (StopIteration,
/// StopAllIterationAndBuffer...); anything but 0 stops the stream.
pub(crate) const ACTION_CONTINUE: i32 = 0;

/// `proxy_map_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    CallResponseHeaders,
    CallResponseTrailers,
}

impl MapType {
    pub(crate) fn from_raw(raw: i32) -> Option<MapType> {
        Some(match raw {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            6 => MapType::CallResponseHeaders,
            7 => MapType::CallResponseTrailers,
            // gRPC metadata (4, 5) is never available: we make no gRPC calls.
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BufferType {
    RequestBody,
    ResponseBody,
    CallResponseBody,
    VmConfiguration,
    PluginConfiguration,
}

impl BufferType {
    pub(crate) fn from_raw(raw: i32) -> Option<BufferType> {
        Some(match raw {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            4 => BufferType::CallResponseBody,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            // Downstream/upstream data (TCP plugins), gRPC messages, foreign call arguments.
            _ => return None,
        })
    }
}

/// `proxy_stream_type_t` for HTTP plugins.
pub(crate) const STREAM_REQUEST: i32 = 0;
pub(crate) const STREAM_RESPONSE: i32 = 1;

/// `proxy_log_level_t` to tracing's levels.
pub(crate) fn log_level(raw: i32) -> Option<tracing::Level> {
    Some(match raw {
        0 => tracing::Level::TRACE,
        1 => tracing::Level::DEBUG,
        2 => tracing::Level::INFO,
        3 => tracing::Level::WARN,
        4 | 5 => tracing::Level::ERROR,
        _ => return None,
    })
}

/// The proxy's current log level as a `proxy_log_level_t`.
pub(crate) fn current_log_level() -> i32 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => 0,
        LevelFilter::DEBUG => 1,
        LevelFilter::INFO => 2,
        LevelFilter::WARN => 3,
        LevelFilter::ERROR => 4,
        _ => 5,
    }
}

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// Only ever goes up.
    Counter,
    /// Goes up and down, or is set.
    Gauge,
    /// Records observations.
    Histogram,
}

impl MetricKind {
    pub(crate) fn from_raw(raw: i32) -> Option<MetricKind> {
        Some(match raw {
            0 => MetricKind::Counter,
            1 => MetricKind::Gauge,
            2 => MetricKind::Histogram,
            _ => return None,
        })
    }
}
