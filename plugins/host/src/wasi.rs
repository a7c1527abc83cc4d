//! WASI for plugins: wasmtime-wasi under both `wasi_snapshot_preview1` and `wasi_unstable`, with
//! no filesystem, no arguments and only the plugin's `vmConfig.env`.
//!
//! wasmtime-wasi's synchronous bindings run their I/O functions (`fd_write`, `poll_oneoff`,
//! every `fd_*` and `path_*` that may block) by blocking on a Tokio runtime, which panics when
//! called from a Tokio worker, as every plugin callback is. Those functions are shadowed here with
//! non-blocking ones: stdout and stderr go to our log (INFO and ERROR), reads see end of file,
//! `poll_oneoff` reports no events, and everything touching files is `EBADF` (no file descriptor
//! but the standard three exists). Environment, arguments, clocks, randomness and `proc_exit` stay
//! wasmtime-wasi's.

use wasmtime::{Caller, Linker};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

use crate::memory::{slice, write_u32};
use crate::vm::VmState;

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_NOTSUP: i32 = 58;

/// A WASI context with the plugin's environment and nothing else.
pub(crate) fn context(env: &[(String, String)]) -> WasiP1Ctx {
    WasiCtxBuilder::new().envs(env).build_p1()
}

pub(crate) fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p1::add_to_linker_sync(linker, |s: &mut VmState| &mut s.wasi)?;
    wasmtime_wasi::p0::add_to_linker_sync(linker, |s: &mut VmState| &mut s.wasi)?;
    linker.allow_shadowing(true);
    for module in ["wasi_snapshot_preview1", "wasi_unstable"] {
        shadow(linker, module)?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

type C<'a> = Caller<'a, VmState>;

fn shadow(linker: &mut Linker<VmState>, m: &str) -> wasmtime::Result<()> {
    linker.func_wrap(m, "fd_write", fd_write)?;
    linker.func_wrap(
        m,
        "fd_pwrite",
        |c: C<'_>, fd: i32, iovs: i32, n: i32, _off: i64, out: i32| fd_write(c, fd, iovs, n, out),
    )?;
    linker.func_wrap(
        m,
        "fd_read",
        |mut c: C<'_>, fd: i32, _iovs: i32, _n: i32, out: i32| {
            if fd != 0 {
                return ERRNO_BADF;
            }
            errno(write_u32(&mut c, out, 0))
        },
    )?;
    linker.func_wrap(
        m,
        "fd_pread",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i64, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(m, "fd_fdstat_get", |mut c: C<'_>, fd: i32, out: i32| {
        if !(0..=2).contains(&fd) {
            return ERRNO_BADF;
        }
        // filetype character device, no flags, rights fd_read | fd_write.
        let mut stat = [0u8; 24];
        stat[0] = 2;
        stat[8..16].copy_from_slice(&(0x2u64 | 0x40).to_le_bytes());
        errno(crate::memory::write(&mut c, out, &stat))
    })?;
    linker.func_wrap(
        m,
        "poll_oneoff",
        |mut c: C<'_>, _in: i32, _out: i32, _n: i32, nevents: i32| {
            errno(write_u32(&mut c, nevents, 0))
        },
    )?;
    linker.func_wrap(m, "fd_close", |_: C<'_>, fd: i32| std_fd(fd))?;
    linker.func_wrap(m, "fd_datasync", |_: C<'_>, fd: i32| std_fd(fd))?;
    linker.func_wrap(m, "fd_sync", |_: C<'_>, fd: i32| std_fd(fd))?;
    linker.func_wrap(
        m,
        "fd_advise",
        |_: C<'_>, _: i32, _: i64, _: i64, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(m, "fd_filestat_get", |_: C<'_>, _: i32, _: i32| ERRNO_BADF)?;
    linker.func_wrap(m, "fd_filestat_set_size", |_: C<'_>, _: i32, _: i64| {
        ERRNO_BADF
    })?;
    linker.func_wrap(
        m,
        "fd_filestat_set_times",
        |_: C<'_>, _: i32, _: i64, _: i64, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(m, "fd_seek", |_: C<'_>, _: i32, _: i64, _: i32, _: i32| {
        ERRNO_BADF
    })?;
    linker.func_wrap(
        m,
        "fd_readdir",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i64, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(m, "fd_renumber", |_: C<'_>, _: i32, _: i32| ERRNO_BADF)?;
    linker.func_wrap(
        m,
        "path_create_directory",
        |_: C<'_>, _: i32, _: i32, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(
        m,
        "path_filestat_get",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(
        m,
        "path_filestat_set_times",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(
        m,
        "path_link",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(
        m,
        "path_open",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32, _: i32| {
            ERRNO_BADF
        },
    )?;
    linker.func_wrap(
        m,
        "path_readlink",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(
        m,
        "path_remove_directory",
        |_: C<'_>, _: i32, _: i32, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(
        m,
        "path_rename",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(
        m,
        "path_symlink",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32| ERRNO_BADF,
    )?;
    linker.func_wrap(m, "path_unlink_file", |_: C<'_>, _: i32, _: i32, _: i32| {
        ERRNO_BADF
    })?;
    Ok(())
}

fn errno(r: Result<(), crate::abi::Status>) -> i32 {
    if r.is_ok() {
        ERRNO_SUCCESS
    } else {
        ERRNO_FAULT
    }
}

fn std_fd(fd: i32) -> i32 {
    if (0..=2).contains(&fd) {
        ERRNO_NOTSUP
    } else {
        ERRNO_BADF
    }
}

/// Writes stdout as INFO and stderr as ERROR log lines tagged with the plugin.
fn fd_write(mut c: C<'_>, fd: i32, iovs: i32, n: i32, out: i32) -> i32 {
    if fd != 1 && fd != 2 {
        return ERRNO_BADF;
    }
    let Some(memory) = c.data().memory else {
        return ERRNO_FAULT;
    };
    let (data, state) = memory.data_and_store_mut(&mut c);
    let mut text = Vec::new();
    for i in 0..n.max(0) {
        let Ok(iov) = slice(data, iovs.wrapping_add(i * 8), 8) else {
            return ERRNO_FAULT;
        };
        let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        match slice(data, ptr, len) {
            Ok(b) => text.extend_from_slice(b),
            Err(_) => return ERRNO_FAULT,
        }
    }
    let plugin = &*state.plugin.name;
    let line = String::from_utf8_lossy(&text);
    let line = line.trim_end_matches('\n');
    if !line.is_empty() {
        if fd == 1 {
            tracing::info!(target: "wasm", plugin, stream = "stdout", "{line}");
        } else {
            tracing::error!(target: "wasm", plugin, stream = "stderr", "{line}");
        }
    }
    errno(write_u32(&mut c, out, text.len() as u32))
}
