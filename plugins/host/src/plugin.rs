//! A loaded plugin: one compiled module, its configuration, and a small pool of long-lived
//! instances that requests are spread over.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::InstancePre;

use crate::abi::AbiVersion;
use crate::error::{Failure, LoadError};
use crate::host::{EPOCH_TICK, HostShared};
use crate::vm::{Instance, VmState};
use crate::{Stream, StreamInfo};

/// Resource bounds for each instance of a plugin.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Linear memory an instance may grow to; `memory.grow` beyond fails inside the guest.
    pub memory_bytes: usize,
    /// Longest a single callback may run before it is interrupted (a trap).
    pub callback_deadline: Duration,
    /// Largest body a plugin may buffer by pausing body callbacks (413 beyond).
    pub body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            callback_deadline: Duration::from_millis(100),
            body_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// The callback deadline in epoch ticks, rounded up, plus one for the tick in progress.
    pub(crate) fn deadline_ticks(&self) -> u64 {
        let tick = EPOCH_TICK.as_micros().max(1);
        (self.callback_deadline.as_micros().div_ceil(tick) as u64).max(1) + 1
    }
}

/// What a plugin is, beyond its module.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// `<namespace>.<name>` of the WasmPlugin (the `plugin_name` property).
    pub name: String,
    /// The root context id (`pluginName`).
    pub root_id: String,
    /// `pluginConfig` as JSON bytes, served to `on_configure`.
    pub config: Vec<u8>,
    /// Environment the module sees through WASI.
    pub env: Vec<(String, String)>,
    /// Resource bounds.
    pub limits: Limits,
    /// How many instances serve requests; each request stays on one.
    pub instances: usize,
}

impl PluginConfig {
    /// A plugin with default limits and one instance per available core.
    pub fn new(
        name: impl Into<String>,
        root_id: impl Into<String>,
        config: impl Into<Vec<u8>>,
    ) -> Self {
        PluginConfig {
            name: name.into(),
            root_id: root_id.into(),
            config: config.into(),
            env: Vec::new(),
            limits: Limits::default(),
            instances: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// The parts of a plugin that host functions see.
#[derive(Debug)]
pub(crate) struct PluginShared {
    pub(crate) name: String,
    pub(crate) root_id: String,
    pub(crate) config: Vec<u8>,
    pub(crate) vm_config: Vec<u8>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) limits: Limits,
    /// Traps across all instances.
    pub(crate) traps: AtomicU64,
}

/// A plugin ready to serve requests.
#[derive(Debug, Clone)]
pub struct Plugin {
    inner: Arc<PluginInner>,
}

struct PluginInner {
    shared: Arc<PluginShared>,
    host: Arc<HostShared>,
    pre: InstancePre<VmState>,
    abi: AbiVersion,
    /// Up to `size` instances, started on demand; a poisoned one is replaced when picked.
    instances: Mutex<Vec<Arc<Instance>>>,
    size: usize,
    next: AtomicUsize,
}

impl std::fmt::Debug for PluginInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.shared.name)
            .field("abi", &self.abi)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// Starts the first instance now, so a module that cannot start fails here; the others
    /// start on first use.
    pub(crate) fn start(
        host: Arc<HostShared>,
        pre: InstancePre<VmState>,
        abi: AbiVersion,
        config: PluginConfig,
    ) -> Result<Plugin, LoadError> {
        let shared = Arc::new(PluginShared {
            name: config.name,
            root_id: config.root_id,
            config: config.config,
            vm_config: Vec::new(),
            env: config.env,
            limits: config.limits,
            traps: AtomicU64::new(0),
        });
        let first = Instance::start(&host, &shared, &pre, abi)?;
        Ok(Plugin {
            inner: Arc::new(PluginInner {
                shared,
                host,
                pre,
                abi,
                instances: Mutex::new(vec![first]),
                size: config.instances.max(1),
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// `<namespace>.<name>`.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// The ABI the module was built for.
    pub fn abi(&self) -> AbiVersion {
        self.inner.abi
    }

    /// Traps so far, across instances.
    pub fn traps(&self) -> u64 {
        self.inner.shared.traps.load(Ordering::Relaxed)
    }

    /// Starts a request on one instance: its stream context is created now.
    pub fn stream(&self, info: Arc<StreamInfo>) -> Result<Stream, Failure> {
        let instance = self.pick()?;
        let ctx = instance.create_stream(info)?;
        Ok(Stream::new(instance, ctx))
    }

    /// Stream contexts alive across the pool's instances.
    pub fn live_streams(&self) -> usize {
        let instances = self.inner.instances.lock().expect("instances").clone();
        instances.iter().map(|i| i.live_streams()).sum()
    }

    /// Round-robin over the pool, growing it up to its size and replacing poisoned instances.
    fn pick(&self) -> Result<Arc<Instance>, Failure> {
        let inner = &*self.inner;
        let slot = inner.next.fetch_add(1, Ordering::Relaxed) % inner.size;
        let mut instances = inner.instances.lock().expect("instances");
        if slot < instances.len() && !instances[slot].is_poisoned() {
            return Ok(instances[slot].clone());
        }
        let fresh = Instance::start(&inner.host, &inner.shared, &inner.pre, inner.abi)
            .map_err(|e| Failure::NotLoaded(e.to_string()))?;
        if slot < instances.len() {
            instances[slot] = fresh.clone();
        } else {
            instances.push(fresh.clone());
        }
        Ok(fresh)
    }
}
