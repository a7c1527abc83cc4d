//! Errors of loading and running plugins.

/// Why a plugin could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The module is not valid WebAssembly or failed to compile.
    #[error("module does not compile: {0}")]
    Compile(String),
    /// The module exports no `proxy_abi_version_*` marker.
    #[error(
        "module is not a proxy-wasm plugin: it exports no proxy_abi_version_0_1_0, 0_2_0 or 0_2_1 marker"
    )]
    NoAbiMarker,
    /// A required export is missing or has the wrong type.
    #[error("module export {name}: {why}")]
    Export {
        /// The export.
        name: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// An import the host does not provide, or instantiation failed otherwise.
    #[error("module does not instantiate: {0}")]
    Instantiate(String),
    /// The module trapped while starting.
    #[error("module trapped while starting: {0}")]
    Trap(String),
    /// `proxy_on_vm_start` returned false.
    #[error("proxy_on_vm_start refused to start")]
    VmStartRefused,
    /// `proxy_on_configure` returned false.
    #[error("proxy_on_configure rejected the plugin configuration")]
    ConfigureRefused,
    /// The module could not be fetched or failed its checksum.
    #[error("{0}")]
    Fetch(#[from] crate::fetch::FetchError),
}

/// Why a plugin's callback failed; the stream then follows the plugin's fail strategy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    /// The instance trapped (a panic, an illegal instruction, a runaway loop, memory exhausted)
    /// in this stream or another one it served.
    #[error("plugin instance failed: {0}")]
    Trapped(String),
    /// The plugin was never loaded.
    #[error("plugin is not loaded: {0}")]
    NotLoaded(String),
}
