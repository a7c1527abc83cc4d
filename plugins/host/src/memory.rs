//! Guest memory access for host functions: bounds-checked reads and writes, and handing buffers
//! to the guest through its own allocator.
//!
//! Pointers and lengths come from the plugin and are never trusted: anything out of bounds is
//! `INVALID_MEMORY_ACCESS`, never a trap. A null pointer with length 0 is an empty buffer, which
//! the Rust SDK sends.

use wasmtime::Caller;

use crate::abi::Status;
use crate::vm::VmState;

/// The guest bytes at `ptr..ptr+len` within `data`.
pub(crate) fn slice(data: &[u8], ptr: i32, len: i32) -> Result<&[u8], Status> {
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    if len == 0 {
        return Ok(&[]);
    }
    data.get(ptr..ptr.checked_add(len).ok_or(Status::InvalidMemoryAccess)?)
        .ok_or(Status::InvalidMemoryAccess)
}

/// Runs `f` on the guest bytes at `ptr..ptr+len` and the host state, without copying.
pub(crate) fn with_bytes<R>(
    caller: &mut Caller<'_, VmState>,
    ptr: i32,
    len: i32,
    f: impl FnOnce(&[u8], &mut VmState) -> R,
) -> Result<R, Status> {
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let (data, state) = memory.data_and_store_mut(caller);
    let bytes = slice(data, ptr, len)?;
    Ok(f(bytes, state))
}

/// Runs `f` on two guest byte ranges and the host state.
pub(crate) fn with_two<R>(
    caller: &mut Caller<'_, VmState>,
    a: (i32, i32),
    b: (i32, i32),
    f: impl FnOnce(&[u8], &[u8], &mut VmState) -> R,
) -> Result<R, Status> {
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let (data, state) = memory.data_and_store_mut(caller);
    let first = slice(data, a.0, a.1)?;
    let second = slice(data, b.0, b.1)?;
    Ok(f(first, second, state))
}

/// A copy of the guest bytes at `ptr..ptr+len`.
pub(crate) fn read(
    caller: &mut Caller<'_, VmState>,
    ptr: i32,
    len: i32,
) -> Result<Vec<u8>, Status> {
    with_bytes(caller, ptr, len, |b, _| b.to_vec())
}

/// A copy of the guest string at `ptr..ptr+len`; invalid UTF-8 is a bad argument.
pub(crate) fn read_str(
    caller: &mut Caller<'_, VmState>,
    ptr: i32,
    len: i32,
) -> Result<String, Status> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Status::BadArgument)
}

/// Writes `bytes` at `ptr`.
pub(crate) fn write(
    caller: &mut Caller<'_, VmState>,
    ptr: i32,
    bytes: &[u8],
) -> Result<(), Status> {
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let data = memory.data_mut(caller);
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(bytes.len())
        .ok_or(Status::InvalidMemoryAccess)?;
    data.get_mut(start..end)
        .ok_or(Status::InvalidMemoryAccess)?
        .copy_from_slice(bytes);
    Ok(())
}

/// Writes a little-endian u32 at `ptr`.
pub(crate) fn write_u32(caller: &mut Caller<'_, VmState>, ptr: i32, v: u32) -> Result<(), Status> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Writes a little-endian u64 at `ptr`.
pub(crate) fn write_u64(caller: &mut Caller<'_, VmState>, ptr: i32, v: u64) -> Result<(), Status> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Hands `bytes` to the guest: allocates with the guest's allocator, copies, and writes the
/// pointer and size to `ptr_ptr` and `size_ptr`. Empty data is a null pointer and size 0, as in
/// Envoy. The outer error is a trap in the guest's allocator.
pub(crate) fn give(
    caller: &mut Caller<'_, VmState>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<Result<(), Status>> {
    let mut ptr = 0u32;
    if !bytes.is_empty() {
        let Some(allocate) = caller.data().allocate.clone() else {
            return Ok(Err(Status::InternalFailure));
        };
        // The allocator re-enters the guest; a trap there poisons the instance.
        ptr = allocate.call(&mut *caller, bytes.len() as i32)? as u32;
        if ptr == 0 {
            return Ok(Err(Status::InternalFailure));
        }
        if let Err(s) = write(caller, ptr as i32, bytes) {
            return Ok(Err(s));
        }
    }
    Ok(write_u32(caller, ptr_ptr, ptr)
        .and_then(|()| write_u32(caller, size_ptr, bytes.len() as u32)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_bounds_checked() {
        let data = [1u8, 2, 3, 4];
        assert_eq!(slice(&data, 1, 2).unwrap(), &[2, 3]);
        assert_eq!(slice(&data, 0, 0).unwrap(), &[] as &[u8]);
        // A null pointer with no length is fine; with a length past the end it is not.
        assert_eq!(slice(&data, 0, 5), Err(Status::InvalidMemoryAccess));
        assert_eq!(slice(&data, 3, 2), Err(Status::InvalidMemoryAccess));
        // Negative i32s are large u32 offsets, never wrapped-around reads.
        assert_eq!(slice(&data, -1, 1), Err(Status::InvalidMemoryAccess));
        assert_eq!(slice(&data, 1, -1), Err(Status::InvalidMemoryAccess));
    }
}
