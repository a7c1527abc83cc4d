//! The host: one wasmtime engine for the process, the linker with every host function, a cache
//! of compiled modules by content, and the process-wide state plugins share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Linker, Module};

use crate::abi::AbiVersion;
use crate::call::Dispatcher;
use crate::error::LoadError;
use crate::metrics::PluginMetrics;
use crate::shared::Shared;
use crate::vm::VmState;
use crate::{NodeInfo, Plugin, PluginConfig};

/// How often the engine's epoch advances; callback deadlines are counted in these ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// What host functions of every instance share.
pub(crate) struct HostShared {
    pub(crate) engine: Engine,
    pub(crate) shared: Shared,
    pub(crate) metrics: Arc<PluginMetrics>,
    pub(crate) dispatcher: Arc<dyn Dispatcher>,
    pub(crate) node: NodeInfo,
}

/// A compiled module and the ABI it declares.
#[derive(Clone)]
pub struct CompiledModule {
    module: Module,
    abi: AbiVersion,
    sha256: String,
}

impl std::fmt::Debug for CompiledModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledModule")
            .field("abi", &self.abi)
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl CompiledModule {
    /// The ABI the module declares.
    pub fn abi(&self) -> AbiVersion {
        self.abi
    }

    /// Lower-case hex SHA-256 of the module's bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// The proxy-wasm host of a process.
pub struct Host {
    shared: Arc<HostShared>,
    linker: Linker<VmState>,
    modules: Mutex<HashMap<String, CompiledModule>>,
    stop_epoch: Arc<AtomicBool>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

/// Why the host could not be created.
#[derive(Debug, thiserror::Error)]
#[error("wasm engine: {0}")]
pub struct HostError(String);

impl Host {
    /// An engine with epoch interruption and a linker with the proxy-wasm ABI and WASI.
    pub fn new(node: NodeInfo, dispatcher: Arc<dyn Dispatcher>) -> Result<Host, HostError> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| HostError(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        crate::wasi::add_to_linker(&mut linker).map_err(|e| HostError(format!("{e:#}")))?;
        crate::hostcalls::add_to_linker(&mut linker).map_err(|e| HostError(format!("{e:#}")))?;
        let stop_epoch = Arc::new(AtomicBool::new(false));
        {
            // Epoch deadlines need a clock: a thread that advances the epoch every tick. It
            // holds only a weak handle to the engine's internals through `Engine::weak`.
            let engine = engine.weak();
            let stop = stop_epoch.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        match engine.upgrade() {
                            Some(engine) => engine.increment_epoch(),
                            None => return,
                        }
                    }
                })
                .map_err(|e| HostError(e.to_string()))?;
        }
        Ok(Host {
            shared: Arc::new(HostShared {
                engine,
                shared: Shared::default(),
                metrics: Arc::new(PluginMetrics::default()),
                dispatcher,
                node,
            }),
            linker,
            modules: Mutex::new(HashMap::new()),
            stop_epoch,
        })
    }

    /// Compiles a module, or returns the one compiled earlier from the same bytes. A module
    /// without a proxy-wasm ABI marker is refused.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledModule, LoadError> {
        let sha256 = hex(&Sha256::digest(bytes));
        if let Some(m) = self.modules.lock().expect("modules").get(&sha256) {
            return Ok(m.clone());
        }
        let module = Module::new(&self.shared.engine, bytes)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let abi = AbiVersion::detect(&module).ok_or(LoadError::NoAbiMarker)?;
        let compiled = CompiledModule {
            module,
            abi,
            sha256: sha256.clone(),
        };
        self.modules
            .lock()
            .expect("modules")
            .insert(sha256, compiled.clone());
        Ok(compiled)
    }

    /// Forgets compiled modules no plugin uses any more.
    pub fn retain_modules(&self, keep: impl Fn(&str) -> bool) {
        self.modules
            .lock()
            .expect("modules")
            .retain(|sha, _| keep(sha));
    }

    /// Starts a plugin: instantiates its module and configures its root context.
    pub fn load(&self, module: &CompiledModule, config: PluginConfig) -> Result<Plugin, LoadError> {
        let pre = self
            .linker
            .instantiate_pre(&module.module)
            .map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
        Plugin::start(self.shared.clone(), pre, module.abi, config)
    }

    /// Metrics plugins defined, for the embedder's Prometheus endpoint.
    pub fn metrics(&self) -> &Arc<PluginMetrics> {
        &self.shared.metrics
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_epoch.store(true, Ordering::Relaxed);
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
