//! The `env.proxy_*` host functions of ABI 0.2.1, plus the 0.1.0 names older SDKs import.
//!
//! Every function a proxy-wasm SDK may import is defined, because wasmtime refuses a module with
//! an unresolved import and the Rust SDK imports nearly all of them. Statuses follow Envoy: SDKs
//! panic on a status they do not expect. What we do not support (gRPC calls, foreign functions)
//! answers as Envoy answers for an unknown cluster or function, never with a trap.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use wasmtime::{Caller, Linker};

use crate::LocalResponse;
use crate::abi::{
    self, AbiVersion, BufferType, MapType, MetricKind, STREAM_REQUEST, STREAM_RESPONSE, Status,
};
use crate::call::CallRequest;
use crate::headers::{Headers, decode_pairs};
use crate::memory::{give, read, read_str, with_bytes, with_two, write_u32, write_u64};
use crate::properties::View;
use crate::vm::{Phase, VmState};

type C<'a> = Caller<'a, VmState>;
type R = wasmtime::Result<i32>;

/// Turns a host function's outcome into its status code.
fn status(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => Status::Ok.into(),
        Err(s) => s.into(),
    }
}

/// Like [`status`] for functions that may also trap in the guest allocator.
fn status_or_trap(r: wasmtime::Result<Result<(), Status>>) -> R {
    r.map(status)
}

/// Calls made by a plugin with no upper bound of their own are cut after this.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap("env", "proxy_log", proxy_log)?;
    linker.func_wrap("env", "proxy_get_log_level", |mut c: C<'_>, ptr: i32| {
        status(write_u32(&mut c, ptr, abi::current_log_level() as u32))
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ptr: i32| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            status(write_u64(&mut c, ptr, now))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: i32| {
            let state = c.data_mut();
            let generation = state.tick.map_or(1, |t| t.1 + 1);
            state.tick = (ms > 0).then(|| (Duration::from_millis(ms as u32 as u64), generation));
            state.tick_changed = true;
            Status::Ok as i32
        },
    )?;
    linker.func_wrap("env", "proxy_get_buffer_bytes", proxy_get_buffer_bytes)?;
    linker.func_wrap("env", "proxy_set_buffer_bytes", proxy_set_buffer_bytes)?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: C<'_>, kind: i32, len_ptr: i32, flags_ptr: i32| {
            let len = match BufferType::from_raw(kind) {
                None => return Status::BadArgument as i32,
                Some(kind) => match buffer(c.data_mut(), kind) {
                    Some(b) => b.len(),
                    None => return Status::NotFound as i32,
                },
            };
            status(
                write_u32(&mut c, len_ptr, len as u32)
                    .and_then(|()| write_u32(&mut c, flags_ptr, 0)),
            )
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, kind: i32, ptr_ptr: i32, size_ptr: i32| {
            let encoded = match map(c.data_mut(), kind) {
                Ok(Some(h)) => h.encode(),
                Ok(None) => Headers::new().encode(),
                Err(s) => return Ok(s as i32),
            };
            status_or_trap(give(&mut c, &encoded, ptr_ptr, size_ptr))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, kind: i32, ptr: i32, len: i32| {
            let pairs = match with_bytes(&mut c, ptr, len, |b, _| decode_pairs(b)) {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => return Status::BadArgument as i32,
                Err(s) => return s as i32,
            };
            status(map_mut(c.data_mut(), kind).map(|h| h.replace_all(pairs)))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        proxy_get_header_map_value,
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, kind: i32, k: i32, kl: i32, v: i32, vl: i32| {
            mutate_header(&mut c, kind, (k, kl), (v, vl), |h, name, value| {
                h.add(name, value)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, kind: i32, k: i32, kl: i32, v: i32, vl: i32| {
            mutate_header(&mut c, kind, (k, kl), (v, vl), |h, name, value| {
                h.set(name, value)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, kind: i32, k: i32, kl: i32| {
            mutate_header(&mut c, kind, (k, kl), (0, 0), |h, name, _| h.remove(name))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: C<'_>, kind: i32, size_ptr: i32| {
            let size = match map(c.data_mut(), kind) {
                Ok(h) => h.map_or(4, |h| h.encode().len()),
                Err(s) => return s as i32,
            };
            status(write_u32(&mut c, size_ptr, size as u32))
        },
    )?;
    linker.func_wrap("env", "proxy_get_property", proxy_get_property)?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, p: i32, pl: i32, v: i32, vl: i32| {
            status(
                with_two(&mut c, (p, pl), (v, vl), |path, value, state| {
                    let key = String::from_utf8_lossy(path).into_owned();
                    match state.stream() {
                        Some(s) => {
                            s.properties.insert(key, value.to_vec());
                            Ok(())
                        }
                        None => Err(Status::BadArgument),
                    }
                })
                .and_then(|r| r),
            )
        },
    )?;
    linker.func_wrap("env", "proxy_continue_stream", |mut c: C<'_>, kind: i32| {
        if kind != STREAM_REQUEST && kind != STREAM_RESPONSE {
            return Status::BadArgument as i32;
        }
        resume(c.data_mut())
    })?;
    linker.func_wrap("env", "proxy_close_stream", |mut c: C<'_>, kind: i32| {
        if kind != STREAM_REQUEST && kind != STREAM_RESPONSE {
            return Status::BadArgument as i32;
        }
        answer(c.data_mut(), LocalResponse::reset())
    })?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        proxy_send_local_response,
    )?;
    linker.func_wrap("env", "proxy_http_call", proxy_http_call)?;
    // No gRPC upstreams exist here: Envoy answers BAD_ARGUMENT for an unknown cluster, which the
    // SDKs turn into an error result.
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |_: C<'_>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32| { Status::BadArgument as i32 },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| {
            Status::BadArgument as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32| Status::NotFound as i32,
    )?;
    linker.func_wrap("env", "proxy_grpc_cancel", |_: C<'_>, _: i32| {
        Status::NotFound as i32
    })?;
    linker.func_wrap("env", "proxy_grpc_close", |_: C<'_>, _: i32| {
        Status::NotFound as i32
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, code_ptr: i32, msg_ptr: i32, msg_size_ptr: i32| {
            if c.data().phase != Phase::CallResponse {
                return Ok(Status::NotFound as i32);
            }
            let (code, message) = c.data().call_status.clone();
            if let Err(s) = write_u32(&mut c, code_ptr, code) {
                return Ok(s as i32);
            }
            status_or_trap(give(&mut c, message.as_bytes(), msg_ptr, msg_size_ptr))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, k: i32, kl: i32, v: i32, vl: i32, cas: i32| match with_two(
            &mut c,
            (k, kl),
            (v, vl),
            |key, value, state| state.host.shared.set(key, value, cas as u32),
        ) {
            Ok(s) | Err(s) => s as i32,
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, k: i32, kl: i32, ptr_ptr: i32, size_ptr: i32, cas_ptr: i32| {
            let (value, cas) =
                match with_bytes(&mut c, k, kl, |key, state| state.host.shared.get(key)) {
                    Ok(Some(found)) => found,
                    Ok(None) => return Ok(Status::NotFound as i32),
                    Err(s) => return Ok(s as i32),
                };
            if let Err(s) = write_u32(&mut c, cas_ptr, cas) {
                return Ok(s as i32);
            }
            status_or_trap(give(&mut c, &value, ptr_ptr, size_ptr))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, n: i32, nl: i32, id_ptr: i32| {
            let name = match read_str(&mut c, n, nl) {
                Ok(name) => name,
                Err(s) => return s as i32,
            };
            let state = c.data();
            let id = state
                .host
                .shared
                .register_queue(&name, state.instance.clone());
            status(write_u32(&mut c, id_ptr, id))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, _vm: i32, _vml: i32, n: i32, nl: i32, id_ptr: i32| {
            let id = match read_str(&mut c, n, nl) {
                Ok(name) => c.data().host.shared.resolve_queue(&name),
                Err(s) => return s as i32,
            };
            match id {
                Some(id) => status(write_u32(&mut c, id_ptr, id)),
                None => Status::NotFound as i32,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, v: i32, vl: i32| {
            let owner = match with_bytes(&mut c, v, vl, |item, state| {
                state.host.shared.enqueue(id as u32, item)
            }) {
                Ok(Ok(owner)) => owner,
                Ok(Err(s)) | Err(s) => return s as i32,
            };
            // The owner may be this very instance, whose lock is held: tell it from a task.
            if let Some(runtime) = &c.data().runtime {
                runtime.spawn(async move {
                    if let Some(owner) = owner.upgrade() {
                        owner.queue_ready(id as u32);
                    }
                });
            }
            Status::Ok as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, ptr_ptr: i32, size_ptr: i32| match c
            .data()
            .host
            .shared
            .dequeue(id as u32)
        {
            Ok(item) => status_or_trap(give(&mut c, &item, ptr_ptr, size_ptr)),
            Err(s) => Ok(s as i32),
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, n: i32, nl: i32, id_ptr: i32| {
            let Some(kind) = MetricKind::from_raw(kind) else {
                return Status::BadArgument as i32;
            };
            let id = match read_str(&mut c, n, nl) {
                Ok(name) if !name.is_empty() => c.data().host.metrics.define(kind, &name),
                Ok(_) => return Status::BadArgument as i32,
                Err(s) => return s as i32,
            };
            status(write_u32(&mut c, id_ptr, id))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: i32, delta: i64| c.data().host.metrics.increment(id as u32, delta) as i32,
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: i32, value: i64| {
            c.data().host.metrics.record(id as u32, value as u64) as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ptr: i32| match c.data().host.metrics.get(id as u32) {
            Ok(v) => status(write_u64(&mut c, ptr, v)),
            Err(s) => s as i32,
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, ctx: i32| {
            let state = c.data_mut();
            let ctx = ctx as u32;
            if ctx == state.root || state.streams.contains_key(&ctx) {
                state.effective = ctx;
                Status::Ok as i32
            } else {
                Status::BadArgument as i32
            }
        },
    )?;
    linker.func_wrap("env", "proxy_done", |mut c: C<'_>| {
        let state = c.data_mut();
        let ctx = state.effective;
        match state.streams.get(&ctx) {
            Some(s) if s.done_deferred => {
                state.finished.push(ctx);
                Status::Ok as i32
            }
            _ => Status::NotFound as i32,
        }
    })?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| Status::NotFound as i32,
    )?;

    // ABI 0.1.0 names.
    linker.func_wrap(
        "env",
        "proxy_get_configuration",
        |mut c: C<'_>, ptr_ptr: i32, size_ptr: i32| {
            let config = match c.data().phase {
                Phase::VmStart => c.data().plugin.vm_config.clone(),
                Phase::Configure => c.data().plugin.config.clone(),
                _ => return Ok(Status::NotFound as i32),
            };
            status_or_trap(give(&mut c, &config, ptr_ptr, size_ptr))
        },
    )?;
    linker.func_wrap("env", "proxy_continue_request", |mut c: C<'_>| {
        resume(c.data_mut())
    })?;
    linker.func_wrap("env", "proxy_continue_response", |mut c: C<'_>| {
        resume(c.data_mut())
    })?;
    linker.func_wrap("env", "proxy_clear_route_cache", |_: C<'_>| {
        Status::Ok as i32
    })?;

    // Emscripten (C++ SDK) and AssemblyScript runtime imports.
    linker.func_wrap(
        "env",
        "emscripten_notify_memory_growth",
        |_: C<'_>, _: i32| {},
    )?;
    linker.func_wrap("env", "pthread_equal", |_: C<'_>, a: i32, b: i32| {
        i32::from(a == b)
    })?;
    linker.func_wrap(
        "env",
        "abort",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32| -> wasmtime::Result<()> {
            wasmtime::bail!("plugin called abort")
        },
    )?;
    Ok(())
}

fn proxy_log(mut c: C<'_>, level: i32, ptr: i32, len: i32) -> i32 {
    let Some(level) = abi::log_level(level) else {
        return Status::BadArgument as i32;
    };
    let r = with_bytes(&mut c, ptr, len, |msg, state| {
        let msg = String::from_utf8_lossy(msg);
        let plugin = &*state.plugin.name;
        match level {
            tracing::Level::TRACE => tracing::trace!(target: "wasm", plugin, "{msg}"),
            tracing::Level::DEBUG => tracing::debug!(target: "wasm", plugin, "{msg}"),
            tracing::Level::INFO => tracing::info!(target: "wasm", plugin, "{msg}"),
            tracing::Level::WARN => tracing::warn!(target: "wasm", plugin, "{msg}"),
            tracing::Level::ERROR => tracing::error!(target: "wasm", plugin, "{msg}"),
        }
    });
    status(r)
}

/// The buffer of `kind` visible now, if any.
fn buffer(state: &mut VmState, kind: BufferType) -> Option<&[u8]> {
    match kind {
        BufferType::VmConfiguration => {
            (state.phase == Phase::VmStart).then_some(&state.plugin.vm_config[..])
        }
        BufferType::PluginConfiguration => {
            (state.phase == Phase::Configure).then_some(&state.plugin.config[..])
        }
        BufferType::CallResponseBody => state.call_response.as_ref().map(|r| &r.body[..]),
        BufferType::RequestBody => state.streams.get(&state.effective)?.request_body.as_deref(),
        BufferType::ResponseBody => state
            .streams
            .get(&state.effective)?
            .response_body
            .as_deref(),
    }
}

fn proxy_get_buffer_bytes(
    mut c: C<'_>,
    kind: i32,
    start: i32,
    max: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> R {
    let Some(kind) = BufferType::from_raw(kind) else {
        return Ok(Status::BadArgument as i32);
    };
    let chunk = match buffer(c.data_mut(), kind) {
        None => return Ok(Status::NotFound as i32),
        Some(b) => {
            let start = (start as u32 as usize).min(b.len());
            // SDKs ask for `u32::MAX` bytes to mean "all of it".
            let end = start.saturating_add(max as u32 as usize).min(b.len());
            b[start..end].to_vec()
        }
    };
    status_or_trap(give(&mut c, &chunk, ptr_ptr, size_ptr))
}

fn proxy_set_buffer_bytes(
    mut c: C<'_>,
    kind: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> i32 {
    let response = match BufferType::from_raw(kind) {
        Some(BufferType::RequestBody) => false,
        Some(BufferType::ResponseBody) => true,
        _ => return Status::BadArgument as i32,
    };
    let r = with_bytes(&mut c, ptr, len, |data, state| {
        let stream = state.stream().ok_or(Status::BadArgument)?;
        let body = if response {
            stream.response_body.as_mut()
        } else {
            stream.request_body.as_mut()
        }
        .ok_or(Status::BadArgument)?;
        // Replace `size` bytes at `start`: (0, 0) prepends, start past the end appends, and
        // (0, len) replaces everything.
        let from = (start as u32 as usize).min(body.len());
        let to = from.saturating_add(size as u32 as usize).min(body.len());
        body.splice(from..to, data.iter().copied());
        Ok(())
    });
    status(r.and_then(|r| r))
}

/// The header map of `kind` as it can be read now. `Ok(None)` is an empty, readable map (the
/// answer of a failed call).
fn map(state: &mut VmState, kind: i32) -> Result<Option<&Headers>, Status> {
    let kind = MapType::from_raw(kind).ok_or(Status::BadArgument)?;
    match kind {
        MapType::CallResponseHeaders | MapType::CallResponseTrailers => {
            if state.phase != Phase::CallResponse {
                return Err(Status::BadArgument);
            }
            Ok(state.call_response.as_ref().map(|r| {
                if kind == MapType::CallResponseHeaders {
                    &r.headers
                } else {
                    &r.trailers
                }
            }))
        }
        MapType::RequestHeaders | MapType::ResponseHeaders => {
            let stream = state
                .streams
                .get(&state.effective)
                .ok_or(Status::BadArgument)?;
            let (lent, kept) = if kind == MapType::RequestHeaders {
                (&stream.request_headers, &stream.info.request)
            } else {
                (&stream.response_headers, &stream.info.response)
            };
            lent.as_ref()
                .or_else(|| kept.get())
                .map(Some)
                .ok_or(Status::BadArgument)
        }
        // Trailers exist only while their callback runs (or pauses); Envoy answers BAD_ARGUMENT
        // for a map that is not available.
        MapType::RequestTrailers | MapType::ResponseTrailers => state
            .streams
            .get(&state.effective)
            .and_then(|s| {
                if kind == MapType::RequestTrailers {
                    s.request_trailers.as_ref()
                } else {
                    s.response_trailers.as_ref()
                }
            })
            .map(Some)
            .ok_or(Status::BadArgument),
    }
}

/// The header map of `kind` if it may be written now: only while its phase lends it.
fn map_mut(state: &mut VmState, kind: i32) -> Result<&mut Headers, Status> {
    let stream = state.stream().ok_or(Status::BadArgument)?;
    match MapType::from_raw(kind) {
        Some(MapType::RequestHeaders) => stream.request_headers.as_mut(),
        Some(MapType::RequestTrailers) => stream.request_trailers.as_mut(),
        Some(MapType::ResponseHeaders) => stream.response_headers.as_mut(),
        Some(MapType::ResponseTrailers) => stream.response_trailers.as_mut(),
        _ => None,
    }
    .ok_or(Status::BadArgument)
}

fn proxy_get_header_map_value(
    mut c: C<'_>,
    kind: i32,
    k: i32,
    kl: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> R {
    let found = with_bytes(&mut c, k, kl, |key, state| {
        let key = std::str::from_utf8(key).map_err(|_| Status::BadArgument)?;
        let legacy = state.abi == AbiVersion::V0_1_0;
        match map(state, kind)? {
            Some(h) => match h.get(key) {
                Some(v) => Ok(Some(v.to_vec())),
                None if legacy => Ok(Some(Vec::new())),
                None => Ok(None),
            },
            None => Ok(None),
        }
    });
    match found.and_then(|r| r) {
        Ok(Some(value)) => status_or_trap(give(&mut c, &value, ptr_ptr, size_ptr)),
        Ok(None) => Ok(Status::NotFound as i32),
        Err(s) => Ok(s as i32),
    }
}

fn mutate_header(
    c: &mut C<'_>,
    kind: i32,
    key: (i32, i32),
    value: (i32, i32),
    f: impl FnOnce(&mut Headers, &str, &[u8]),
) -> i32 {
    let r = with_two(c, key, value, |key, value, state| {
        let name = std::str::from_utf8(key).map_err(|_| Status::BadArgument)?;
        f(map_mut(state, kind)?, name, value);
        Ok(())
    });
    status(r.and_then(|r| r))
}

fn proxy_get_property(mut c: C<'_>, p: i32, pl: i32, ptr_ptr: i32, size_ptr: i32) -> R {
    let value = with_bytes(&mut c, p, pl, |path, state| {
        let key = String::from_utf8_lossy(path);
        let stream = state.streams.get(&state.effective);
        if let Some(v) = stream.and_then(|s| s.properties.get(&*key)) {
            return Some(v.clone());
        }
        // Segments are NUL-separated; Envoy tolerates a trailing NUL.
        let path = path.strip_suffix(&[0]).unwrap_or(path);
        let segments: Vec<&str> = path
            .split(|&b| b == 0)
            .map(|s| std::str::from_utf8(s).unwrap_or(""))
            .collect();
        let view = View {
            info: stream.map(|s| &*s.info),
            request: stream.and_then(|s| s.request_headers.as_ref()),
            response: stream.and_then(|s| s.response_headers.as_ref()),
            node: &state.host.node,
            plugin_name: &state.plugin.name,
            root_id: &state.plugin.root_id,
        };
        view.get(&segments)
    });
    match value {
        Ok(Some(v)) => status_or_trap(give(&mut c, &v, ptr_ptr, size_ptr)),
        Ok(None) => Ok(Status::NotFound as i32),
        Err(s) => Ok(s as i32),
    }
}

/// Marks the effective stream to go on after its pause.
fn resume(state: &mut VmState) -> i32 {
    let ctx = state.effective;
    match state.streams.get_mut(&ctx) {
        Some(s) => {
            s.resume = true;
            state.touched.push(ctx);
            Status::Ok as i32
        }
        None => Status::BadArgument as i32,
    }
}

/// Records a local response for the effective stream.
fn answer(state: &mut VmState, response: LocalResponse) -> i32 {
    let ctx = state.effective;
    match state.streams.get_mut(&ctx) {
        Some(s) => {
            s.local = Some(response);
            state.touched.push(ctx);
            Status::Ok as i32
        }
        None => Status::BadArgument as i32,
    }
}

#[allow(clippy::too_many_arguments)]
fn proxy_send_local_response(
    mut c: C<'_>,
    code: i32,
    details: i32,
    details_len: i32,
    body: i32,
    body_len: i32,
    headers: i32,
    headers_len: i32,
    grpc_status: i32,
) -> i32 {
    let Ok(status_code) = u16::try_from(code) else {
        return Status::BadArgument as i32;
    };
    if !(200..=599).contains(&status_code) {
        return Status::BadArgument as i32;
    }
    let parts = (|| -> Result<_, Status> {
        let details = read(&mut c, details, details_len)?;
        let body = read(&mut c, body, body_len)?;
        let pairs = with_bytes(&mut c, headers, headers_len, |b, _| decode_pairs(b))?
            .map_err(|_| Status::BadArgument)?;
        Ok((details, body, pairs))
    })();
    let (details, body, pairs) = match parts {
        Ok(p) => p,
        Err(s) => return s as i32,
    };
    let mut headers = Headers::new();
    for (name, value) in pairs {
        headers.push(&name, value);
    }
    if (0..=16).contains(&grpc_status) {
        headers.push("grpc-status", grpc_status.to_string());
    }
    let response = LocalResponse {
        status: status_code,
        headers,
        body: Bytes::from(body),
        details: String::from_utf8_lossy(&details).into_owned(),
        reset: false,
    };
    answer(c.data_mut(), response)
}

#[allow(clippy::too_many_arguments)]
fn proxy_http_call(
    mut c: C<'_>,
    upstream: i32,
    upstream_len: i32,
    headers: i32,
    headers_len: i32,
    body: i32,
    body_len: i32,
    _trailers: i32,
    _trailers_len: i32,
    timeout_ms: i32,
    token_ptr: i32,
) -> i32 {
    if timeout_ms < 0 {
        return Status::BadArgument as i32;
    }
    let parts = (|| -> Result<_, Status> {
        let upstream = read_str(&mut c, upstream, upstream_len)?;
        let pairs = with_bytes(&mut c, headers, headers_len, |b, _| decode_pairs(b))?
            .map_err(|_| Status::BadArgument)?;
        let body = read(&mut c, body, body_len)?;
        Ok((upstream, pairs, body))
    })();
    let (upstream, pairs, body) = match parts {
        Ok(p) => p,
        Err(s) => return s as i32,
    };
    let mut headers = Headers::new();
    for (name, value) in pairs {
        headers.push(&name, value);
    }
    if [":method", ":path", ":authority"]
        .iter()
        .any(|h| headers.get(h).is_none())
    {
        return Status::BadArgument as i32;
    }
    let timeout = match timeout_ms {
        0 => DEFAULT_CALL_TIMEOUT,
        ms => Duration::from_millis(ms as u64),
    };
    let state = c.data_mut();
    let Some(runtime) = state.runtime.clone() else {
        return Status::InternalFailure as i32;
    };
    let request = CallRequest {
        headers,
        body: Bytes::from(body),
        timeout,
    };
    let Some(call) = state.host.dispatcher.dispatch(&upstream, request) else {
        tracing::debug!(plugin = %state.plugin.name, upstream, "plugin http call to an unknown upstream");
        return Status::BadArgument as i32;
    };
    let token = state.new_call();
    if let Err(s) = write_u32(&mut c, token_ptr, token) {
        c.data_mut().calls.remove(&token);
        return s as i32;
    }
    let instance = c.data().instance.clone();
    runtime.spawn(async move {
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
        };
        if let Some(instance) = instance.upgrade() {
            instance.deliver_call(token, result);
        }
    });
    Status::Ok as i32
}
