//! One instance of a plugin module: its store, its contexts, and the calls into it.
//!
//! An instance lives long and serves many requests; each request's stream context lives in the
//! instance's linear memory, so a request stays on one instance for its whole life. Calls into
//! the guest are synchronous and short; the store sits behind a mutex that is never held across
//! an `.await`. A stream that pauses leaves its lent headers and body in the instance's state and
//! waits on a oneshot that a later callback (an HTTP call's answer, usually) resolves.
//!
//! A trap poisons the instance: every stream on it fails (per its plugin's fail strategy) and the
//! pool replaces it for later requests.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::oneshot;
use wasmtime::{Instance as WasmInstance, InstancePre, Memory, Store, StoreLimits, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::abi::{ACTION_CONTINUE, AbiVersion};
use crate::call::CallResponse;
use crate::error::{Failure, LoadError};
use crate::host::HostShared;
use crate::plugin::PluginShared;
use crate::{Headers, LocalResponse, StreamInfo};

/// Which callback is running: decides which maps and buffers a host function may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Idle,
    VmStart,
    Configure,
    Timer,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    CallResponse,
    Done,
    Log,
}

/// Which header map of a stream a callback is lent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Map {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
}

/// How a paused stream goes on.
#[derive(Debug)]
pub(crate) enum Resume {
    Continue,
    Local(LocalResponse),
    Failed(Failure),
}

/// A stream context's state inside the instance.
#[derive(Debug)]
pub(crate) struct StreamState {
    pub(crate) info: Arc<StreamInfo>,
    /// Headers lent by the embedder for the running (or paused) phase.
    pub(crate) request_headers: Option<Headers>,
    pub(crate) request_trailers: Option<Headers>,
    pub(crate) response_headers: Option<Headers>,
    pub(crate) response_trailers: Option<Headers>,
    /// Body bytes buffered while the plugin pauses body callbacks.
    pub(crate) request_body: Option<Vec<u8>>,
    pub(crate) response_body: Option<Vec<u8>>,
    /// A local response the plugin asked for.
    pub(crate) local: Option<LocalResponse>,
    /// `proxy_continue_stream` was called.
    pub(crate) resume: bool,
    /// The paused phase waiting to go on.
    pub(crate) waiter: Option<oneshot::Sender<Resume>>,
    /// Values set with `proxy_set_property`.
    pub(crate) properties: HashMap<String, Vec<u8>>,
    /// `on_done` returned false: `on_log` and `on_delete` wait for `proxy_done`.
    pub(crate) done_deferred: bool,
}

impl StreamState {
    fn new(info: Arc<StreamInfo>) -> Self {
        StreamState {
            info,
            request_headers: None,
            request_trailers: None,
            response_headers: None,
            response_trailers: None,
            request_body: None,
            response_body: None,
            local: None,
            resume: false,
            waiter: None,
            properties: HashMap::new(),
            done_deferred: false,
        }
    }
}

/// The store's data: everything host functions see.
pub(crate) struct VmState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limits: StoreLimits,
    pub(crate) abi: AbiVersion,
    pub(crate) plugin: Arc<PluginShared>,
    pub(crate) host: Arc<HostShared>,
    pub(crate) instance: Weak<Instance>,
    pub(crate) runtime: Option<tokio::runtime::Handle>,
    pub(crate) memory: Option<Memory>,
    pub(crate) allocate: Option<TypedFunc<i32, i32>>,
    pub(crate) root: u32,
    next_context: u32,
    pub(crate) streams: HashMap<u32, StreamState>,
    /// The context host functions act on: the running callback's, or the one the plugin chose
    /// with `proxy_set_effective_context`.
    pub(crate) effective: u32,
    pub(crate) phase: Phase,
    /// The answer being delivered by `on_http_call_response`.
    pub(crate) call_response: Option<CallResponse>,
    /// Status of the call being delivered: (code, message), for `proxy_get_status`.
    pub(crate) call_status: (u32, String),
    /// Tokens of HTTP calls in flight; answers go to the root context, as in Envoy.
    pub(crate) calls: HashSet<u32>,
    pub(crate) next_token: u32,
    /// Streams whose state a host function changed (continue, local response, done).
    pub(crate) touched: Vec<u32>,
    /// Streams that called `proxy_done` after deferring.
    pub(crate) finished: Vec<u32>,
    /// `proxy_set_tick_period_milliseconds`: the period and a generation that stops old timers.
    pub(crate) tick: Option<(Duration, u64)>,
    pub(crate) tick_changed: bool,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("plugin", &self.plugin.name)
            .field("abi", &self.abi)
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl VmState {
    /// The effective stream, if the effective context is one.
    pub(crate) fn stream(&mut self) -> Option<&mut StreamState> {
        self.streams.get_mut(&self.effective)
    }
}

/// The callbacks an instance exports, resolved once.
struct Exports {
    on_context_create: TypedFunc<(i32, i32), ()>,
    on_vm_start: Option<TypedFunc<(i32, i32), i32>>,
    on_configure: Option<TypedFunc<(i32, i32), i32>>,
    on_tick: Option<TypedFunc<i32, ()>>,
    on_request_headers: Option<HeadersCallback>,
    on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_request_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_response_headers: Option<HeadersCallback>,
    on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_http_call_response: Option<CallResponseCallback>,
    on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
}

/// `(root, token, headers, body size, trailers)`.
type CallResponseCallback = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// ABI 0.1.0 headers callbacks take no end-of-stream flag.
#[derive(Clone)]
enum HeadersCallback {
    V1(TypedFunc<(i32, i32), i32>),
    V2(TypedFunc<(i32, i32, i32), i32>),
}

impl HeadersCallback {
    fn call(
        self,
        store: &mut Store<VmState>,
        ctx: u32,
        n: usize,
        eos: bool,
    ) -> wasmtime::Result<i32> {
        match self {
            HeadersCallback::V1(f) => f.call(store, (ctx as i32, n as i32)),
            HeadersCallback::V2(f) => f.call(store, (ctx as i32, n as i32, i32::from(eos))),
        }
    }
}

impl Exports {
    fn resolve(
        store: &mut Store<VmState>,
        instance: &WasmInstance,
        abi: AbiVersion,
    ) -> Result<Exports, LoadError> {
        fn optional<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
            store: &mut Store<VmState>,
            instance: &WasmInstance,
            name: &'static str,
        ) -> Result<Option<TypedFunc<P, R>>, LoadError> {
            match instance.get_func(&mut *store, name) {
                None => Ok(None),
                Some(f) => f.typed(&*store).map(Some).map_err(|e| LoadError::Export {
                    name,
                    why: e.to_string(),
                }),
            }
        }
        let headers =
            |store: &mut Store<VmState>, name| -> Result<Option<HeadersCallback>, LoadError> {
                Ok(if abi == AbiVersion::V0_1_0 {
                    optional(store, instance, name)?.map(HeadersCallback::V1)
                } else {
                    optional(store, instance, name)?.map(HeadersCallback::V2)
                })
            };
        Ok(Exports {
            on_context_create: optional(store, instance, "proxy_on_context_create")?.ok_or(
                LoadError::Export {
                    name: "proxy_on_context_create",
                    why: "missing".into(),
                },
            )?,
            on_vm_start: optional(store, instance, "proxy_on_vm_start")?,
            on_configure: optional(store, instance, "proxy_on_configure")?,
            on_tick: optional(store, instance, "proxy_on_tick")?,
            on_request_headers: headers(store, "proxy_on_request_headers")?,
            on_request_body: optional(store, instance, "proxy_on_request_body")?,
            on_request_trailers: optional(store, instance, "proxy_on_request_trailers")?,
            on_response_headers: headers(store, "proxy_on_response_headers")?,
            on_response_body: optional(store, instance, "proxy_on_response_body")?,
            on_response_trailers: optional(store, instance, "proxy_on_response_trailers")?,
            on_http_call_response: optional(store, instance, "proxy_on_http_call_response")?,
            on_queue_ready: optional(store, instance, "proxy_on_queue_ready")?,
            on_done: optional(store, instance, "proxy_on_done")?,
            on_log: optional(store, instance, "proxy_on_log")?,
            on_delete: optional(store, instance, "proxy_on_delete")?,
        })
    }
}

/// What a callback decided for its stream.
#[derive(Debug)]
pub(crate) enum Step {
    Continue,
    Pause,
    Local(LocalResponse),
}

/// A callback's decision, what it hands back now, and what to wait on if it paused.
#[derive(Debug)]
pub(crate) struct Outcome<T> {
    pub(crate) step: Step,
    pub(crate) back: Option<T>,
    pub(crate) waiter: Option<oneshot::Receiver<Resume>>,
}

impl<T> Outcome<T> {
    fn now(step: Step, back: Option<T>) -> Self {
        Outcome {
            step,
            back,
            waiter: None,
        }
    }

    /// The stream keeps what it was lent and waits to be continued or answered.
    fn paused(stream: &mut StreamState) -> Self {
        let (tx, rx) = oneshot::channel();
        stream.waiter = Some(tx);
        Outcome {
            step: Step::Pause,
            back: None,
            waiter: Some(rx),
        }
    }
}

/// A trap, with the message the engine gave.
#[derive(Debug, Clone)]
pub(crate) struct Trap(pub(crate) String);

impl From<wasmtime::Error> for Trap {
    fn from(e: wasmtime::Error) -> Self {
        Trap(format!("{e:#}"))
    }
}

/// The guest half: store and exports.
pub(crate) struct Vm {
    pub(crate) store: Store<VmState>,
    exports: Exports,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.store.data().fmt(f)
    }
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// A running instance of a plugin.
#[derive(Debug)]
pub struct Instance {
    vm: Mutex<Vm>,
    poisoned: AtomicBool,
    pub(crate) plugin: Arc<PluginShared>,
    id: u64,
}

impl Instance {
    /// Instantiates the module and runs the plugin's start: `_initialize` (or `_start`), then the
    /// root context's `on_context_create`, `on_vm_start` and `on_configure`.
    pub(crate) fn start(
        host: &Arc<HostShared>,
        plugin: &Arc<PluginShared>,
        pre: &InstancePre<VmState>,
        abi: AbiVersion,
    ) -> Result<Arc<Instance>, LoadError> {
        let state = VmState {
            wasi: crate::wasi::context(&plugin.env),
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(plugin.limits.memory_bytes)
                .instances(1)
                .tables(4)
                .table_elements(100_000)
                .build(),
            abi,
            plugin: plugin.clone(),
            host: host.clone(),
            instance: Weak::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            memory: None,
            allocate: None,
            root: 0,
            next_context: 1,
            streams: HashMap::new(),
            effective: 0,
            phase: Phase::Idle,
            call_response: None,
            call_status: (0, String::new()),
            calls: HashSet::new(),
            next_token: 1,
            touched: Vec::new(),
            finished: Vec::new(),
            tick: None,
            tick_changed: false,
        };
        let mut store = Store::new(&host.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        // Starting may compile-in lazily and run the SDK's init: allow ten callback budgets.
        store.set_epoch_deadline(plugin.limits.deadline_ticks() * 10);
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(LoadError::Export {
                name: "memory",
                why: "missing".into(),
            })?;
        let allocate = match instance
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
        {
            Ok(f) => f,
            Err(_) => instance
                .get_typed_func::<i32, i32>(&mut store, "malloc")
                .map_err(|_| LoadError::Export {
                    name: "proxy_on_memory_allocate",
                    why:
                        "missing (and no malloc either): the host cannot hand memory to the plugin"
                            .into(),
                })?,
        };
        store.data_mut().memory = Some(memory);
        store.data_mut().allocate = Some(allocate);
        let exports = Exports::resolve(&mut store, &instance, abi)?;
        // The instance exists before any guest code runs, so what the plugin registers while
        // starting (a shared queue, a timer) can find it.
        let started = Arc::new_cyclic(|me| {
            store.data_mut().instance = me.clone();
            Instance {
                vm: Mutex::new(Vm { store, exports }),
                poisoned: AtomicBool::new(false),
                plugin: plugin.clone(),
                id: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            }
        });
        let r = started.initialize(instance);
        if r.is_err() {
            // Never started: no root context to end when it drops.
            started.poisoned.store(true, Ordering::Release);
        }
        r?;
        tracing::debug!(plugin = %plugin.name, instance = started.id, %abi, "plugin instance started");
        Ok(started)
    }

    /// `_initialize` (or `_start`), then the root context: create, `on_vm_start`,
    /// `on_configure`.
    fn initialize(&self, instance: WasmInstance) -> Result<(), LoadError> {
        let mut vm = self.lock();
        let vm = &mut *vm;
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut vm.store, "_initialize") {
            init.call(&mut vm.store, ())
                .map_err(|e| LoadError::Trap(format!("{e:#}")))?;
        } else if let Ok(start) = instance.get_typed_func::<(), ()>(&mut vm.store, "_start") {
            // Command-style modules (TinyGo, Emscripten) run main and may exit(0).
            if let Err(e) = start.call(&mut vm.store, ()) {
                match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                    Some(wasmtime_wasi::I32Exit(0)) => {}
                    _ => return Err(LoadError::Trap(format!("{e:#}"))),
                }
            }
        }
        let root = vm.store.data_mut().next_context();
        vm.store.data_mut().root = root;
        let vm_config_len = self.plugin.vm_config.len() as i32;
        let config_len = self.plugin.config.len() as i32;
        let trap = |e: Trap| LoadError::Trap(e.0);
        vm.guest(root, Phase::Idle, |s, x| {
            x.on_context_create.call(s, (root as i32, 0))
        })
        .map_err(trap)?;
        if let Some(f) = vm.exports.on_vm_start.clone()
            && vm
                .guest(root, Phase::VmStart, |s, _| {
                    f.call(s, (root as i32, vm_config_len))
                })
                .map_err(trap)?
                == 0
        {
            return Err(LoadError::VmStartRefused);
        }
        if let Some(f) = vm.exports.on_configure.clone()
            && vm
                .guest(root, Phase::Configure, |s, _| {
                    f.call(s, (root as i32, config_len))
                })
                .map_err(trap)?
                == 0
        {
            return Err(LoadError::ConfigureRefused);
        }
        vm.settle();
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Vm> {
        // A panic while the lock is held is a host bug that already took the task down; the VM
        // state is still consistent between guest calls, so keep serving.
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Marks the instance dead after a trap and fails every stream waiting on it.
    pub(crate) fn poison(&self, vm: &mut Vm, trap: &Trap) {
        if self.poisoned.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(
            plugin = %self.plugin.name,
            instance = self.id,
            error = %trap.0,
            "plugin instance trapped; it is replaced and its streams fail per the plugin's fail strategy"
        );
        self.plugin.traps.fetch_add(1, Ordering::Relaxed);
        // Stream states stay, so their lent headers and bodies can be handed back.
        for stream in vm.store.data_mut().streams.values_mut() {
            if let Some(w) = stream.waiter.take() {
                let _ = w.send(Resume::Failed(Failure::Trapped(trap.0.clone())));
            }
        }
    }

    /// Creates a stream context for a request.
    pub(crate) fn create_stream(&self, info: Arc<StreamInfo>) -> Result<u32, Failure> {
        let mut vm = self.lock();
        self.check()?;
        let state = vm.store.data_mut();
        let ctx = state.next_context();
        let root = state.root;
        state.streams.insert(ctx, StreamState::new(info));
        let r = vm.guest(ctx, Phase::Idle, |s, x| {
            x.on_context_create.call(s, (ctx as i32, root as i32))
        });
        self.after(&mut vm, r).map(|_| ctx)
    }

    fn check(&self) -> Result<(), Failure> {
        if self.is_poisoned() {
            Err(Failure::Trapped(
                "instance was poisoned by an earlier trap".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Finishes a guest call: a trap poisons; otherwise streams touched by host functions are
    /// resolved.
    fn after<T>(&self, vm: &mut Vm, r: Result<T, Trap>) -> Result<T, Failure> {
        match r {
            Ok(v) => {
                vm.settle();
                Ok(v)
            }
            Err(trap) => {
                self.poison(vm, &trap);
                Err(Failure::Trapped(trap.0))
            }
        }
    }

    /// Runs a headers (or trailers) callback with the map lent; returns it unless the stream
    /// paused.
    pub(crate) fn headers(
        &self,
        ctx: u32,
        which: Map,
        headers: Headers,
        eos: bool,
    ) -> Result<Outcome<Headers>, Failure> {
        let mut vm = self.lock();
        if let Err(failure) = self.check() {
            // Lend the headers anyway so the stream takes them back: the embedder may fail open.
            if let Some(stream) = vm.store.data_mut().streams.get_mut(&ctx) {
                *lent_headers(stream, which) = Some(headers);
            }
            return Err(failure);
        }
        let n = headers.len();
        let exports = &vm.exports;
        let (callback, phase) = match which {
            Map::RequestHeaders => (exports.on_request_headers.clone(), Phase::RequestHeaders),
            Map::ResponseHeaders => (exports.on_response_headers.clone(), Phase::ResponseHeaders),
            // Trailers callbacks take `(context, count)`: the shape of an ABI 0.1.0 headers one.
            Map::RequestTrailers => (
                exports.on_request_trailers.clone().map(HeadersCallback::V1),
                Phase::RequestTrailers,
            ),
            Map::ResponseTrailers => (
                exports
                    .on_response_trailers
                    .clone()
                    .map(HeadersCallback::V1),
                Phase::ResponseTrailers,
            ),
        };
        let Some(callback) = callback else {
            return Ok(Outcome::now(Step::Continue, Some(headers)));
        };
        let Some(stream) = vm.store.data_mut().streams.get_mut(&ctx) else {
            return Err(Failure::Trapped("stream context is gone".into()));
        };
        *lent_headers(stream, which) = Some(headers);
        let r = vm.guest(ctx, phase, |s, _| callback.call(s, ctx, n, eos));
        let action = self.after_own(&mut vm, r)?;
        let stream = vm
            .store
            .data_mut()
            .streams
            .get_mut(&ctx)
            .expect("stream present");
        let step = decide(stream, action);
        Ok(match step {
            Step::Pause => Outcome::paused(stream),
            step => Outcome::now(step, lent_headers(stream, which).take()),
        })
    }

    /// Takes back a map lent to a stream that paused and has now resumed.
    pub(crate) fn take_headers(&self, ctx: u32, which: Map) -> Option<Headers> {
        let mut vm = self.lock();
        let stream = vm.store.data_mut().streams.get_mut(&ctx)?;
        lent_headers(stream, which).take()
    }

    /// Runs a body callback on one more chunk. The plugin sees everything buffered so far; on
    /// Continue the whole buffer is handed back.
    pub(crate) fn body(
        &self,
        ctx: u32,
        response: bool,
        chunk: &[u8],
        eos: bool,
    ) -> Result<Outcome<Vec<u8>>, Failure> {
        let mut vm = self.lock();
        let (callback, phase) = if response {
            (vm.exports.on_response_body.clone(), Phase::ResponseBody)
        } else {
            (vm.exports.on_request_body.clone(), Phase::RequestBody)
        };
        let limit = self.plugin.limits.body_bytes;
        let Some(stream) = vm.store.data_mut().streams.get_mut(&ctx) else {
            return Err(Failure::Trapped("stream context is gone".into()));
        };
        let buffer = lent_body(stream, response).get_or_insert_with(Vec::new);
        buffer.extend_from_slice(chunk);
        // Checked after buffering so a failed stream takes back everything it was lent.
        self.check()?;
        let Some(callback) = callback else {
            return Ok(Outcome::now(
                Step::Continue,
                lent_body(stream, response).take(),
            ));
        };
        let size = buffer.len();
        if size > limit {
            lent_body(stream, response).take();
            return Ok(Outcome::now(
                Step::Local(LocalResponse::too_large(response)),
                None,
            ));
        }
        let r = vm.guest(ctx, phase, |s, _| {
            callback.call(s, (ctx as i32, size as i32, i32::from(eos)))
        });
        let action = self.after_own(&mut vm, r)?;
        let stream = vm
            .store
            .data_mut()
            .streams
            .get_mut(&ctx)
            .expect("stream present");
        let step = decide(stream, action);
        Ok(match step {
            // Not at the end: keep buffering, the next chunk calls again.
            Step::Pause if !eos => Outcome::now(Step::Pause, None),
            Step::Pause => Outcome::paused(stream),
            step => Outcome::now(step, lent_body(stream, response).take()),
        })
    }

    /// Takes back the body buffered by a stream that paused at end of stream and has resumed.
    pub(crate) fn take_body(&self, ctx: u32, response: bool) -> Option<Vec<u8>> {
        let mut vm = self.lock();
        let stream = vm.store.data_mut().streams.get_mut(&ctx)?;
        lent_body(stream, response).take()
    }

    /// Like `after`, but the running stream's own waiter is not resolved by `settle` (its
    /// caller decides from the returned action).
    fn after_own(&self, vm: &mut Vm, r: Result<i32, Trap>) -> Result<i32, Failure> {
        match r {
            Ok(action) => {
                vm.settle();
                Ok(action)
            }
            Err(trap) => {
                self.poison(vm, &trap);
                Err(Failure::Trapped(trap.0))
            }
        }
    }

    /// Ends a stream: `on_done`, `on_log`, `on_delete`.
    pub(crate) fn finish_stream(&self, ctx: u32) {
        let mut vm = self.lock();
        if self.is_poisoned() {
            vm.store.data_mut().streams.remove(&ctx);
            return;
        }
        let Some(stream) = vm.store.data_mut().streams.get_mut(&ctx) else {
            return;
        };
        // A paused phase that never resumed: its waiter is gone with the request.
        stream.waiter = None;
        let r = match vm.exports.on_done.clone() {
            Some(f) => vm.guest(ctx, Phase::Done, |s, _| f.call(s, ctx as i32)),
            None => Ok(1),
        };
        match self.after(&mut vm, r) {
            Ok(0) => {
                if let Some(s) = vm.store.data_mut().streams.get_mut(&ctx) {
                    s.done_deferred = true;
                }
            }
            Ok(_) => {
                let r = vm.log_and_delete(ctx);
                let _ = self.after(&mut vm, r);
            }
            Err(_) => {}
        }
    }

    /// Delivers an HTTP call's answer to the root context.
    pub(crate) fn deliver_call(&self, token: u32, result: Result<CallResponse, String>) {
        let mut vm = self.lock();
        if self.is_poisoned() || !vm.store.data_mut().calls.remove(&token) {
            return;
        }
        let Some(f) = vm.exports.on_http_call_response.clone() else {
            return;
        };
        let root = vm.store.data().root;
        let (counts, status) = match &result {
            Ok(resp) => (
                (resp.headers.len(), resp.body.len(), resp.trailers.len()),
                (0, String::new()),
            ),
            Err(why) => {
                tracing::debug!(plugin = %self.plugin.name, token, error = %why, "plugin http call failed");
                // Envoy reports a failed callout with no headers; the status is "reset".
                ((0, 0, 0), (11, why.clone()))
            }
        };
        let state = vm.store.data_mut();
        state.call_response = result.ok();
        state.call_status = status;
        let r = vm.guest(root, Phase::CallResponse, |s, _| {
            f.call(
                s,
                (
                    root as i32,
                    token as i32,
                    counts.0 as i32,
                    counts.1 as i32,
                    counts.2 as i32,
                ),
            )
        });
        vm.store.data_mut().call_response = None;
        let _ = self.after(&mut vm, r);
    }

    /// Runs `on_tick` if the timer of `generation` is still current; false stops the timer.
    pub(crate) fn tick(&self, generation: u64) -> bool {
        let mut vm = self.lock();
        if self.is_poisoned() || vm.store.data().tick.map(|t| t.1) != Some(generation) {
            return false;
        }
        let Some(f) = vm.exports.on_tick.clone() else {
            return false;
        };
        let root = vm.store.data().root;
        let r = vm.guest(root, Phase::Timer, |s, _| f.call(s, root as i32));
        self.after(&mut vm, r).is_ok()
    }

    /// Runs `on_queue_ready` for a queue this instance registered.
    pub(crate) fn queue_ready(&self, queue: u32) {
        let mut vm = self.lock();
        if self.is_poisoned() {
            return;
        }
        let Some(f) = vm.exports.on_queue_ready.clone() else {
            return;
        };
        let root = vm.store.data().root;
        let r = vm.guest(root, Phase::Timer, |s, _| {
            f.call(s, (root as i32, queue as i32))
        });
        let _ = self.after(&mut vm, r);
    }

    /// Number of live stream contexts.
    pub(crate) fn live_streams(&self) -> usize {
        self.lock().store.data().streams.len()
    }
}

impl Drop for Instance {
    /// The last stream and the pool let go: end the root context (`on_done`, `on_delete`), as
    /// Envoy does when a plugin is removed and its streams have drained.
    fn drop(&mut self) {
        if *self.poisoned.get_mut() {
            return;
        }
        let vm = self.vm.get_mut().unwrap_or_else(|p| p.into_inner());
        let root = vm.store.data().root;
        vm.store.data_mut().tick = None;
        if let Some(f) = vm.exports.on_done.clone() {
            let _ = vm.guest(root, Phase::Done, |s, _| f.call(s, root as i32));
        }
        if let Some(f) = vm.exports.on_delete.clone() {
            let _ = vm.guest(root, Phase::Log, |s, _| f.call(s, root as i32));
        }
        tracing::debug!(plugin = %self.plugin.name, instance = self.id, "plugin instance stopped");
    }
}

fn lent_headers(stream: &mut StreamState, which: Map) -> &mut Option<Headers> {
    match which {
        Map::RequestHeaders => &mut stream.request_headers,
        Map::RequestTrailers => &mut stream.request_trailers,
        Map::ResponseHeaders => &mut stream.response_headers,
        Map::ResponseTrailers => &mut stream.response_trailers,
    }
}

fn lent_body(stream: &mut StreamState, response: bool) -> &mut Option<Vec<u8>> {
    if response {
        &mut stream.response_body
    } else {
        &mut stream.request_body
    }
}

/// What a callback's return value and the host functions it called mean for its stream. A local
/// response wins (Envoy forces a stop after `send_local_response`); a `continue_stream` inside
/// the callback itself is moot.
fn decide(stream: &mut StreamState, action: i32) -> Step {
    stream.resume = false;
    if let Some(local) = stream.local.take() {
        return Step::Local(local);
    }
    if action == ACTION_CONTINUE {
        Step::Continue
    } else {
        Step::Pause
    }
}

impl Vm {
    /// Calls into the guest with `ctx` effective and `phase` set, under the epoch deadline.
    fn guest<R>(
        &mut self,
        ctx: u32,
        phase: Phase,
        f: impl FnOnce(&mut Store<VmState>, &Exports) -> wasmtime::Result<R>,
    ) -> Result<R, Trap> {
        let ticks = self.store.data().plugin.limits.deadline_ticks();
        self.store.set_epoch_deadline(ticks);
        let state = self.store.data_mut();
        state.effective = ctx;
        state.phase = phase;
        let r = f(&mut self.store, &self.exports);
        let state = self.store.data_mut();
        state.phase = Phase::Idle;
        state.effective = 0;
        r.map_err(Trap::from)
    }

    fn log_and_delete(&mut self, ctx: u32) -> Result<(), Trap> {
        if let Some(f) = self.exports.on_log.clone() {
            self.guest(ctx, Phase::Log, |s, _| f.call(s, ctx as i32))?;
        }
        if let Some(f) = self.exports.on_delete.clone() {
            self.guest(ctx, Phase::Log, |s, _| f.call(s, ctx as i32))?;
        }
        self.store.data_mut().streams.remove(&ctx);
        Ok(())
    }

    /// Resolves waiting streams that a host function continued or answered, finishes streams
    /// that called `proxy_done`, and (re)starts the tick timer.
    fn settle(&mut self) {
        let state = self.store.data_mut();
        for ctx in std::mem::take(&mut state.touched) {
            let Some(stream) = state.streams.get_mut(&ctx) else {
                continue;
            };
            let Some(waiter) = stream.waiter.take() else {
                continue;
            };
            if let Some(local) = stream.local.take() {
                let _ = waiter.send(Resume::Local(local));
            } else if std::mem::take(&mut stream.resume) {
                let _ = waiter.send(Resume::Continue);
            } else {
                stream.waiter = Some(waiter);
            }
        }
        for ctx in std::mem::take(&mut state.finished) {
            // A trap here is found by the next call; nothing else waits on this context.
            let _ = self.log_and_delete(ctx);
        }
        let state = self.store.data_mut();
        if std::mem::take(&mut state.tick_changed)
            && let Some((period, generation)) = state.tick
            && let Some(runtime) = &state.runtime
        {
            let instance = state.instance.clone();
            runtime.spawn(async move {
                let mut interval = tokio::time::interval(period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                interval.tick().await;
                loop {
                    interval.tick().await;
                    let Some(instance) = instance.upgrade() else {
                        return;
                    };
                    if !instance.tick(generation) {
                        return;
                    }
                }
            });
        }
    }
}

impl VmState {
    fn next_context(&mut self) -> u32 {
        let id = self.next_context;
        self.next_context += 1;
        id
    }

    /// Registers a call and returns its token.
    pub(crate) fn new_call(&mut self) -> u32 {
        loop {
            let token = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(1);
            if self.calls.insert(token) {
                return token;
            }
        }
    }
}
